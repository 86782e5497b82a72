"""Every benchmark script starts: `--help` imports all it needs at the top and prints its
options, so a renamed function or module breaks this test, not a researcher's benchmark run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if "add_argument" in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_benchmark_script_starts_and_prints_its_options(script):
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout and "--" in done.stdout
