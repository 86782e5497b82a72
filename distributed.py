"""Process layout for training: one process, or one per device under torchrun (DDP).

`Dist` sets up devices and the process group, `ResumableSampler` shards each global batch so
that W processes see exactly the one-process batches (and can resume mid-epoch), and
`check_replicas` verifies that state every process must share really is shared.
"""

from __future__ import annotations

import datetime
import gc
import inspect
import os
import sys
from typing import Any, Iterator, NoReturn

import torch
import torch.distributed as dist
from torch.utils.data import Sampler
from torch.utils.data.distributed import DistributedSampler

from options import CHOICES
from utils import CoderError


class Dist:
    """Process layout: a single process, or one process per device under torchrun.

    torchrun (single- or multi-node) sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT; the process group is initialised from them (NCCL on CUDA, gloo on CPU).
    `timeout_minutes` bounds how long a process waits at a collective, e.g. the other ranks
    at the broadcast of the validation score while rank 0 validates.
    """

    def __init__(self, device_pref: str, timeout_minutes: float) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_pref not in CHOICES["device"]:
            raise CoderError(f"--device {device_pref}: expected one of {', '.join(CHOICES['device'])}")
        use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
        if device_pref == "cuda" and not torch.cuda.is_available():
            raise CoderError("--device cuda was asked for, but CUDA is not available")
        if use_cuda and self.local_rank >= torch.cuda.device_count():
            raise CoderError(
                f"local rank {self.local_rank} has no GPU: this node has "
                f"{torch.cuda.device_count()}; use --nproc_per_node <= {torch.cuda.device_count()}"
            )
        self.device = torch.device(f"cuda:{self.local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not dist.is_initialized():
            kwargs: dict[str, Any] = {"timeout": datetime.timedelta(minutes=timeout_minutes)}
            if use_cuda:
                kwargs["device_id"] = self.device
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", **kwargs)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """The average over all processes of each scalar (one all-reduce for all of them)."""
        names = list(values)
        stacked = torch.stack([values[k].detach().float().reshape(()) for k in names])
        if self.world_size > 1:
            dist.all_reduce(stacked)
            stacked /= self.world_size
        return dict(zip(names, stacked.tolist()))

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of a picklable object, on every process."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Collect garbage first, so that a finished run's DDP reducer (which may sit in a
        reference cycle) lets go of the group now rather than at interpreter exit, where Gloo's
        teardown can abort a process that trained successfully."""
        if self.world_size > 1 and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()


def leave_worker(code: int = 0) -> NoReturn:
    """End a torchrun worker whose run has finished, skipping interpreter finalization.

    A Gloo worker thread that drops a tensor while the interpreter finalizes must take the GIL;
    Python ends such a thread, and the unwinding through C++ aborts the process ("terminate
    called without an active exception", pytorch/pytorch#190489) after all its work was done:
    torchrun then reports the run as failed. Everything the run writes is closed before this.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class ResumableSampler(Sampler[int]):
    """Per-epoch shuffled indices of one process, sharded by blocks of each global batch, that
    can start part-way through an epoch (a resumed run sees exactly the batches it had not seen).

    The epoch's permutation is DistributedSampler's (seed + epoch, the same on every process).
    Global batch t is permutation[t*B : (t+1)*B] whatever the number of processes W, and rank r
    takes its r-th contiguous block of B/W indices. DistributedSampler's own sharding would
    interleave (rank r takes r, r+W, ...): the same global batch as a set, but gathered keys in
    rank-major order would then enter the queues in another order than with one process. With
    blocks, the gathered batch is exactly the one-process batch, in the same order, so W
    processes follow the one-process run (up to float rounding), and a run may even be resumed
    with another number of processes on the same data order. The trailing partial global
    batch is dropped.
    """

    def __init__(self, dataset_size: int, world_size: int, rank: int, seed: int, batch_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.base = DistributedSampler(
            range(dataset_size), num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True
        )
        self.world_size, self.rank = world_size, rank
        self.batch_size = batch_size  # per process
        self.num_batches = dataset_size // (batch_size * world_size)
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[int]:
        order = list(self.base)
        global_batch, local = self.batch_size * self.world_size, self.batch_size
        for t in range(self.skip_batches, self.num_batches):
            start = t * global_batch + self.rank * local
            yield from order[start : start + local]

    def __len__(self) -> int:
        return max(0, self.num_batches - self.skip_batches) * self.batch_size


def ddp_buffer_kwargs() -> dict[str, bool]:
    """DDP arguments for: buffers broadcast from rank 0 once at construction (so every process
    starts with rank 0's queues and prototypes), never at each forward (the model keeps them
    equal by construction). Newer PyTorch spells this forward_sync_buffers=False;
    broadcast_buffers=False (older PyTorch) also skips the construction-time broadcast."""
    if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def must_agree(name: str) -> bool:
    """State every process must hold identically: weights, momentum weights, queues,
    prototypes. BatchNorm running statistics are per process unless SyncBatchNorm (CUDA)."""
    return not name.endswith(("running_mean", "running_var", "num_batches_tracked"))


def check_replicas(raw_model: torch.nn.Module, world: Dist, log: Any) -> None:
    """Compare a fingerprint of every tensor that must agree across processes; if any differs
    (a bug or a non-deterministic kernel), log it and copy rank 0's state to every process."""
    if world.world_size == 1:
        return
    state = {k: v for k, v in raw_model.state_dict().items() if must_agree(k)}
    prints = torch.stack([torch.stack([v.double().sum(), v.double().abs().sum()]) for v in state.values()])
    prints = prints.to(world.device)
    everyone = [torch.empty_like(prints) for _ in range(world.world_size)]
    dist.all_gather(everyone, prints)
    differ = torch.stack([(p != everyone[0]).any(1) for p in everyone]).any(0).tolist()
    if any(differ):
        names = [k for k, d in zip(state, differ) if d]
        log.line(
            f"warning: processes disagree on {len(names)} tensors ({', '.join(names[:6])}); re-synchronised from rank 0"
        )
        for name in names:  # (tensors derived from others, like a cached kernel, are among them if they differ)
            dist.broadcast(state[name], src=0)
        for module in raw_model.modules():  # host copies of what was overwritten (queue position, readiness)
            if hasattr(module, "read_host_copies"):
                module.read_host_copies()
