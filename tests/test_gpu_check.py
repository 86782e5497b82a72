"""bench/gpu_check.sh on a CPU: its arguments, its refusal without CUDA, and the report it writes,
in a dry run and with a stand-in `python` (PYTHON=...) that plays each step's command."""

import json
import os
import re
import stat
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.sh"

# A stand-in interpreter: "CUDA is available"; the tests pass or fail as FAKE_TESTS says; the
# throughput benchmark prints two records; the Flickr8k benchmark writes a table in --report mode.
FAKE_PYTHON = f"""#!/usr/bin/env bash
case "$1" in
  -c) exit 0 ;;
  -) shift; exec {sys.executable} - "$@" ;;
  -m) echo "2 passed"; exit "${{FAKE_TESTS:-0}}" ;;
  bench/gpu_steps.py)
    echo '{{"check": "train_resume_bf16_bert", "device": "cuda", "ok": true, "seconds": 21.5}}'
    echo '{{"check": "step_without_waits_bigru", "device": "cuda", "ok": false, "seconds": 3.0, "error": "RuntimeError: called a synchronizing CUDA operation", "where": ["trainer.py:1 training_step", "rnn.py:2 pad_packed_sequence"]}}'
    exit "${{FAKE_STEPS:-0}}" ;;
  bench/bench_throughput.py)
    echo '{{"bench": "throughput", "precision": "bf16", "tf32": true, "captions_per_s": 4000.0, "step_s": 0.032, "f30k_epoch_min": 0.6, "peak_mem_gib": 20.5}}'
    echo 'a note'
    echo '{{"bench": "throughput", "precision": "fp32", "tf32": false, "captions_per_s": 1000.0, "step_s": 0.128, "f30k_epoch_min": 2.42, "peak_mem_gib": 30.0}}' ;;
  bench/bench_flickr8k.py)
    out=$(echo "$@" | sed 's/.*--out \\([^ ]*\\).*/\\1/')
    if [[ "$*" == *--report* ]]; then mkdir -p "$out"; echo "| # | configuration | rsum |" > "$out/results.md"; fi ;;
esac
"""


STEPS = ("cuda_steps", "cuda_tests", "throughput", "flickr8k")


