"""Data-parallel training through the real train script (docs/distributed.md): `torchrun` with two gloo
processes on CPU, each with half of the global batch, against one process with the whole batch.

Without BatchNorm (PyTorch's SyncBatchNorm refuses CPU tensors) and without dropout (the bigru
model has none), two processes must follow the one-process run step by step: the same logged
losses (averaged over the processes) and the same final weights, queues and prototypes, up to
float rounding. A two-process run stopped after its first epoch and resumed from last.pt (still
with two processes) must end exactly where the uninterrupted two-process run ends.
(tests/test_model.py checks, at the model level, that with the full model every process holds
identical queues, prototypes and momentum weights.)
"""

import math
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch

import distributed
import trainer
from checkpoint import load_checkpoint
from conftest import TINY_TRAIN_ARGS, run_script, tiny_demo_args
from options import check_writable_dir
from prototypes import Prototypes
from queues import KeyQueues

ROOT = Path(__file__).resolve().parent.parent

# 24 images x 5 captions = 120 captions: 7 global batches of 16 per epoch; a queue of 40 keys
# (not a multiple of the batch, so the order in which gathered keys enter it matters).
TINY = [
    *TINY_TRAIN_ARGS,
    "--queue_size",
    "40",
    "--batch_size",
    "16",
    "--warmup_epochs",
    "1",
    "--lr_decay_epoch",
    "2",
    "--log_every",
    "1",
    "--batch_norm",
    "false",
    "--test_split",
    "",
    "--diag_every",
    "5",
]  # the per-term gradient norms must not change training
LOG_LINE = re.compile(r"\(global (\d+)\) (.*)$")


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    return tiny_demo_args(tmp_path_factory.mktemp("demo"), seed=1, num_train=24, num_eval=10)


def launch(*args, procs=1, check=True):
    return run_script("train_f30k.py", *args, procs=procs, check=check, timeout=240)


def logged_losses(run_dir: Path) -> dict[int, dict[str, float]]:
    """{global step: {loss name: value}} from train.log (one line per step with --log_every 1)."""
    steps: dict[int, dict[str, float]] = {}
    for line in (run_dir / "train.log").read_text().splitlines():
        match = LOG_LINE.search(line)
        if match:
            step = int(match.group(1))
            assert step not in steps, f"step {step} logged twice: only rank 0 may write the log"
            pairs = (item.split("=") for item in match.group(2).split())
            steps[step] = {k: float(v) for k, v in pairs if k.startswith("loss/")}
    return steps


@pytest.fixture(scope="module")
def runs(tiny_demo, tmp_path_factory):
    """One process and two processes, 2 epochs each, and a two-process run resumed after epoch 1."""
    root = tmp_path_factory.mktemp("runs")
    args = [*tiny_demo, *TINY]
    launch(*args, "--epochs", "2", "--run_dir", str(root / "one"))
    launch(*args, "--epochs", "2", "--checkpoint_every_steps", "3", "--run_dir", str(root / "two"), procs=2)
    launch(*args, "--epochs", "1", "--run_dir", str(root / "resumed"), procs=2)
    launch("--resume", str(root / "resumed" / "last.pt"), "--epochs", "2", procs=2)
    return {name: root / name for name in ("one", "two", "resumed")}


def test_two_processes_follow_one_process_step_by_step(runs):
    one, two = logged_losses(runs["one"]), logged_losses(runs["two"])
    assert sorted(one) == sorted(two) == list(range(1, 15))
    for step in one:
        assert one[step].keys() == two[step].keys() and "loss/loss" in one[step]
        for name, value in one[step].items():  # the log keeps 5 significant digits
            assert math.isclose(two[step][name], value, rel_tol=2e-4, abs_tol=1e-4), (step, name)
    assert (
        "x2" in (runs["two"] / "train.log").read_text() and "8 per process" in (runs["two"] / "train.log").read_text()
    )
    assert "disagree" not in (runs["two"] / "train.log").read_text()
    for run in ("one", "two"):
        assert (
            "gradient norms at step 10 (rank 0's batch): grad/image_encoder/dcl_instance="
            in (runs[run] / "train.log").read_text()
        )

    a, b = load_checkpoint(runs["one"] / "last.pt"), load_checkpoint(runs["two"] / "last.pt")
    assert a["global_step"] == b["global_step"] == 14
    assert a["model"].keys() == b["model"].keys() and "prototypes.weight" in a["model"]
    for name, value in a["model"].items():
        if value.is_floating_point():
            assert torch.allclose(b["model"][name], value, rtol=0, atol=1e-5), name
        else:
            assert torch.equal(b["model"][name], value), name  # queue ids and pointers: exactly
    assert len(a["rng"]) == 1 and len(b["rng"]) == 2
    assert not torch.equal(b["rng"][0]["torch"], b["rng"][1]["torch"])  # each process its own stream
    assert b["config"]["batch_size"] == 16 and b["config"]["dist_timeout"] > 0


