"""The prototypes of CODER's online clustering ([R], docs/method.md).

`Prototypes` holds K_p unit vectors: drawn at random, or ("keys") copied from K_p momentum keys
once that many exist, with the pseudo-label loss off until then; moved after each step by an
EMA towards the embeddings assigned to them, or ("learned") trained by the pseudo-label loss
and re-normalised (SwAV). Updates use gathered data only, so every process computes the same
values; where a kernel's summation order may differ (CUDA's index_add_), rank 0's result is
broadcast.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from encoders import l2norm


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Prototypes(nn.Module):
    """K_p prototypes of dimension `dim`; `weight` is a buffer ("ema") or a parameter ("learned").

    `is_ready` (host copy of the `ready` buffer) says whether the pseudo-label loss may use them:
    from the start with init "random", after `draw_from` succeeded with init "keys"."""

    def __init__(self, count: int, dim: int, init: str, update: str, momentum: float) -> None:
        super().__init__()
        self.learned = update == "learned"
        self.momentum = momentum
        weight = l2norm(torch.randn(count, dim))
        if self.learned:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)
        self.register_buffer("ready", torch.tensor(init == "random"))
        self.is_ready = init == "random"

    @property
    def count(self) -> int:
        return self.weight.shape[0]

    def for_loss(self) -> Tensor:
        """The prototypes as the pseudo-label loss sees them: the parameter when learned, else a
        copy, which the loss keeps for its backward while the EMA moves the prototypes."""
        return self.weight if self.learned else self.weight.clone()

    @torch.no_grad()
    def draw_from(self, pool: Tensor) -> bool:
        """Init "keys": become `count` rows of `pool` drawn at random (rank 0's draw on every
        process), if it has that many; returns whether they are ready now."""
        if pool.shape[0] < self.count:
            return False
        chosen = pool[torch.randperm(pool.shape[0])[: self.count].to(pool.device)]
        self.weight.copy_(l2norm(chosen))
        if _world_size() > 1:
            dist.broadcast(self.weight.data, src=0)
        self.ready.fill_(True)
        self.is_ready = True
        return True

    @torch.no_grad()
    def ema_step(self, embeddings: Tensor, codes: Tensor) -> None:
        """Each prototype moves towards the mean of the embeddings whose code peaks at it:
        c <- l2norm(rho·c + (1-rho)·mean), rho = momentum; the others stay."""
        assigned = codes.argmax(1)
        sums = torch.zeros_like(self.weight).index_add_(0, assigned, embeddings)
        counts = torch.zeros(self.count, device=assigned.device).index_add_(0, assigned, torch.ones_like(codes[:, 0]))
        hit = counts > 0
        rho = self.momentum
        # Written with `where`, not a masked assignment, so that the step does not wait for the device.
        moved = l2norm(rho * self.weight + (1 - rho) * sums / counts.clamp_min(1)[:, None])
        self.weight.copy_(torch.where(hit[:, None], moved, self.weight))
        if _world_size() > 1:  # rank 0's prototypes, exactly
            dist.broadcast(self.weight, src=0)

    @torch.no_grad()
    def renormalise(self) -> None:
        """Learned prototypes back onto the unit sphere after the optimizer moved them."""
        self.weight.copy_(l2norm(self.weight))

    def read_host_copies(self) -> None:
        """Set `is_ready` from the buffer: after a load, or after the buffers were overwritten
        (distributed.check_replicas); never per step."""
        self.is_ready = bool(self.ready)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.read_host_copies()
