"""Bad and hostile inputs at every entry point, one table row each: the command must end with
one or two lines naming the problem and a non-zero status, without a traceback, and leave the
user's files as they were.

The scripts run in this process through `runpy` exactly as `python script.py ...` runs them
(argv, `__main__`, the same top-level error handling), which is much faster than a subprocess
per row; an uncaught exception would fail the row. Ctrl-C in training runs in a real
subprocess at the end.
"""

from __future__ import annotations

import hashlib
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY_TRAIN_ARGS, run_script, tiny_demo_args

TINY = [*TINY_TRAIN_ARGS, "--epochs", "1", "--batch_size", "16", "--queue_size", "32", "--test_split", ""]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny demo dataset, a trained checkpoint, and the user files the rows may touch."""
    root = tmp_path_factory.mktemp("bad")
    demo = tiny_demo_args(root / "demo", seed=2, num_train=16, num_eval=8)
    paths = dict(zip(("data", "vocab", "concepts"), demo[1::2]))
    run_script("train_f30k.py", *demo, *TINY, "--run_dir", str(root / "run"))
    paths.update(ckpt=str(root / "run" / "best.pt"), root=str(root), demo=demo)
    (root / "notes.txt").write_text("my notes\n")
    (root / "caps.txt").write_text("a dog runs .\ntwo cats sleep .\n")
    (root / "latin1.txt").write_bytes("a dog runs .\ntwo cats .\nun caf\xe9 .\n".encode("latin-1"))
    (root / "blank.txt").write_text("a dog runs .\n\ntwo cats sleep .\n")
    (root / "existing.json").write_text('{"mine": true}\n')
    (root / "grid.png").write_bytes(b"\x89PNG not really")
    (root / "afile").write_text("x")
    ckpt = Path(paths["ckpt"]).read_bytes()
    (root / "truncated.pt").write_bytes(ckpt[: len(ckpt) // 3])
    for name in ("config_only", "metrics_only"):
        (root / name).mkdir()
    (root / "config_only" / "config.json").write_text("{}")
    (root / "metrics_only" / "test_metrics.json").write_text("{}")
    (root / "bench" / "runs" / "coder_s0").mkdir(parents=True)
    (root / "bench" / "runs" / "coder_s0" / "result.json").write_text("{}")
    cvse = root / "cvse"
    cvse.mkdir()
    (cvse / "category_concepts.json").write_text('{"dog": 0}')
    shutil.copytree(paths["concepts"], root / "own_concepts")
    # data folders with one defect each, copied from the demo
    for name, defect in (
        ("nan_feats", "nan"),
        ("blank_caps", "blank"),
        ("latin_caps", "latin1"),
        ("odd_count", "count"),
        ("small_feats", "dim"),
    ):
        folder = root / name
        shutil.copytree(paths["data"], folder)
        _damage(folder, defect)
    return paths


def _damage(folder: Path, defect: str) -> None:
    if defect in ("nan", "dim"):
        ims = np.load(folder / "train_ims.npy")
        if defect == "nan":
            ims[3, 0, 0] = np.nan
            np.save(folder / "train_ims.npy", ims)
        else:
            np.save(folder / "test_ims.npy", np.load(folder / "test_ims.npy")[:, :, :10])
        return
    caps = (folder / "train_caps.txt").read_text().splitlines()
    if defect == "blank":
        caps[6] = ""
    elif defect == "count":
        caps = caps[:-1]
    text = "\n".join(caps) + "\n"
    if defect == "latin1":
        caps[4] = "un caf\xe9 sur la plage"
        (folder / "train_caps.txt").write_bytes(("\n".join(caps) + "\n").encode("latin-1"))
        return
    (folder / "train_caps.txt").write_text(text)


def train(env, *extra):
    demo = list(env["demo"])
    return ["train_f30k.py", *demo, *TINY, "--run_dir", f"{env['root']}/new_run", *extra]


def with_data(env, folder):
    demo = list(env["demo"])
    demo[1] = f"{env['root']}/{folder}"
    return ["train_f30k.py", *demo, *TINY, "--run_dir", f"{env['root']}/new_run"]


def extract(env, *extra, captions="caps.txt", out="x"):
    root = env["root"]
    return [
        "extract_features.py",
        "--images",
        root,
        "--captions",
        f"{root}/{captions}",
        "--out",
        f"{root}/{out}",
        *extra,
    ]


# (id, command (a function of env), fragment of the message, files that must not change)
CASES = [
    # train: option values
    ("negative lr", lambda e: train(e, "--lr", "-1"), "--lr -1.0: must be greater than 0", []),
    ("nan lr", lambda e: train(e, "--lr", "nan"), "--lr nan: must be greater than 0", []),
    ("negative grad clip", lambda e: train(e, "--grad_clip", "-1"), "--grad_clip -1.0: must be greater than 0", []),
    (
        "negative weight decay",
        lambda e: train(e, "--weight_decay", "-5"),
        "--weight_decay -5.0: must be at least 0",
        [],
    ),
    ("negative warm-up", lambda e: train(e, "--warmup_epochs", "-3"), "--warmup_epochs -3: must be at least 0", []),
    ("zero epochs", lambda e: train(e, "--epochs", "0"), "--epochs 0: must be at least 1", []),
    ("zero batch", lambda e: train(e, "--batch_size", "0"), "--batch_size 0: must be at least 2", []),
    ("zero eval batch", lambda e: train(e, "--eval_batch_size", "0"), "--eval_batch_size 0: must be at least 1", []),
    ("negative workers", lambda e: train(e, "--workers", "-1"), "--workers -1: must be at least 0", []),
    ("zero log interval", lambda e: train(e, "--log_every", "0"), "--log_every 0: must be at least 1", []),
    ("momentum above 1", lambda e: train(e, "--momentum", "1.5"), "--momentum 1.5: must lie in [0, 1]", []),
    ("mu above 1", lambda e: train(e, "--mu", "2"), "--mu 2.0: must lie in [0, 1]", []),
    ("unknown loss", lambda e: train(e, "--loss", "hinge"), "--loss hinge: must be one of dcl, triplet", []),
    ("unknown amp", lambda e: train(e, "--amp", "half"), "--amp half: must be one of auto, bf16, fp16, off", []),
    ("unknown clip scope", lambda e: train(e, "--grad_clip_scope", "layer"), "must be one of global, branch", []),
    (
        "unknown query input",
        lambda e: train(e, "--concept_query_input", "stop"),
        "must be one of bn, detach, no_bn",
        [],
    ),
    ("not a number", lambda e: train(e, "--epochs", "three"), "--epochs: cannot read 'three' as int", []),
    ("not a boolean", lambda e: train(e, "--concept_branch", "maybe"), "cannot read 'maybe' as bool", []),
    ("unknown option", lambda e: train(e, "--learning_rate", "1"), "did you mean --lr?", []),
    ("misspelled option", lambda e: train(e, "--queue_sise", "8"), "did you mean --queue_size?", []),
    ("option without value", lambda e: train(e, "--seed"), "--seed needs a value", []),
    ("stray argument", lambda e: train(e, "lr=3"), "unexpected argument 'lr=3'", []),
    ("cuda without cuda", lambda e: train(e, "--device", "cuda"), "CUDA is not available", []),
    ("frozen layers on bigru", lambda e: train(e, "--bert_frozen_layers", "2"), "needs --text_encoder bert", []),
    ("tiny temperature", lambda e: train(e, "--tau", "1e-30"), "--tau 1e-30: must be at least 0.001", []),
    (
        "seed beyond numpy's",
        lambda e: train(e, "--seed", str(2**32)),
        "--seed 4294967296: must be at least 0 and at most",
        [],
    ),
    (
        "absurd worker count",
        lambda e: train(e, "--workers", "100000"),
        "--workers 100000: must be at least 0 and at most",
        [],
    ),
    (
        "absurd queue",
        lambda e: train(e, "--queue_size", "100000000000"),
        "--queue_size 100000000000: the run needs about",
        [],
    ),
    (
        "absurd embedding",
        lambda e: train(e, "--embed_dim", "10000000"),
        "--embed_dim 10000000: the run needs about",
        [],
    ),
    # train: files and folders
    ("test split typo", lambda e: train(e, "--test_split", "tset"), "--test_split tset: ", []),
    ("val split typo", lambda e: train(e, "--val_split", "dve"), "did you mean 'dev'?", []),
    ("missing data folder", lambda e: train(e, "--data_path", f"{e['root']}/nowhere"), "data folder not found", []),
    ("missing vocabulary", lambda e: train(e, "--vocab_path", f"{e['root']}/no.json"), "vocabulary file not found", []),
    ("missing concepts", lambda e: train(e, "--concept_path", f"{e['root']}/none"), "concept folder not found", []),
    ("missing word vectors", lambda e: train(e, "--word_vectors", f"{e['root']}/glove.txt"), "file not found", []),
    (
        "data folder is a file",
        lambda e: train(e, "--data_path", f"{e['root']}/afile"),
        "afile: is a file, expected a data folder",
        ["afile"],
    ),
    (
        "vocabulary is a folder",
        lambda e: train(e, "--vocab_path", e["root"]),
        "is a folder, expected a vocabulary file",
        [],
    ),
    (
        "concepts are a file",
        lambda e: train(e, "--concept_path", f"{e['root']}/afile"),
        "is a file, expected a concept folder",
        ["afile"],
    ),
    (
        "word vectors are a folder",
        lambda e: train(e, "--word_vectors", e["root"]),
        "is a folder, expected a word-vector file",
        [],
    ),
    (
        "resume from a folder",
        lambda e: train(e, "--resume", f"{e['root']}/run"),
        "run: is a folder; give the checkpoint file",
        [],
    ),
    (
        "missing BERT folder",
        lambda e: train(e, "--text_encoder", "bert", "--bert_path", f"{e['root']}/bert"),
        "BERT",
        [],
    ),
    ("run folder is a file", lambda e: train(e, "--run_dir", f"{e['root']}/afile"), "is a file", ["afile"]),
    ("run folder under a file", lambda e: train(e, "--run_dir", f"{e['root']}/afile/run"), "is a file", ["afile"]),
    (
        "run folder with a config",
        lambda e: train(e, "--run_dir", f"{e['root']}/config_only"),
        "already holds another run's config.json",
        ["config_only/config.json"],
    ),
    (
        "run folder with metrics",
        lambda e: train(e, "--run_dir", f"{e['root']}/metrics_only"),
        "already holds another run's test_metrics.json",
        ["metrics_only/test_metrics.json"],
    ),
    ("resume from nothing", lambda e: train(e, "--resume", f"{e['root']}/none.pt"), "checkpoint file not found", []),
    (
        "resume from a text file",
        lambda e: train(e, "--resume", f"{e['root']}/notes.txt"),
        "not a checkpoint",
        ["notes.txt"],
    ),
    (
        "resume from a truncated file",
        lambda e: train(e, "--resume", f"{e['root']}/truncated.pt"),
        "truncated or corrupt checkpoint (",
        ["truncated.pt"],
    ),
    (
        "resume with another model",
        lambda e: train(e, "--resume", e["ckpt"], "--embed_dim", "64"),
        "cannot change --embed_dim",
        ["run/best.pt"],
    ),
    ("batch larger than the data", lambda e: train(e, "--batch_size", "4096"), "do not fill one batch", []),
    ("blank caption line", lambda e: with_data(e, "blank_caps"), "train_caps.txt:7: blank line", []),
    ("caption file not UTF-8", lambda e: with_data(e, "latin_caps"), "train_caps.txt:5: not UTF-8", []),
    ("caption count mismatch", lambda e: with_data(e, "odd_count"), "not a whole multiple", []),
    ("NaN in the features", lambda e: with_data(e, "nan_feats"), "non-finite values (NaN or inf) in the features", []),
    # evaluation
    (
        "eval: missing checkpoint",
        lambda e: ["eval_f30k.py", "--checkpoint", f"{e['root']}/none.pt"],
        "checkpoint file not found",
        [],
    ),
    (
        "eval: text file as checkpoint",
        lambda e: ["eval_f30k.py", "--checkpoint", f"{e['root']}/notes.txt"],
        "not a checkpoint",
        ["notes.txt"],
    ),
    ("eval: folder as checkpoint", lambda e: ["eval_f30k.py", "--checkpoint", f"{e['root']}/run"], "is a folder", []),
    (
        "eval: cuda without cuda",
        lambda e: ["eval_f30k.py", "--checkpoint", e["ckpt"], "--device", "cuda"],
        "CUDA is not available",
        [],
    ),
    (
        "eval: existing json",
        lambda e: ["eval_f30k.py", "--checkpoint", e["ckpt"], "--json", f"{e['root']}/existing.json"],
        "exists; choose another name, or pass --overwrite",
        ["existing.json"],
    ),
    (
        "eval: json is the checkpoint",
        lambda e: ["eval_f30k.py", "--checkpoint", e["ckpt"], "--json", e["ckpt"], "--overwrite"],
        "is also an input",
        ["run/best.pt"],
    ),
    (
        "eval: json is a folder",
        lambda e: ["eval_f30k.py", "--checkpoint", e["ckpt"], "--json", e["root"]],
        "is a folder",
        [],
    ),
    (
        "eval: json under a file",
        lambda e: ["eval_f30k.py", "--checkpoint", e["ckpt"], "--json", f"{e['root']}/afile/m.json"],
        "is a file, not a folder",
        ["afile"],
    ),
    (
        "eval: zero batch",
        lambda e: ["eval_f30k.py", "--checkpoint", e["ckpt"], "--batch_size", "0"],
        "0 must be at least 1",
        [],
    ),
    (
        "eval: mu above 1",
        lambda e: ["eval_f30k.py", "--checkpoint", e["ckpt"], "--mu", "1.5"],
        "1.5 must lie in [0, 1]",
        [],
    ),
    (
        "eval: unknown split",
        lambda e: ["eval_f30k.py", "--checkpoint", e["ckpt"], "--split", "tset"],
        "image feature file not found",
        [],
    ),
    (
        "eval: other feature size",
        lambda e: ["eval_f30k.py", "--checkpoint", e["ckpt"], "--data_path", f"{e['root']}/small_feats"],
        "test_ims.npy: 10-d region features",
        [],
    ),
    (
        "eval: unknown option",
        lambda e: ["eval_f30k.py", "--checkpoint", e["ckpt"], "--splitt", "dev"],
        "unrecognized arguments",
        [],
    ),
    (
        "eval coco: missing checkpoint",
        lambda e: ["eval_coco.py", "--checkpoint", f"{e['root']}/none.pt"],
        "checkpoint file not found",
        [],
    ),
    # vocabulary
    (
        "vocab: output is the input",
        lambda e: ["vocab.py", "build", f"{e['root']}/caps.txt", "--out", f"{e['root']}/caps.txt", "--overwrite"],
        "is also an input",
        ["caps.txt"],
    ),
    (
        "vocab: existing output",
        lambda e: ["vocab.py", "build", f"{e['root']}/caps.txt", "--out", f"{e['root']}/existing.json"],
        "exists",
        ["existing.json"],
    ),
    (
        "vocab: output is a folder",
        lambda e: ["vocab.py", "build", f"{e['root']}/caps.txt", "--out", e["root"]],
        "is a folder",
        [],
    ),
    (
        "vocab: missing captions",
        lambda e: ["vocab.py", "build", f"{e['root']}/none.txt", "--out", f"{e['root']}/v.json"],
        "caption file not found",
        [],
    ),
    (
        "vocab: latin-1 captions",
        lambda e: ["vocab.py", "build", f"{e['root']}/latin1.txt", "--out", f"{e['root']}/v.json"],
        "latin1.txt:3: not UTF-8",
        ["latin1.txt"],
    ),
    (
        "vocab: blank caption",
        lambda e: ["vocab.py", "build", f"{e['root']}/blank.txt", "--out", f"{e['root']}/v.json"],
        "blank.txt:2: blank line",
        [],
    ),
    (
        "vocab: zero min count",
        lambda e: ["vocab.py", "build", f"{e['root']}/caps.txt", "--min-count", "0", "--out", f"{e['root']}/v.json"],
        "0 must be at least 1",
        [],
    ),
    (
        "vocab: missing vocabulary",
        lambda e: ["vocab.py", "stats", "--vocab", f"{e['root']}/none.json", f"{e['root']}/caps.txt"],
        "none.json",
        [],
    ),
    ("vocab: no command", lambda e: ["vocab.py"], "the following arguments are required", []),
    # concepts
    (
        "concepts: into CVSE's folder",
        lambda e: ["concepts.py", "build", "--captions", f"{e['root']}/caps.txt", "--out", f"{e['root']}/cvse"],
        "holds CVSE's concept files",
        ["cvse/category_concepts.json"],
    ),
    (
        "concepts: over a graph",
        lambda e: ["concepts.py", "build", "--captions", f"{e['root']}/caps.txt", "--out", f"{e['root']}/own_concepts"],
        "already holds a concept graph",
        ["own_concepts/concepts.json"],
    ),
    (
        "concepts: negative count",
        lambda e: [
            "concepts.py",
            "build",
            "--captions",
            f"{e['root']}/caps.txt",
            "--concepts",
            "-5",
            "--out",
            f"{e['root']}/c2",
        ],
        "-5 must be at least 1",
        [],
    ),
    (
        "concepts: out is a file",
        lambda e: ["concepts.py", "build", "--captions", f"{e['root']}/caps.txt", "--out", f"{e['root']}/afile"],
        "is a file",
        ["afile"],
    ),
    (
        "concepts: missing folder",
        lambda e: ["concepts.py", "stats", f"{e['root']}/none"],
        "concept folder not found",
        [],
    ),
    (
        "concepts: threshold above 1",
        lambda e: ["concepts.py", "stats", e["concepts"], "--threshold", "3"],
        "3 must lie in [0, 1]",
        [],
    ),
    # feature extraction
    (
        "extract: cuda without cuda",
        lambda e: extract(e, "--device", "cuda"),
        "CUDA is not available",
        [],
    ),
    (
        "extract: zero batch",
        lambda e: extract(e, "--batch-size", "0"),
        "0 must be at least 1",
        [],
    ),
    (
        "extract: negative workers",
        lambda e: extract(e, "--workers", "-1"),
        "-1 must be at least 0",
        [],
    ),
    (
        "extract: bad split",
        lambda e: extract(e, "--split", "train"),
        "expected NAME=FILE",
        [],
    ),
    (
        "extract: missing captions",
        lambda e: extract(e, captions="none.csv"),
        "none.csv",
        [],
    ),
    (
        "extract: out is a file",
        lambda e: extract(e, out="afile"),
        "afile is a file, not a folder",
        ["afile"],
    ),
    # demo data and the benchmark
    (
        "demo: absurd size",
        lambda e: ["demo_data.py", "--root", f"{e['root']}/d", "--train", str(10**9)],
        "must be at least 1 and at most 100000",
        [],
    ),
    (
        "bench: report with fresh",
        lambda e: ["bench/bench_flickr8k.py", "--report", "--fresh", "--out", f"{e['root']}/bench"],
        "never deletes",
        ["bench/runs/coder_s0/result.json"],
    ),
    # retrieval
    (
        "retrieve: empty query",
        lambda e: ["retrieve.py", "--checkpoint", e["ckpt"], "--data_path", e["data"], "--query", "  "],
        "an empty query matches nothing",
        [],
    ),
    (
        "retrieve: zero k",
        lambda e: ["retrieve.py", "--checkpoint", e["ckpt"], "--data_path", e["data"], "--query", "a dog", "--k", "0"],
        "0 must be at least 1",
        [],
    ),
    (
        "retrieve: existing grid",
        lambda e: [
            "retrieve.py",
            "--checkpoint",
            e["ckpt"],
            "--data_path",
            e["data"],
            "--query",
            "a dog",
            "--images_dir",
            e["root"],
            "--grid",
            f"{e['root']}/grid.png",
        ],
        "exists",
        ["grid.png"],
    ),
    (
        "retrieve: grid of no image format",
        lambda e: [
            "retrieve.py",
            "--checkpoint",
            e["ckpt"],
            "--data_path",
            e["data"],
            "--query",
            "a dog",
            "--images_dir",
            e["root"],
            "--grid",
            f"{e['root']}/grid.txt",
        ],
        "cannot write a '.txt' file",
        [],
    ),
    (
        "retrieve: image out of range",
        lambda e: ["retrieve.py", "--checkpoint", e["ckpt"], "--data_path", e["data"], "--image", "999"],
        "has images 0..",
        [],
    ),
    (
        "retrieve: nothing asked",
        lambda e: ["retrieve.py", "--checkpoint", e["ckpt"], "--data_path", e["data"]],
        "give at least one --query or --image",
        [],
    ),
    (
        "retrieve: missing checkpoint",
        lambda e: ["retrieve.py", "--checkpoint", f"{e['root']}/none.pt", "--data_path", e["data"], "--query", "a dog"],
        "checkpoint file not found",
        [],
    ),
]


STARTS_TRAINING = {"NaN in the features"}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    """`python argv[0] argv[1:]` in this process; returns (exit status, stderr)."""
    old_argv = sys.argv
    sys.argv = [str(ROOT / argv[0]), *argv[1:]]
    code = 0
    try:
        runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = old_argv
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line_and_changes_nothing(env, case, capsys, monkeypatch):
    _, command, fragment, kept = case
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CUDA rows hold on a GPU machine too
    root = Path(env["root"])
    before = {name: _digest(root / name) for name in kept}
    shutil.rmtree(root / "new_run", ignore_errors=True)
    code, err = run_in_process(command(env), capsys)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert code != 0, err
    assert fragment in err, err
    assert "Traceback" not in err and len(lines) <= 2, err
    assert {name: _digest(root / name) for name in kept} == before
    if case[0] not in STARTS_TRAINING:  # a run that failed while training keeps its train.log
        assert not (root / "new_run").exists(), "a failed start left its run folder behind"


def test_ctrl_c_names_the_checkpoint_and_the_resume_command(env, tmp_path, ctrl_c):
    """SIGINT mid-training: one line with the last checkpoint and the command to resume, status
    130; the checkpoint loads and resuming from it works."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "train_f30k.py"),
        *env["demo"],
        *TINY,
        "--epochs",
        "50",
        "--checkpoint_every_steps",
        "1",
        "--run_dir",
        str(run_dir),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    deadline = time.time() + 120
    while not (run_dir / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"resume with python train_f30k.py --resume {run_dir / 'last.pt'}" in lines[0]
    assert "interrupted by the user" in (run_dir / "train.log").read_text()
    resumed = run_script(
        "train_f30k.py",
        "--resume",
        str(run_dir / "last.pt"),
        "--epochs",
        "1",
        "--test_split",
        "",
        "--progress",
        "false",
    )
    assert resumed.returncode == 0
    assert "resumed from" in (run_dir / "train.log").read_text()