def test_two_process_resume_matches_uninterrupted(runs):
    straight, resumed = load_checkpoint(runs["two"] / "last.pt"), load_checkpoint(runs["resumed"] / "last.pt")
    assert straight["global_step"] == resumed["global_step"] == 14 and resumed["epoch"] == 2
    assert straight["model"].keys() == resumed["model"].keys()
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert straight["best_rsum"] == resumed["best_rsum"]
    assert logged_losses(runs["resumed"]) == logged_losses(runs["two"])


@pytest.mark.parametrize("prototypes", [("learned", "keys"), ("learned", "random"), ("ema", "keys")])
def test_two_processes_train_learned_and_key_drawn_prototypes(tiny_demo, tmp_path, prototypes):
    """Prototypes drawn from keys after the first step (16 + 16 keys for 24 prototypes): until
    then no loss uses learned ones, which DDP must be told; afterwards the pseudo-label loss
    trains them, and every process holds the same prototypes."""
    update, init = prototypes
    run_dir = tmp_path / "run"
    launch(
        *tiny_demo,
        *TINY,
        "--epochs",
        "1",
        "--prototype_update",
        update,
        "--prototype_init",
        init,
        "--num_prototypes",
        "24",
        "--run_dir",
        str(run_dir),
        procs=2,
    )
    steps = logged_losses(run_dir)
    assert sorted(steps) == list(range(1, 8))
    assert ("loss/pseudo" in steps[1]) == (init == "random") and "loss/pseudo" in steps[2]
    assert "disagree" not in (run_dir / "train.log").read_text()
    state = load_checkpoint(run_dir / "last.pt")["model"]
    assert bool(state["prototypes.ready"])


def test_batch_not_divisible_by_processes_is_a_clear_error(monkeypatch):
    """Checked before the process group starts, on every process (torchrun sets WORLD_SIZE)."""
    from utils import CoderError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CoderError, match=r"--batch_size 15 \(the global batch\) is not divisible by the 2 processes"):
        trainer.train({"batch_size": 15, "device": "cpu"}, "f30k")


