"""bench/profile_step.py's loader timing on a stand-in run: both settings are timed over the
asked number of batches, in the epoch's order, and the dataset's text states are put back."""

import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import profile_step  # noqa: E402


def test_time_loading_times_both_settings_and_restores_the_states():
    states = object()
    dataset = types.SimpleNamespace(text_states=states)
    seen, epochs = [], []

    class Loader:
        def __iter__(self):
            for index in range(100):
                seen.append((dataset.text_states, index))
                yield index

    run = types.SimpleNamespace(
        train_set=dataset, loader=Loader(), epoch=3, sampler=types.SimpleNamespace(set_epoch=epochs.append)
    )
    times = profile_step.time_loading(run, 5)
    assert set(times) == {"with text states", "without text states"}
    assert all(ms >= 0 for ms in times.values())
    assert dataset.text_states is states
    assert epochs == [3, 3, 3, 3]
    passes = [seen[i : i + 5] for i in range(0, len(seen), 5)]
    assert [[s for s, _ in p] for p in passes] == [[states] * 5, [None] * 5] * 2
    assert all([i for _, i in p] == list(range(5)) for p in passes)
