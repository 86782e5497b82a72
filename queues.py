"""MoCo's dictionary: FIFO queues of momentum keys, used as extra negatives.

One queue per kind of key ("image", "text", and the concept keys), all advancing in lockstep,
so that one row of `ids` gives the image id of the same slot in every queue. The entries are
registered buffers, so a checkpoint holds them. The fill level and the write position are
also kept as Python integers: the training step branches on them and slices by them, and
reading them back from a GPU tensor would stop the host at every step.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from torch import Tensor


class KeyQueues(nn.Module):
    """Queues of `size` entries of dimension `dim`, one per name in `names` (none: no queue)."""

    def __init__(self, names: Sequence[str], size: int, dim: int) -> None:
        super().__init__()
        self.names = list(names) if size > 0 else []
        self.size = size
        for name in self.names:
            self.register_buffer(name, torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size if self.names else 0,), -1, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.filled = 0  # host copy of `count`: entries written so far, at most size
        self.next_slot = 0  # host copy of `pointer`: where the next key goes

    def entries(self, name: str) -> Tensor:
        """The filled entries of one queue (a view, in slot order)."""
        return getattr(self, name)[: self.filled]

    def filled_ids(self) -> Tensor:
        return self.ids[: self.filled]

    def fraction_filled(self) -> float:
        """Fraction of the queues filled (0.0 without queues)."""
        return self.filled / self.size if self.names else 0.0

    @torch.no_grad()
    def push(self, keys: Mapping[str, Tensor], ids: Tensor) -> None:
        """Write a batch of keys (one tensor per queue, rows aligned with `ids`) at the write
        position, wrapping around; of a batch longer than the queues only its last rows stay."""
        total = ids.shape[0]
        kept = min(total, self.size)
        slots = (self.next_slot + total - kept + torch.arange(kept, device=self.ids.device)) % self.size
        for name in self.names:
            getattr(self, name)[slots] = keys[name][total - kept :].to(self.ids.device, torch.float32)
        self.ids[slots] = ids[total - kept :].to(self.ids.device)
        self.next_slot = (self.next_slot + total) % self.size
        self.filled = min(self.filled + total, self.size)
        self.pointer.fill_(self.next_slot)
        self.count.fill_(self.filled)

    def read_host_copies(self) -> None:
        """Set the host copies from the buffers: after a load, or after the buffers were
        overwritten (distributed.check_replicas); never per step."""
        self.filled, self.next_slot = int(self.count), int(self.pointer)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.read_host_copies()
