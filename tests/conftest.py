"""Test setup: import the flat project scripts, and locate the optional shared data."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """`../shared/data`, or a clean skip where a fresh clone has none."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not found (only CI and the developers' machines have it)")
    return SHARED_DATA