def run(*args: str, python: str | None = None, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    if python:
        environment["PYTHON"] = python
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environment, timeout=60)


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "python"
    path.write_text(FAKE_PYTHON)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def table_rows(report: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split(" | ") for line in report.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_dry_run_writes_the_report_with_every_step_and_runs_nothing(tmp_path):
    (tmp_path / "f8k").mkdir()
    proc = run(
        "--dry-run",
        "--out",
        str(tmp_path / "out"),
        "--flickr8k",
        str(tmp_path / "f8k"),
        "--budget_minutes",
        "7",
        CUDA_VISIBLE_DEVICES="",
    )
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "Dry run: nothing was run." in report and "Budget: 7 minutes" in report
    rows = table_rows(report)
    assert [rows[step][0] for step in STEPS] == ["dry run: not run"] * 4
    assert rows["cuda_steps"][2] == "`python bench/gpu_steps.py --device cuda`"
    assert rows["cuda_tests"][2] == "`python -m pytest -q -rs tests -k cuda`"
    assert rows["throughput"][2] == "`python bench/bench_throughput.py --gpu`"
    assert rows["flickr8k"][2] == (
        f"`python bench/bench_flickr8k.py --device cuda --seeds 3 --data {tmp_path / 'f8k'} "
        f"--out {tmp_path / 'out' / 'flickr8k'}`"
    )
    assert not (tmp_path / "out" / "flickr8k").exists()


def test_skipped_steps_and_a_missing_dataset_are_named(tmp_path):
    proc = run("--dry-run", "--out", str(tmp_path), "--skip-tests", "--flickr8k", str(tmp_path / "none"))
    rows = table_rows((tmp_path / "gpu_check.md").read_text())
    assert proc.returncode == 0
    assert rows["cuda_tests"][0] == "skipped (--skip-tests)" and rows["throughput"][0] == "dry run: not run"
    assert rows["flickr8k"][0] == f"skipped (no Flickr8k folder at {tmp_path / 'none'}; pass --flickr8k DIR)"
    run("--dry-run", "--out", str(tmp_path), "--skip-throughput", "--skip-flickr8k", "--skip-steps")
    rows = table_rows((tmp_path / "gpu_check.md").read_text())
    assert rows["throughput"][0] == "skipped (--skip-throughput)" and rows["flickr8k"][0] == "skipped (--skip-flickr8k)"
    assert rows["cuda_steps"][0] == "skipped (--skip-steps)"


def test_each_step_runs_and_the_report_carries_its_numbers(tmp_path, fake_python):
    (tmp_path / "f8k").mkdir()
    out = tmp_path / "out"
    proc = run("--out", str(out), "--flickr8k", str(tmp_path / "f8k"), python=fake_python)
    assert proc.returncode == 0, proc.stderr
    report = (out / "gpu_check.md").read_text()
    rows = table_rows(report)
    assert [rows[step][0] for step in STEPS] == ["passed"] * 4
    assert rows["train_resume_bf16_bert"] == ["passed", "21.5", ""]
    assert rows["step_without_waits_bigru"] == [
        "FAILED",
        "3.0",
        "RuntimeError: called a synchronizing CUDA operation (at rnn.py:2 pad_packed_sequence < "
        "trainer.py:1 training_step)",
    ]
    assert rows["bf16"] == ["True", "4000.0", "0.032", "36 s", "20.5"]  # 0.6 min
    assert rows["fp32"] == ["False", "1000.0", "0.128", "145 s", "30.0"]
    assert "## Flickr8k (the runs that finished within the budget)\n\n| # | configuration | rsum |" in report
    assert "2 passed" in (out / "logs" / "cuda_tests.log").read_text() and "a note" in report


def test_no_step_may_run_past_the_budget(tmp_path, fake_python):
    proc = run("--out", str(tmp_path), "--skip-flickr8k", "--budget_minutes", "3", python=fake_python)
    limits = {m.group(1): int(m.group(2)) for m in re.finditer(r"== (\w+) \(at most (\d+) s\)", proc.stderr)}
    assert proc.returncode == 0 and set(limits) == {"cuda_steps", "cuda_tests", "throughput"}, proc.stderr
    assert 170 <= limits["cuda_steps"] <= 180 and limits["cuda_tests"] == 150 and limits["throughput"] <= 180


def test_a_failed_step_is_reported_and_sets_the_exit_status(tmp_path, fake_python):
    proc = run("--out", str(tmp_path), "--skip-flickr8k", python=fake_python, FAKE_TESTS="1", FAKE_STEPS="1")
    rows = table_rows((tmp_path / "gpu_check.md").read_text())
    assert proc.returncode == 1
    assert rows["cuda_tests"][0] == "FAILED (exit 1)" and rows["throughput"][0] == "passed"
    assert rows["cuda_steps"][0] == "FAILED (exit 1)"


def test_gpu_steps_without_cuda_refuses_in_one_line():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_steps.py")],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: gpu_steps.py: no CUDA GPU visible") and proc.stderr.count("\n") == 1


def test_gpu_steps_run_on_a_cpu(tmp_path):
    """The CPU part of bench/gpu_steps.py for real: a bf16 (CPU autocast) BERT run resumed after
    its BERT folder moved, and the warmed-up training steps of both text encoders."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_steps.py"), "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    records = {r["check"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert set(records) == {"train_resume_bf16_bert", "step_without_waits_bigru", "step_without_waits_bert"}
    assert records["train_resume_bf16_bert"]["amp_logged"] == "amp bfloat16"
    assert not (tmp_path / "train_resume_bf16_bert" / "bert").exists()
    assert all(r["ok"] for r in records.values())


def test_without_cuda_it_refuses_in_one_line_and_writes_nothing(tmp_path):
    proc = run("--out", str(tmp_path / "out"), CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: gpu_check.sh: no CUDA GPU visible") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "--out DIR is required"),
        (["--out"], "--out needs a folder"),
        (["--out", "{tmp}", "--budget_minutes", "ten"], "--budget_minutes ten: must be a whole number of at least 3"),
        (["--out", "{tmp}", "--budget_minutes", "2"], "--budget_minutes 2: must be a whole number of at least 3"),
        (["--out", "{tmp}/afile"], "is a file, not a folder"),
        (["--out", "{tmp}", "--gpus", "2"], "unknown argument '--gpus'"),
    ],
)
def test_bad_arguments_give_one_line(tmp_path, args, message):
    (tmp_path / "afile").write_text("")
    proc = run(*[a.format(tmp=tmp_path) for a in args], "--dry-run")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "gpu_check.md").exists()


def test_help_describes_the_options():
    proc = run("--help")
    assert proc.returncode == 0 and "--budget_minutes" in proc.stdout and "set -uo" not in proc.stdout
