"""loss.py against deliberately naive references: explicit Python loops over tiny float64 batches."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loss import (
    Pairs,
    dcl_loss,
    dcl_negative_log_weights,
    pseudo_label_loss,
    sinkhorn_kernel,
    sinkhorn_knopp,
    symmetric_dcl,
    triplet_loss,
)

# DCL's weights as written: one softmax over every negative, none dropped.
PLAIN = dict(beta_adaptive=False, weight_groups="joint", false_negative_threshold=0.0)


def unit(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def naive_dcl(q, k, queue, q_ids, k_ids, queue_ids, pos_index, tau, beta) -> float:
    """DCL written out (docs/method.md): weights |N_i|·softmax(β s) over the negatives, then
    -log(pos / (pos + Σ w e^{s/τ}))."""
    losses = []
    for i in range(len(q)):
        negatives = [k[j] for j in range(len(k)) if int(k_ids[j]) != int(q_ids[i])]
        negatives += [queue[j] for j in range(len(queue)) if int(queue_ids[j]) != int(q_ids[i])]
        sims = [dot(q[i], n) for n in negatives]
        norm = sum(math.exp(beta * s) for s in sims)
        weights = [len(sims) * math.exp(beta * s) / norm for s in sims]
        pos = math.exp(dot(q[i], k[int(pos_index[i])]) / tau)
        losses.append(-math.log(pos / (pos + sum(w * math.exp(s / tau) for w, s in zip(weights, sims)))))
    return sum(losses) / len(losses)


def naive_infonce(q, k, queue, q_ids, queue_ids, tau) -> float:
    """Momentum InfoNCE: cross-entropy of the positive among positive + unmasked negatives."""
    total = 0.0
    for i in range(len(q)):
        logits = [dot(q[i], k[i]) / tau]
        logits += [dot(q[i], k[j]) / tau for j in range(len(k)) if int(q_ids[j]) != int(q_ids[i])]
        logits += [dot(q[i], queue[j]) / tau for j in range(len(queue)) if int(queue_ids[j]) != int(q_ids[i])]
        total += -logits[0] + math.log(sum(math.exp(x) for x in logits))
    return total / len(q)


@pytest.fixture
def dcl_case():
    """6 queries (two share image 7, like two captions of one image), a queue of 9 with ids
    that collide with some queries."""
    q, k, queue = unit(6, 5, seed=0), unit(6, 5, seed=1), unit(9, 5, seed=2)
    q_ids = torch.tensor([7, 7, 1, 2, 3, 4])
    queue_ids = torch.tensor([7, 1, 1, 9, 9, 2, 5, 6, 8])
    return q, k, queue, q_ids, queue_ids


@pytest.mark.parametrize("tau,beta", [(0.05, 10.0), (0.1, 2.0), (0.5, 0.0)])
def test_dcl_matches_naive_reference(dcl_case, tau, beta):
    q, k, queue, q_ids, queue_ids = dcl_case
    got = dcl_loss(q, k, queue, q_ids, queue_ids, tau=tau, beta=beta, **PLAIN)
    want = naive_dcl(q, k, queue, q_ids, q_ids, queue_ids, range(6), tau, beta)
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_dcl_empty_queue(dcl_case):
    q, k, _, q_ids, _ = dcl_case
    empty, no_ids = torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    got = dcl_loss(q, k, empty, q_ids, no_ids, 0.05, 10.0, **PLAIN)
    want = naive_dcl(q, k, empty, q_ids, q_ids, no_ids, range(6), 0.05, 10.0)
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_dcl_beta_zero_is_infonce(dcl_case):
    q, k, queue, q_ids, queue_ids = dcl_case
    got = dcl_loss(q, k, queue, q_ids, queue_ids, tau=0.07, beta=0.0, **PLAIN)
    assert got.item() == pytest.approx(naive_infonce(q, k, queue, q_ids, queue_ids, 0.07), abs=1e-6)


def test_dcl_masked_keys_have_no_influence(dcl_case):
    q, k, queue, q_ids, queue_ids = dcl_case
    base = dcl_loss(q[:2], k[:2], queue, q_ids[:2], queue_ids, 0.05, 10.0, **PLAIN)  # both queries have image 7
    changed = queue.clone()
    changed[queue_ids == 7] = unit(int((queue_ids == 7).sum()), 5, seed=9)
    assert dcl_loss(q[:2], k[:2], changed, q_ids[:2], queue_ids, 0.05, 10.0, **PLAIN).item() == pytest.approx(
        base.item(), abs=1e-12
    )
    # A key of the same image in the batch (row 1 for query 0) is masked as well: moving it
    # changes query 1's positive only, so query 0's loss alone stays put.
    moved = k.clone()
    moved[1] = unit(5, seed=10)
    first = dict(tau=0.05, beta=10.0, k_ids=q_ids[:2], pos_index=torch.tensor([0]), **PLAIN)
    alone = dcl_loss(q[:1], k[:2], queue, q_ids[:1], queue_ids, **first)
    alone_moved = dcl_loss(q[:1], moved[:2], queue, q_ids[:1], queue_ids, **first)
    assert alone_moved.item() == pytest.approx(alone.item(), abs=1e-12)


def test_dcl_without_any_negative_is_zero_and_finite():
    q, k = unit(2, 4, seed=3), unit(2, 4, seed=4)
    ids = torch.tensor([5, 5])
    q.requires_grad_(True)
    loss = dcl_loss(q, k, k.detach().clone(), ids, ids, 0.05, 10.0, **PLAIN)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(q.grad).all()


def test_dcl_weights_average_one_and_follow_formula(dcl_case):
    q, k, queue, q_ids, queue_ids = dcl_case
    sims = q @ torch.cat([k, queue]).t()
    mask = torch.cat([q_ids, queue_ids])[None, :] != q_ids[:, None]
    weights = dcl_negative_log_weights(sims, mask, beta=10.0).exp()
    for i in range(len(q)):
        negatives = [j for j in range(sims.shape[1]) if mask[i, j]]
        assert sum(float(weights[i, j]) for j in negatives) / len(negatives) == pytest.approx(1.0, abs=1e-12)
        norm = sum(math.exp(10.0 * float(sims[i, j])) for j in negatives)
        for j in range(sims.shape[1]):
            want = len(negatives) * math.exp(10.0 * float(sims[i, j])) / norm if mask[i, j] else 0.0
            assert float(weights[i, j]) == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_dcl_gradient_treats_weights_as_constants(dcl_case):
    """Autograd through the naive formula with detached weights gives the same gradient."""
    q, k, queue, q_ids, queue_ids = dcl_case
    tau, beta = 0.1, 5.0
    q1 = q.clone().requires_grad_(True)
    dcl_loss(q1, k, queue, q_ids, queue_ids, tau=tau, beta=beta, **PLAIN).backward()
    q2 = q.clone().requires_grad_(True)
    total = 0
    keys, ids = torch.cat([k, queue]), torch.cat([q_ids, queue_ids])
    for i in range(len(q)):
        neg = keys[ids != q_ids[i]]
        sims = neg @ q2[i]
        weights = (len(neg) * torch.softmax(beta * sims, 0)).detach()
        pos = torch.exp(q2[i] @ k[i] / tau)
        total = total - torch.log(pos / (pos + (weights * torch.exp(sims / tau)).sum()))
    (total / len(q)).backward()
    assert torch.allclose(q1.grad, q2.grad, atol=1e-9)
    assert k.grad is None and queue.grad is None


def test_dcl_gathered_keys_with_pos_index(dcl_case):
    """Two 'processes' with 3 local queries each against all 6 keys average to the 1-process loss."""
    q, k, queue, q_ids, queue_ids = dcl_case
    full = dcl_loss(q, k, queue, q_ids, queue_ids, 0.05, 10.0, **PLAIN)
    halves = [
        dcl_loss(
            q[3 * r : 3 * r + 3],
            k,
            queue,
            q_ids[3 * r : 3 * r + 3],
            queue_ids,
            0.05,
            10.0,
            k_ids=q_ids,
            pos_index=torch.arange(3) + 3 * r,
            **PLAIN,
        )
        for r in range(2)
    ]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(full.item(), abs=1e-12)
    with pytest.raises(ValueError):
        dcl_loss(q[:3], k, queue, q_ids[:3], queue_ids, 0.05, 10.0, **PLAIN)


def naive_dcl_reading(
    q, k, queue, q_ids, queue_ids, tau, beta, *, separate=False, threshold=0.0, adaptive=False
) -> float:
    """The readings of DCL's weights written out per query: negatives (batch keys, then queue)
    minus those whose key is more similar than `threshold` to the positive key; β divided by
    the sample standard deviation of all kept negative similarities of the batch (`adaptive`);
    weights |G|·softmax_G(β s) within each group G (one group, or batch and queue apart)."""
    rows = []
    for i in range(len(q)):
        groups = []
        for keys, ids in ((k, q_ids), (queue, queue_ids)):
            kept = [
                j
                for j in range(len(keys))
                if int(ids[j]) != int(q_ids[i]) and not (threshold > 0 and dot(k[i], keys[j]) > threshold)
            ]
            groups.append([dot(q[i], keys[j]) for j in kept])
        rows.append(groups)
    if adaptive:
        every = [s for groups in rows for g in groups for s in g]
        mean = sum(every) / len(every)
        beta = beta / math.sqrt(sum((s - mean) ** 2 for s in every) / (len(every) - 1))
    losses = []
    for i, groups in enumerate(rows):
        parts = groups if separate else [groups[0] + groups[1]]
        denominator = pos = math.exp(dot(q[i], k[i]) / tau)
        for sims in parts:
            norm = sum(math.exp(beta * s) for s in sims)
            denominator += sum(len(sims) * math.exp(beta * s) / norm * math.exp(s / tau) for s in sims)
        losses.append(-math.log(pos / denominator))
    return sum(losses) / len(losses)


@pytest.mark.parametrize(
    "reading",
    [dict(separate=True), dict(threshold=0.3), dict(adaptive=True), dict(separate=True, threshold=0.2, adaptive=True)],
)
def test_dcl_readings_match_naive_reference(dcl_case, reading):
    q, k, queue, q_ids, queue_ids = dcl_case
    options = dict(
        weight_groups="separate" if reading.get("separate") else "joint",
        false_negative_threshold=reading.get("threshold", 0.0),
        beta_adaptive=reading.get("adaptive", False),
    )
    got = dcl_loss(q, k, queue, q_ids, queue_ids, 0.1, 2.0, **options)
    want = naive_dcl_reading(q, k, queue, q_ids, queue_ids, 0.1, 2.0, **reading)
    assert got.item() == pytest.approx(want, abs=1e-6)
    assert got.item() != pytest.approx(dcl_loss(q, k, queue, q_ids, queue_ids, 0.1, 2.0, **PLAIN).item(), abs=1e-6)


def test_dcl_weight_stats_against_reference(dcl_case):
    """Uniform weights (β = 0) have entropy 1; with β > 0 the entropy and the top-1% shares
    match a per-query computation."""
    q, k, queue, q_ids, queue_ids = dcl_case
    stats = {}
    dcl_loss(q, k, queue, q_ids, queue_ids, 0.1, 0.0, stats=stats, **PLAIN)
    assert stats["weight_entropy"].item() == pytest.approx(1.0, abs=1e-9)
    stats = {}
    dcl_loss(q, k, queue, q_ids, queue_ids, 0.1, 5.0, stats=stats, **PLAIN)
    keys, ids = torch.cat([k, queue]), torch.cat([q_ids, queue_ids])
    entropies, tops, grads = [], [], []
    for i in range(len(q)):
        sims = [dot(q[i], keys[j]) for j in range(len(keys)) if int(ids[j]) != int(q_ids[i])]
        w = [math.exp(5.0 * s) for s in sims]
        p = [x / sum(w) for x in w]
        entropies.append(-sum(x * math.log(x) for x in p) / math.log(len(p)))
        tops.append(max(p))  # 15 columns: the top 1% is one negative
        e = [x * math.exp(s / 0.1) for x, s in zip(w, sims)]
        grads.append(max(e) / sum(e))
    assert stats["weight_entropy"].item() == pytest.approx(sum(entropies) / 6, abs=1e-9)
    assert stats["weight_top1"].item() == pytest.approx(sum(tops) / 6, abs=1e-9)
    assert stats["grad_top1"].item() == pytest.approx(sum(grads) / 6, abs=1e-9)


def test_triplet_matches_naive_reference():
    img, cap = unit(5, 4, seed=5), unit(5, 4, seed=6)
    ids = torch.tensor([0, 0, 1, 2, 3])
    margin = 0.2
    total = 0.0
    for i in range(5):
        negatives = [j for j in range(5) if ids[j] != ids[i]]
        positive = dot(img[i], cap[i])
        total += max([0.0] + [margin + dot(img[i], cap[j]) - positive for j in negatives])  # image i -> captions
        total += max([0.0] + [margin + dot(img[j], cap[i]) - positive for j in negatives])  # caption i -> images
    assert triplet_loss(img, cap, ids, margin, hardest=True).item() == pytest.approx(total / 5, abs=1e-6)


def test_pseudo_label_loss_matches_naive_reference():
    x, protos = unit(3, 4, seed=7), unit(6, 4, seed=8)
    targets = torch.softmax(torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 1)
    tau = 0.1
    total = 0.0
    for i in range(3):
        logits = [dot(x[i], protos[j]) / tau for j in range(6)]
        log_norm = math.log(sum(math.exp(v) for v in logits))
        total -= sum(float(targets[i, j]) * (logits[j] - log_norm) for j in range(6))
    x.requires_grad_(True)
    got = pseudo_label_loss(x, targets, protos, tau)
    assert got.item() == pytest.approx(total / 3, abs=1e-6)
    got.backward()
    assert x.grad is not None and protos.grad is None


def test_symmetric_dcl_is_the_mean_of_both_directions(dcl_case):
    """Image queries against text keys and caption queries against image keys, averaged; the
    statistics of both directions averaged too."""
    img, cap, queue, ids, queue_ids = dcl_case
    image_keys, text_keys = unit(6, 5, seed=20), unit(6, 5, seed=21)
    stats, i2t_stats, t2i_stats = {}, {}, {}
    queries, keys = Pairs(img, cap, ids), Pairs(image_keys, text_keys, ids)
    queue_pairs = Pairs(queue[:4], queue[4:8], queue_ids[:4])
    got = symmetric_dcl(queries, keys, queue_pairs, torch.arange(6), 0.1, 5.0, stats=stats, **PLAIN)
    i2t = dcl_loss(img, text_keys, queue[4:8], ids, queue_ids[:4], 0.1, 5.0, stats=i2t_stats, **PLAIN)
    t2i = dcl_loss(cap, image_keys, queue[:4], ids, queue_ids[:4], 0.1, 5.0, stats=t2i_stats, **PLAIN)
    assert got.item() == pytest.approx((i2t.item() + t2i.item()) / 2, abs=1e-12)
    want = (i2t_stats["weight_entropy"] + t2i_stats["weight_entropy"]).item() / 2
    assert stats["weight_entropy"].item() == pytest.approx(want, abs=1e-12)
    no_queue = symmetric_dcl(queries, keys, None, torch.arange(6), 0.1, 5.0, **PLAIN)  # None: an empty queue
    empty, no_ids = queue[:0], queue_ids[:0]
    i2t = dcl_loss(img, text_keys, empty, ids, no_ids, 0.1, 5.0, **PLAIN)
    t2i = dcl_loss(cap, image_keys, empty, ids, no_ids, 0.1, 5.0, **PLAIN)
    assert no_queue.item() == pytest.approx((i2t.item() + t2i.item()) / 2, abs=1e-12)


def naive_sinkhorn(scores: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """SwAV's loop, prototypes x samples orientation."""
    q = np.exp(scores / eps).T.copy()
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        for r in range(k):
            q[r] /= q[r].sum() * k
        for c in range(b):
            q[:, c] /= q[:, c].sum() * b
    return (q * b).T


