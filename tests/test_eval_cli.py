"""eval_f30k.py / eval_coco.py on tiny trained checkpoints: the printed and saved metrics equal a
direct computation (docs/method.md's similarity S and the ranks by per-query loops, from
test_evaluation.py), ensembles average similarity matrices, --sweep-mu picks mu on dev."""

import json
import subprocess
import sys

import pytest

import data
import evaluation
from checkpoint import load_for_inference
from conftest import ROOT, TINY_TRAIN_ARGS, run_script, tiny_demo_args
from test_evaluation import direct_similarity, naive_metrics

TINY = [*TINY_TRAIN_ARGS, "--queue_size", "96", "--batch_size", "32", "--epochs", "1", "--test_split", ""]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two checkpoints (seeds 0 and 1) from one tiny epoch each of the real training script."""
    root = tmp_path_factory.mktemp("eval")
    demo = tiny_demo_args(root, seed=3, num_train=160, num_eval=30)
    checkpoints = []
    for seed in (0, 1):
        run_script("train_f30k.py", *demo, *TINY, "--seed", str(seed), "--run_dir", str(root / f"run{seed}"))
        checkpoints.append(str(root / f"run{seed}" / "best.pt"))
    return {"checkpoints": checkpoints, "data_path": demo[1]}


def direct_sims(checkpoint, data_path, split_name, mu):
    model, tokenizer, graph, _ = load_for_inference(checkpoint)
    split = data.load_split(data_path, split_name)
    emb = evaluation.encode_split(model, split, tokenizer, graph, "cpu")
    return direct_similarity(emb, mu).numpy()


def test_single_checkpoint_and_json(runs, tmp_path, capsys):
    out = tmp_path / "m.json"
    evaluation.main(
        ["--checkpoint", runs["checkpoints"][0], "--json", str(out), "--workers", "0", "--mu", "0.3"], "f30k"
    )
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    want = naive_metrics(direct_sims(runs["checkpoints"][0], runs["data_path"], "test", 0.3), 5)
    assert saved["mu"] == 0.3 and saved["split"] == "test"
    assert saved["metrics"] == pytest.approx(want, abs=1e-9)
    assert f"{want['rsum']:8.2f}".strip() in printed and "image->text" in printed


def test_ensemble_averages_similarities(runs, tmp_path):
    out = tmp_path / "e.json"
    evaluation.main(["--checkpoint", *runs["checkpoints"], "--json", str(out), "--workers", "0"], "f30k")
    sims = [direct_sims(c, runs["data_path"], "test", 0.15) for c in runs["checkpoints"]]
    want = naive_metrics((sims[0] + sims[1]) / 2, 5)
    assert json.loads(out.read_text())["metrics"] == pytest.approx(want, abs=1e-4)


def test_sweep_mu_picks_the_best_dev_mu(runs, tmp_path):
    out = tmp_path / "s.json"
    evaluation.main(
        ["--checkpoint", runs["checkpoints"][0], "--sweep-mu", "--json", str(out), "--workers", "0"], "f30k"
    )
    result = json.loads(out.read_text())
    table = {float(m): r for m, r in result["mu_sweep"].items()}
    assert len(table) == 21 and result["mu"] == max(table, key=lambda m: (table[m], -m))
    dev = naive_metrics(direct_sims(runs["checkpoints"][0], runs["data_path"], "dev", 0.5), 5)
    assert table[0.5] == pytest.approx(dev["rsum"], abs=1e-4)


def test_coco_script_and_bad_input(runs, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval_coco.py"),
            "--checkpoint",
            runs["checkpoints"][0],
            "--split",
            "test",
            "--workers",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rsum" in proc.stdout  # 30 images: no 1K/5K folds, one table
    corrupt = tmp_path / "bad.pt"
    corrupt.write_bytes(b"not a checkpoint")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval_f30k.py"), "--checkpoint", str(corrupt)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "bad.pt" in proc.stderr
    assert "Traceback" not in proc.stderr
