"""Checkpoint safety: atomic writes, weights-only loading, strict and explained key matching."""

import collections
import errno
import os
import pickle
import signal

import pytest
import torch

import checkpoint
from utils import CoderError, atomic_write


def test_round_trip_and_marker(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint.save_checkpoint(path, {"model": {"w": torch.ones(2)}, "epoch": 3})
    state = checkpoint.load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint.save_checkpoint(path, {"epoch": 1})

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        checkpoint.save_checkpoint(path, {"epoch": 2, "bad": Unsaveable()})
    assert checkpoint.load_checkpoint(path)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(CoderError, match="not found"):
        checkpoint.load_checkpoint(tmp_path / "nope.pt")
    truncated = tmp_path / "truncated.pt"
    checkpoint.save_checkpoint(truncated, {"epoch": 1, "w": torch.zeros(1000)})
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(CoderError, match=r"truncated.pt: truncated or corrupt checkpoint \(\w+\); use another"):
        checkpoint.load_checkpoint(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("not weights")
    with pytest.raises(CoderError, match="not a checkpoint"):
        checkpoint.load_checkpoint(text)
    foreign = tmp_path / "foreign.pt"
    torch.save({"w": torch.zeros(1)}, foreign)
    with pytest.raises(CoderError, match="not a CODER checkpoint"):
        checkpoint.load_checkpoint(foreign)


def test_pickled_code_is_not_executed(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": checkpoint.CHECKPOINT_FORMAT, "x": Exploit()}, f)
    with pytest.raises(CoderError):
        checkpoint.load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    zipped = tmp_path / "evil_zip.pt"
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "x": Exploit()}, zipped)
    with pytest.raises(CoderError) as err:
        checkpoint.load_checkpoint(zipped)
    assert "refusing to load" in str(err.value) and "weights_only" not in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_strict_loading_names_every_mismatch():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = dict(module.state_dict())
    state["0.weight"] = torch.zeros(5, 3)
    del state["1.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CoderError) as err:
        checkpoint.load_state_strict(module, state, "ck.pt")
    message = str(err.value)
    assert "ck.pt" in message and "missing: 1.bias" in message
    assert "unexpected: extra.weight" in message and "shape mismatch: 0.weight" in message


def test_code_version_is_dirty_for_changed_code_not_for_a_rewritten_benchmark_record(tmp_path):
    """A benchmark rewrites its table (tracked, under bench/results) between its runs; the next
    run must still say which clean commit trained it. A changed source file must say +dirty."""
    import subprocess

    def git(*args):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True, capture_output=True
        )

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "results.md").write_text("table\n")
    (tmp_path / "model.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    clean = checkpoint.code_version(tmp_path)
    assert len(clean) == 40 and "+" not in clean
    (tmp_path / "bench" / "results" / "results.md").write_text("table with a new run\n")
    assert checkpoint.code_version(tmp_path) == clean
    (tmp_path / "model.py").write_text("x = 2\n")
    assert checkpoint.code_version(tmp_path) == clean + "+dirty"


def test_ctrl_c_mid_save_finishes_the_checkpoint_then_interrupts(tmp_path, ctrl_c):
    """Ctrl-C while torch.save is mid-archive: the write completes, then KeyboardInterrupt is
    raised (not the RuntimeError torch.save turns a cut archive into), the new checkpoint loads,
    and Ctrl-C's own handler is back in place."""
    path = tmp_path / "ck.pt"
    checkpoint.save_checkpoint(path, {"epoch": 1})

    class CtrlCWhilePickled:
        def __reduce__(self):
            os.kill(os.getpid(), signal.SIGINT)
            return (collections.OrderedDict, ())

    state = {"epoch": 2, "tripwire": CtrlCWhilePickled(), "w": torch.arange(50_000.0)}
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, state)
    loaded = checkpoint.load_checkpoint(path)
    assert loaded["epoch"] == 2 and torch.equal(loaded["w"], state["w"])
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_abandons_the_write_and_keeps_the_previous_checkpoint(tmp_path, ctrl_c):
    """Two Ctrl-Cs during a write: the second interrupts at once (a hung write can be left), the
    half-written file is removed and the previous checkpoint is untouched."""
    path = tmp_path / "ck.pt"
    checkpoint.save_checkpoint(path, {"epoch": 1})

    class TwoCtrlCs:
        def __reduce__(self):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            return (collections.OrderedDict, ())

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, {"epoch": 2, "tripwire": TwoCtrlCs()})
    assert checkpoint.load_checkpoint(path)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_process_that_ignores_ctrl_c_still_ignores_it_during_a_write(tmp_path):
    """A job started in the background of a script inherits SIGINT ignored: Ctrl-Cs during a
    write stay ignored (no deferred or second-Ctrl-C interrupt), and so does the process after."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        path = tmp_path / "ck.pt"

        class TwoCtrlCs:
            def __reduce__(self):
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
                return (collections.OrderedDict, ())

        checkpoint.save_checkpoint(path, {"epoch": 2, "tripwire": TwoCtrlCs()})
        assert checkpoint.load_checkpoint(path)["epoch"] == 2
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_that_a_writer_wraps_is_still_a_ctrl_c(tmp_path):
    """torch.save cut mid-archive raises a RuntimeError whose context is the KeyboardInterrupt:
    atomic_write raises the KeyboardInterrupt itself and leaves no temporary file."""

    def cut_mid_archive(f):
        f.write(b"PK")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("unexpected pos 243264 vs 243152")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "ck.pt", cut_mid_archive)
    assert os.listdir(tmp_path) == []


def test_a_full_disk_while_handling_a_ctrl_c_is_still_named(tmp_path):
    """A write made while a Ctrl-C is being handled fails for a full disk: the error names the
    file (the KeyboardInterrupt in its context is not taken for a new Ctrl-C)."""

    def fill(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        with pytest.raises(CoderError, match="ck.pt: cannot write"):
            atomic_write(tmp_path / "ck.pt", fill)
    assert os.listdir(tmp_path) == []
