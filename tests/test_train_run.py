"""End-to-end training runs on a tiny demo dataset, through the real train script.

The key property: a run killed with SIGKILL in the middle of an epoch and resumed from its
last step checkpoint ends with exactly the weights and metrics of an uninterrupted run.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import evaluation
from checkpoint import load_checkpoint, load_for_inference
from conftest import ROOT, TINY_TRAIN_ARGS, run_script, tiny_demo_args
from test_evaluation import direct_similarity, naive_metrics

TINY = [
    *TINY_TRAIN_ARGS,
    "--queue_size",
    "96",
    "--batch_size",
    "32",
    "--warmup_epochs",
    "1",
    "--lr_decay_epoch",
    "2",
    "--log_every",
    "5",
]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    return tiny_demo_args(tmp_path_factory.mktemp("demo"), seed=1, num_train=160, num_eval=30)


def run_train(*args, check=True):
    return run_script("train_f30k.py", *args, check=check)


def test_demo_style_run_writes_everything(tiny_demo, tmp_path):
    run_dir = tmp_path / "run"
    run_train(*tiny_demo, *TINY, "--epochs", "2", "--run_dir", str(run_dir))
    assert {"best.pt", "last.pt", "config.json", "train.log", "test_metrics.json"} <= {
        p.name for p in run_dir.iterdir()
    }
    assert any((run_dir / "tensorboard").iterdir())
    state = load_checkpoint(run_dir / "last.pt")
    assert state["epoch"] == 2 and state["step_in_epoch"] == 0
    assert state["config"]["embed_dim"] == 32 and state["code_version"]
    assert state["model"]["queues.count"].item() > 0
    best = load_checkpoint(run_dir / "best.pt")  # records its own score, so resuming from it keeps the bar
    rsums = [
        float(re.search(r" rsum=([0-9.]+)", line).group(1))
        for line in (run_dir / "train.log").read_text().splitlines()
        if "validation at step" in line
    ]
    assert best["best_rsum"] == state["best_rsum"] and round(best["best_rsum"], 2) == max(rsums)
    model, tokenizer, graph, config = load_for_inference(run_dir / "best.pt")
    split = data.load_split(tiny_demo[1], "test")
    emb = evaluation.encode_split(model, split, tokenizer, graph, "cpu")
    want = naive_metrics(direct_similarity(emb, config["mu"]).numpy(), split.captions_per_image)
    tested = json.loads((run_dir / "test_metrics.json").read_text())
    instance = naive_metrics(direct_similarity(emb, 0.0).numpy(), split.captions_per_image)["rsum"]
    assert tested.pop("instance_rsum") == pytest.approx(instance, abs=1e-6)  # the instance embeddings alone
    assert tested == pytest.approx(want, abs=1e-6)
    log = (run_dir / "train.log").read_text()
    assert "validation at step" in log and "loss/loss=" in log and "code " in log


def test_existing_run_folder_is_not_overwritten(tiny_demo, tmp_path):
    run_dir = tmp_path / "run"
    run_train(*tiny_demo, *TINY, "--epochs", "1", "--run_dir", str(run_dir), "--test_split", "")
    before = (run_dir / "last.pt").read_bytes()
    proc = run_train(*tiny_demo, *TINY, "--epochs", "1", "--run_dir", str(run_dir), check=False)
    assert proc.returncode == 2
    assert "already holds another run's" in proc.stderr and "Traceback" not in proc.stderr
    assert (run_dir / "last.pt").read_bytes() == before


def test_bad_input_is_one_line(tiny_demo, tmp_path):
    proc = run_train(*tiny_demo, *TINY, "--learning_rate", "3", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown option --learning_rate")
    proc = run_train(*tiny_demo[:1], str(tmp_path / "missing"), *tiny_demo[2:], *TINY, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "missing" in proc.stderr


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tiny_demo, tmp_path):
    args = [*tiny_demo, *TINY, "--epochs", "3", "--checkpoint_every_steps", "1"]
    run_train(*args, "--run_dir", str(tmp_path / "straight"))

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train_f30k.py"), *args, "--run_dir", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    log = killed / "train.log"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and "step checkpoint saved: epoch 2 step 2 " in log.read_text():
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed mid-epoch"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted = load_checkpoint(killed / "last.pt")
    assert interrupted["epoch"] == 1 and 0 < interrupted["step_in_epoch"], "not killed mid-epoch"

    run_train("--resume", str(killed / "last.pt"))
    straight, resumed = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(killed / "last.pt")
    assert straight["global_step"] == resumed["global_step"]
    assert straight["model"].keys() == resumed["model"].keys()
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert straight["best_rsum"] == resumed["best_rsum"]
    assert json.loads((tmp_path / "straight" / "test_metrics.json").read_text()) == json.loads(
        (killed / "test_metrics.json").read_text()
    )
