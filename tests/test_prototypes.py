"""prototypes.Prototypes against direct computations."""

import torch
import torch.nn.functional as F

from prototypes import Prototypes


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_ema_step_moves_assigned_prototypes_towards_their_mean():
    prototypes = Prototypes(16, 32, "random", "ema", momentum=0.5)
    emb = unit(4, 32)
    codes = torch.zeros(4, 16)
    codes[[0, 1, 2, 3], [3, 3, 7, 3]] = 1.0
    old = prototypes.weight.clone()
    prototypes.ema_step(emb, codes)
    want3 = F.normalize(0.5 * old[3] + 0.5 * emb[[0, 1, 3]].mean(0), dim=0)
    want7 = F.normalize(0.5 * old[7] + 0.5 * emb[2], dim=0)
    assert torch.allclose(prototypes.weight[3], want3, atol=1e-6)
    assert torch.allclose(prototypes.weight[7], want7, atol=1e-6)
    untouched = [i for i in range(16) if i not in (3, 7)]
    assert torch.equal(prototypes.weight[untouched], old[untouched])


def test_keys_init_waits_for_enough_rows_then_copies_distinct_ones():
    prototypes = Prototypes(6, 8, "keys", "ema", momentum=0.9)
    assert not prototypes.is_ready and not bool(prototypes.ready)
    assert not prototypes.draw_from(unit(5, 8)) and not prototypes.is_ready
    pool = unit(9, 8, seed=1) * 3.0
    assert prototypes.draw_from(pool) and prototypes.is_ready and bool(prototypes.ready)
    cosines = prototypes.weight @ F.normalize(pool, dim=-1).t()
    assert cosines.max(1).values.min() > 1 - 1e-6 and len(set(cosines.argmax(1).tolist())) == 6
    fresh = Prototypes(6, 8, "keys", "ema", momentum=0.9)
    fresh.load_state_dict(prototypes.state_dict())
    assert fresh.is_ready


def test_learned_prototypes_are_a_parameter_renormalised_on_request():
    learned = Prototypes(4, 8, "random", "learned", momentum=0.9)
    assert isinstance(learned.weight, torch.nn.Parameter) and learned.for_loss().requires_grad
    with torch.no_grad():
        learned.weight.mul_(3.0)
    learned.renormalise()
    assert torch.allclose(learned.weight.norm(dim=1), torch.ones(4), atol=1e-6)
    ema = Prototypes(4, 8, "random", "ema", momentum=0.9)
    assert not ema.for_loss().requires_grad and "weight" in dict(ema.named_buffers())
    assert ema.for_loss().data_ptr() != ema.weight.data_ptr()  # a copy: the EMA may move them before the backward
