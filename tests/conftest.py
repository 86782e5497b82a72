"""Test setup: import the flat project scripts, and locate the optional shared data."""

import os
import signal
import sys
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data`, or a clean skip where a fresh clone has none."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not found (only CI and the developers' machines have it)")
    return SHARED_DATA


# Variables a launcher (torchrun) sets: inherited from the shell, they would make every in-process
# run a rank of a distributed job that does not exist.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="session", autouse=True)
def no_launcher_environment() -> Iterator[None]:
    """The tests run as one process whatever the shell's environment holds (the tests of
    distributed runs set these variables in the processes they start)."""
    saved = {name: os.environ.pop(name) for name in LAUNCHER_VARIABLES if name in os.environ}
    yield
    os.environ.update(saved)


@pytest.fixture
def ctrl_c() -> Iterator[None]:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt in this test and in the processes it starts,
    whatever disposition the test run inherited: a shell that starts pytest in the background
    (`pytest &`, a CI job) makes it ignore SIGINT, and its children with it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


# A tiny random BERT: the same transformers classes as MiniLM (so the same project code runs),
# in milliseconds and without the weight wheel.
TINY_BERT_HIDDEN = 32
TINY_BERT_LAYERS = 3
TINY_BERT_WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    ".",
    ",",
    "a",
    "the",
    "dog",
    "cat",
    "on",
    *"bcdefghijklmnopqrstuvwxyz0123456789",
    *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"),
]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder with a randomly initialised 3-layer, 32-wide BERT and its word-piece tokenizer,
    saved as `from_pretrained` reads them (what `bert_path` points at)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny_bert")
    (folder / "vocab.txt").write_text("\n".join(TINY_BERT_WORDS) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=len(TINY_BERT_WORDS),
        hidden_size=TINY_BERT_HIDDEN,
        num_hidden_layers=TINY_BERT_LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    return str(folder)


# Tiny-model options shared by the tests that run the real train script end to end.
TINY_TRAIN_ARGS = [
    "--embed_dim",
    "32",
    "--word_dim",
    "16",
    "--gcn_hidden",
    "16",
    "--num_prototypes",
    "8",
    "--lr",
    "1e-3",
    "--workers",
    "0",
    "--eval_batch_size",
    "64",
    "--progress",
    "false",
    "--val_max_images",
    "0",
    "--device",
    "cpu",
]
# One short epoch of a tiny model without the final test evaluation: a checkpoint to load.
ONE_EPOCH_ARGS = [*TINY_TRAIN_ARGS, "--epochs", "1", "--batch_size", "16", "--queue_size", "32", "--test_split", ""]


def tiny_demo_args(root: Path, seed: int, num_train: int, num_eval: int) -> list[str]:
    """A tiny demo dataset under `root` and the train-script options that point at it."""
    from demo_data import make_demo_dataset

    paths = make_demo_dataset(
        root, seed=seed, num_train=num_train, num_dev=num_eval, num_test=num_eval, regions=6, dim=24
    )
    return [
        "--data_path",
        paths["data_path"],
        "--vocab_path",
        paths["vocab_path"],
        "--concept_path",
        paths["concept_dir"],
    ]


def run_script(script: str, *args: str, procs: int = 1, check: bool = True, timeout: int = 300):
    """Run a project script (under torchrun with `procs` > 1) on one thread per process."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # no launcher variables (see above)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    proc = subprocess.run(
        [sys.executable, *launcher, str(ROOT / script), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def tiny_flickr8k(shared_data: Path, root: Path, train: int = 30, dev: int = 10) -> Path:
    """A Flickr8k-layout folder (images/, captions.txt, train.txt, dev.txt) with the first
    photos of flickr8k_mini's splits (copies: extract_features refuses links out of the folder)."""
    import csv
    import shutil

    mini = shared_data / "flickr8k_mini"
    names = {s: (mini / f"{s}.txt").read_text().split()[:n] for s, n in (("train", train), ("dev", dev))}
    (root / "images").mkdir(parents=True)
    with open(mini / "captions.txt", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["image"] in names["train"] + names["dev"]]
    with open(root / "captions.txt", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    for split, files in names.items():
        (root / f"{split}.txt").write_text("\n".join(files) + "\n")
        for name in files:
            shutil.copyfile(mini / "images" / name, root / "images" / name)
    return root