def test_sinkhorn_matches_swav_loop_and_marginals():
    z, protos = unit(40, 6, seed=11), unit(8, 6, seed=12)
    scores = z @ protos.t()
    kernel = sinkhorn_kernel(scores, 0.05)
    assert torch.allclose(kernel, torch.exp((scores - 1) / 0.05)) and kernel.max() <= 1
    for iters in (1, 3):
        got = sinkhorn_knopp(kernel, iters)
        assert np.allclose(got.numpy(), naive_sinkhorn(scores.numpy(), 0.05, iters), atol=1e-9)
        assert torch.allclose(got.sum(1), torch.ones(40, dtype=torch.float64))
    blocks = sinkhorn_knopp([kernel[:7], kernel[7:30], kernel[30:]], 3, num_rows=7)
    assert torch.allclose(blocks, sinkhorn_knopp(kernel, 3)[:7], atol=1e-12)
    with pytest.raises(ValueError, match="first block"):
        sinkhorn_knopp([kernel[:7], kernel[7:]], 3)
    converged = sinkhorn_knopp(kernel, 500)
    assert torch.allclose(converged.sum(0), torch.full((8,), 40 / 8, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(converged.sum(1), torch.ones(40, dtype=torch.float64))


def test_sinkhorn_float32_is_finite_for_unit_vectors():
    gen = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(3000, 32, generator=gen), dim=1)
    protos = F.normalize(torch.randn(100, 32, generator=gen), dim=1)
    codes = sinkhorn_knopp(sinkhorn_kernel(z @ protos.t(), 0.05), 3)
    assert codes.dtype == torch.float32 and torch.isfinite(codes).all()
    assert torch.allclose(codes.sum(1), torch.ones(3000), atol=1e-5)
    assert (codes.sum(0) / 30).sub(1).abs().max() < 0.5  # 3 iterations: near the equal share