def test_sampler_shards_each_global_batch_into_contiguous_blocks():
    """With W processes, rank r's t-th batch is block r of the one-process t-th batch, so the
    gathered (rank-major) batch is the one-process batch in the same order; resuming part-way
    skips whole global batches on every rank."""
    n, global_batch = 103, 12
    single = distributed.ResumableSampler(n, world_size=1, rank=0, seed=4, batch_size=global_batch)
    single.set_epoch(3)
    order = list(single)
    assert len(order) == len(single) == (n // global_batch) * global_batch
    for world in (2, 3, 4):
        local = global_batch // world
        shards = []
        for rank in range(world):
            sampler = distributed.ResumableSampler(n, world_size=world, rank=rank, seed=4, batch_size=local)
            sampler.set_epoch(3)
            shards.append(list(sampler))
            assert len(shards[-1]) == len(sampler)
            sampler.set_epoch(3, skip_batches=5)
            assert list(sampler) == shards[-1][5 * local :] and len(sampler) == len(shards[-1]) - 5 * local
        gathered = [i for t in range(n // global_batch) for shard in shards for i in shard[t * local : (t + 1) * local]]
        assert gathered == order


class _Lines(list):
    def line(self, text):
        self.append(text)


def _replica_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    world = distributed.Dist("cpu", timeout_minutes=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        model.register_buffer("prototypes", torch.randn(5, 4))
        model[1].running_mean += rank  # per-process BatchNorm statistics are allowed to differ
        log = _Lines()
        distributed.check_replicas(model, world, log)
        clean = list(log)
        with torch.no_grad():
            model.prototypes[2, 1] += rank * 1e-7  # a rounding-level drift on rank 1 only
        distributed.check_replicas(model, world, log)
        model.add_module("queues", KeyQueues(["image"], 8, 4))
        model.add_module("clusters", Prototypes(6, 4, "keys", "ema", 0.9))
        for _ in range(1 + 2 * rank):  # rank 1 pushed two batches more, and drew its prototypes
            model.queues.push({"image": torch.ones(3, 4)}, torch.arange(3))
        if rank == 1:
            model.clusters.ready.fill_(True)
            model.clusters.is_ready = True
        distributed.check_replicas(model, world, log)
        means = world.mean({"a": torch.tensor(float(rank)), "b": torch.tensor(2.0 * rank)})
        host = {"filled": model.queues.filled, "next_slot": model.queues.next_slot, "ready": model.clusters.is_ready}
        torch.save(
            {"clean": clean, "lines": list(log), "state": model.state_dict(), "means": means, "host": host},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        world.close()


def test_replica_check_resyncs_from_rank_zero(tmp_path):
    """The check run at every checkpoint: BatchNorm statistics may differ; any other drift is
    logged by rank 0 and replaced by rank 0's values everywhere, host copies included (the
    queues' fill and write position, the prototypes' readiness)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_replica_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["clean"] == r1["clean"] == []  # (in training only rank 0's log writes)
    assert len(r0["lines"]) == 2 and "disagree on 1 tensors (prototypes)" in r0["lines"][0]
    assert "queues.image" in r0["lines"][1] and "clusters.ready" in r0["lines"][1]
    assert r1["host"] == r0["host"] == {"filled": 3, "next_slot": 3, "ready": False}
    assert torch.equal(r0["state"]["prototypes"], r1["state"]["prototypes"])
    assert not torch.equal(r0["state"]["1.running_mean"], r1["state"]["1.running_mean"])
    assert r0["means"] == r1["means"] == {"a": 0.5, "b": 1.0}


def test_amp_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert trainer._amp_dtype({"amp": "auto"}, cpu) is None  # CPU: off unless asked
    assert trainer._amp_dtype({"amp": "bf16"}, cpu) == torch.bfloat16  # CPU autocast
    assert trainer._amp_dtype({"amp": "fp16"}, cuda) == torch.float16
    assert trainer._amp_dtype({"amp": "off"}, cuda) is None
    from utils import CoderError

    with pytest.raises(CoderError, match="fp16 needs CUDA"):
        trainer._amp_dtype({"amp": "fp16"}, cpu)
    with pytest.raises(CoderError, match="--amp half: expected one of auto, bf16, fp16, off"):
        trainer._amp_dtype({"amp": "half"}, cpu)


def test_two_process_bf16_autocast_run(tiny_demo, runs, tmp_path):
    """The autocast path under DDP (bf16 on CPU): it trains, and its losses stay near fp32's."""
    launch(*tiny_demo, *TINY, "--epochs", "1", "--amp", "bf16", "--run_dir", str(tmp_path / "bf16"), procs=2)
    log = (tmp_path / "bf16" / "train.log").read_text()
    assert "amp bfloat16" in log
    bf16, fp32 = logged_losses(tmp_path / "bf16"), logged_losses(runs["two"])
    assert sorted(bf16) == list(range(1, 8))
    for step in bf16:
        assert math.isclose(bf16[step]["loss/loss"], fp32[step]["loss/loss"], rel_tol=0.05), step


def test_every_rank_may_check_the_same_new_run_dir_at_once(tmp_path, monkeypatch):
    """Each torchrun process checks --run_dir before training; a rank that finds the folder made
    (or removed again) by another rank's check between its own steps must still pass."""
    run_dir = tmp_path / "runs" / "a"
    real_mkdir = Path.mkdir

    def other_rank_made_it_first(self, *args, **kwargs):
        real_mkdir(self, *args, exist_ok=True)  # the other rank's mkdir wins the race
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", other_rank_made_it_first)
    check_writable_dir(run_dir, "--run_dir")
    monkeypatch.undo()
    assert run_dir.is_dir()  # made by "the other rank", so not ours to remove

    run_dir.rmdir()
    (tmp_path / "runs").rmdir()
    real_mkstemp, removed = tempfile.mkstemp, []

    def other_rank_removed_its_folder(*args, **kwargs):
        if not removed:  # the other rank's clean-up lands between our mkdir and our probe
            removed.append(True)
            run_dir.rmdir()
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", other_rank_removed_its_folder)
    check_writable_dir(run_dir, "--run_dir")
    assert removed and not (tmp_path / "runs").exists()  # our own trial folders are gone again
