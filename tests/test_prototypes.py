"""prototypes.Prototypes and QueueKernel against direct computations."""
import pytest
import torch
import torch.nn.functional as F

from prototypes import Prototypes, QueueKernel


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_ema_step_moves_assigned_prototypes_towards_their_mean():
    prototypes = Prototypes(16, 32, "random", "ema", momentum=0.5)
    emb = unit(4, 32)
    codes = torch.zeros(4, 16)
    codes[[0, 1, 2, 3], [3, 3, 7, 3]] = 1.0
    old = prototypes.weight.clone()
    moved = prototypes.ema_step(emb, codes)
    assert moved.nonzero().squeeze(1).tolist() == [3, 7]
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


@pytest.mark.parametrize("filled", [0, 3, 5])
def test_queue_kernel_updates_equal_a_full_recomputation(filled):
    size, epsilon = 5, 0.05
    kernel = QueueKernel(size, 4, epsilon)
    image, text, prototypes = unit(size, 8, seed=1), unit(size, 8, seed=2), unit(4, 8, seed=3)
    kernel.refresh(image, text, prototypes)

    def direct(queue, protos):
        return torch.exp((queue @ protos.t() - 1) / epsilon)

    image[1], text[1] = unit(8, seed=4), unit(8, seed=5)  # an entry replaced
    kernel.write_slots(torch.tensor([1]), image, text, prototypes)
    prototypes[2] = unit(8, seed=6)  # a prototype moved
    moved = torch.tensor([False, False, True, False])
    kernel.write_columns(moved, image[:filled], text[:filled], prototypes, at_most=2)  # one unmoved column too
    image_rows, text_rows = kernel.blocks(filled)
    assert torch.allclose(image_rows, direct(image[:filled], prototypes), rtol=1e-5)
    assert torch.allclose(text_rows, direct(text[:filled], prototypes), rtol=1e-5)
