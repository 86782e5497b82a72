"""queues.KeyQueues against a Python-list ring buffer, and its host-side counters."""

import torch

from queues import KeyQueues


def test_push_matches_a_list_fifo_with_wraparound():
    queues = KeyQueues(["image", "text"], size=5, dim=3)
    ring = {name: [None] * 5 for name in ("image", "text", "ids")}
    slot, count, next_id = 0, 0, 0
    gen = torch.Generator().manual_seed(0)
    for size in (2, 3, 4, 7, 1, 5):  # 7 > 5: only the batch's last five rows stay
        ids = torch.arange(next_id, next_id + size)
        keys = {name: torch.randn(size, 3, generator=gen) for name in ("image", "text")}
        queues.push(keys, ids)
        for row in range(size):  # one row at a time, the obvious way
            for name in ("image", "text"):
                ring[name][slot] = keys[name][row]
            ring["ids"][slot] = int(ids[row])
            slot, count = (slot + 1) % 5, min(count + 1, 5)
        next_id += size
        assert queues.filled == count == int(queues.count) and queues.next_slot == slot == int(queues.pointer)
        assert queues.fraction_filled() == count / 5
        assert queues.filled_ids().tolist() == ring["ids"][:count]
        for name in ("image", "text"):
            assert torch.equal(queues.entries(name), torch.stack(ring[name][:count]))


def test_counters_come_back_from_a_state_dict():
    queues = KeyQueues(["image"], size=4, dim=2)
    queues.push({"image": torch.ones(6, 2)}, torch.arange(6))
    other = KeyQueues(["image"], size=4, dim=2)
    other.load_state_dict(queues.state_dict())
    assert (other.filled, other.next_slot) == (4, 2)
    assert set(queues.state_dict()) == {"image", "ids", "pointer", "count"}


def test_no_queues():
    for names, size in (([], 8), (["image"], 0)):
        queues = KeyQueues(names, size=size, dim=2)
        assert queues.names == [] and queues.ids.numel() == 0 and queues.fraction_filled() == 0.0
