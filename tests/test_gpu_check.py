"""bench/gpu_check.sh on a CPU: its arguments, its refusal without CUDA, and the report it writes,
in a dry run and with a stand-in `python` (PYTHON=...) that plays each step's command."""
import os
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
  bench/bench_throughput.py)
    echo '{{"bench": "throughput", "precision": "bf16", "tf32": true, "captions_per_s": 4000.0, "step_s": 0.032, "f30k_epoch_min": 0.6, "peak_mem_gib": 20.5}}'
    echo 'a note'
    echo '{{"bench": "throughput", "precision": "fp32", "tf32": false, "captions_per_s": 1000.0, "step_s": 0.128, "f30k_epoch_min": 2.42, "peak_mem_gib": 30.0}}' ;;
  bench/bench_flickr8k.py)
    out=$(echo "$@" | sed 's/.*--out \\([^ ]*\\).*/\\1/')
    if [[ "$*" == *--report* ]]; then mkdir -p "$out"; echo "| # | configuration | rsum |" > "$out/results.md"; fi ;;
esac
"""


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
    proc = run("--dry-run", "--out", str(tmp_path / "out"), "--flickr8k", str(tmp_path / "f8k"),
               "--budget_minutes", "7", CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "Dry run: nothing was run." in report and "Budget: 7 minutes" in report
    rows = table_rows(report)
    assert [rows[step][0] for step in ("cuda_tests", "throughput", "flickr8k")] == ["dry run: not run"] * 3
    assert rows["cuda_tests"][2] == "`python -m pytest -q -rs tests -k cuda`"
    assert rows["throughput"][2] == "`python bench/bench_throughput.py --gpu`"
    assert rows["flickr8k"][2] == (f"`python bench/bench_flickr8k.py --device cuda --seeds 3 --data {tmp_path / 'f8k'} "
                                   f"--out {tmp_path / 'out' / 'flickr8k'}`")
    assert not (tmp_path / "out" / "flickr8k").exists()


def test_skipped_steps_and_a_missing_dataset_are_named(tmp_path):
    proc = run("--dry-run", "--out", str(tmp_path), "--skip-tests", "--flickr8k", str(tmp_path / "none"))
    rows = table_rows((tmp_path / "gpu_check.md").read_text())
    assert proc.returncode == 0
    assert rows["cuda_tests"][0] == "skipped (--skip-tests)" and rows["throughput"][0] == "dry run: not run"
    assert rows["flickr8k"][0] == f"skipped (no Flickr8k folder at {tmp_path / 'none'}; pass --flickr8k DIR)"
    run("--dry-run", "--out", str(tmp_path), "--skip-throughput", "--skip-flickr8k")
    rows = table_rows((tmp_path / "gpu_check.md").read_text())
    assert rows["throughput"][0] == "skipped (--skip-throughput)" and rows["flickr8k"][0] == "skipped (--skip-flickr8k)"


def test_each_step_runs_and_the_report_carries_its_numbers(tmp_path, fake_python):
    (tmp_path / "f8k").mkdir()
    out = tmp_path / "out"
    proc = run("--out", str(out), "--flickr8k", str(tmp_path / "f8k"), python=fake_python)
    assert proc.returncode == 0, proc.stderr
    report = (out / "gpu_check.md").read_text()
    rows = table_rows(report)
    assert [rows[step][0] for step in ("cuda_tests", "throughput", "flickr8k")] == ["passed"] * 3
    assert rows["bf16"] == ["True", "4000.0", "0.032", "36 s", "20.5"]  # 0.6 min
    assert rows["fp32"] == ["False", "1000.0", "0.128", "145 s", "30.0"]
    assert "## Flickr8k (the runs that finished within the budget)\n\n| # | configuration | rsum |" in report
    assert "2 passed" in (out / "logs" / "cuda_tests.log").read_text() and "a note" in report


def test_a_failed_step_is_reported_and_sets_the_exit_status(tmp_path, fake_python):
    proc = run("--out", str(tmp_path), "--skip-flickr8k", python=fake_python, FAKE_TESTS="1")
    rows = table_rows((tmp_path / "gpu_check.md").read_text())
    assert proc.returncode == 1
    assert rows["cuda_tests"][0] == "FAILED (exit 1)" and rows["throughput"][0] == "passed"


def test_without_cuda_it_refuses_in_one_line_and_writes_nothing(tmp_path):
    proc = run("--out", str(tmp_path / "out"), CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: gpu_check.sh: no CUDA GPU visible") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    ([], "--out DIR is required"),
    (["--out"], "--out needs a folder"),
    (["--out", "{tmp}", "--budget_minutes", "ten"], "--budget_minutes ten: must be a whole number of at least 3"),
    (["--out", "{tmp}", "--budget_minutes", "2"], "--budget_minutes 2: must be a whole number of at least 3"),
    (["--out", "{tmp}/afile"], "is a file, not a folder"),
    (["--out", "{tmp}", "--gpus", "2"], "unknown argument '--gpus'"),
])
def test_bad_arguments_give_one_line(tmp_path, args, message):
    (tmp_path / "afile").write_text("")
    proc = run(*[a.format(tmp=tmp_path) for a in args], "--dry-run")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "gpu_check.md").exists()


def test_help_describes_the_options():
    proc = run("--help")
    assert proc.returncode == 0 and "--budget_minutes" in proc.stdout and "set -uo" not in proc.stdout
