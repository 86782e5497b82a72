"""CODER's losses and the Sinkhorn-Knopp codes behind its pseudo labels (docs/method.md has
each one's equation).

Plain functions of tensors (`Pairs` groups image and caption rows with their image ids), so
that each can be checked against a naive reference. All take L2-normalised embeddings;
s(a, b) = a·b. They hold no default values: the model passes its config's.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def dcl_negative_log_weights(
    sims: Tensor, negative_mask: Tensor, beta: float | Tensor, queue_start: int | None = None
) -> Tensor:
    """log w_ik of DCL: w_ik = |N_i| · softmax_{k∈N_i}(β·s_ik), no gradient.

    The weights of each query average 1 over its negatives; entries outside `negative_mask`
    get -inf (weight 0), also for a query without any negative. `beta` is a number or a
    tensor that broadcasts against `sims` (an adaptive β). With `queue_start`, the columns
    before it (the batch's keys) and from it on (the queue) are weighted apart: each group's
    weights average 1 over its own negatives.
    """
    if queue_start is not None:
        parts = [
            dcl_negative_log_weights(sims[:, cols], negative_mask[:, cols], beta)
            for cols in (slice(None, queue_start), slice(queue_start, None))
        ]
        return torch.cat(parts, 1)
    log_weights = (beta * sims).masked_fill_(~negative_mask, float("-inf"))
    log_count = negative_mask.sum(1, keepdim=True).to(sims.dtype).log()
    shift = torch.logsumexp(log_weights, 1, keepdim=True) - log_count
    # A query without negatives (log_count = -inf) would get -inf - -inf = NaN: its row stays -inf.
    return log_weights.sub_(torch.where(log_count.isfinite(), shift, 0.0))


@torch.no_grad()
def adaptive_beta(sims: Tensor, negative_mask: Tensor, beta: float) -> Tensor:
    """β / σ, σ the standard deviation of the batch's negative similarities: the weights are
    then exp(β·z) of standardised scores z, whatever the spread the encoders have reached."""
    spread = sims[negative_mask].std() if negative_mask.sum() > 1 else sims.new_ones(())
    return beta / spread.clamp_min(1e-3)


@torch.no_grad()
def dcl_weight_stats(
    negatives: Tensor, log_weights: Tensor, positive: Tensor, negative_mask: Tensor
) -> dict[str, Tensor]:
    """How DCL spreads its weight over one direction's negatives (each a mean over queries):

    - weight_entropy: entropy of w_ik / Σ_k w_ik over |N_i|, divided by log|N_i| (1 = uniform);
    - weight_top1: share of Σ_k w_ik on the top 1% of negatives;
    - grad_top1: share of the loss's gradient on the negatives (softmax of the weighted logits
      `negatives`, positive logit excluded) that falls on the top 1% of them.
    """
    count = negative_mask.sum(1).clamp_min(2).to(negatives.dtype)
    top = max(1, int(0.01 * negative_mask.shape[1]))
    p = torch.softmax(log_weights, 1).nan_to_num_(0.0)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(1) / count.log()
    gradient = torch.softmax(torch.cat([positive, negatives], 1), 1)[:, 1:]
    gradient = gradient / gradient.sum(1, keepdim=True).clamp_min(1e-30)
    return {
        "weight_entropy": entropy.mean(),
        "weight_top1": p.topk(top, 1).values.sum(1).mean(),
        "grad_top1": gradient.topk(top, 1).values.sum(1).mean(),
    }


def dcl_loss(
    q: Tensor,
    k: Tensor,
    queue: Tensor,
    q_ids: Tensor,
    queue_ids: Tensor,
    tau: float,
    beta: float,
    *,
    beta_adaptive: bool,
    weight_groups: str,
    false_negative_threshold: float,
    k_ids: Tensor | None = None,
    pos_index: Tensor | None = None,
    stats: dict[str, Tensor] | None = None,
) -> Tensor:
    """Diversity-sensitive contrastive loss, one direction (e.g. image queries, text keys).

    q (B,d) online queries with image ids `q_ids` (B,); k (B',d) momentum keys; queue (K,d)
    with ids `queue_ids` (K,), K may be 0. Query i's positive is k[pos_index[i]]; its
    negatives are every row of k and queue whose id differs from q_ids[i], weighted by
    `dcl_negative_log_weights` (β = 0: plain InfoNCE). Returns the mean loss over queries.

    The readings of the weighting: `beta_adaptive` divides β by the spread of the batch's
    negative similarities (`adaptive_beta`); weight_groups "separate" weights the batch's keys
    and the queue apart; `false_negative_threshold` t > 0 drops every negative whose key is
    more similar than t to the positive's key (a likely caption or photo of the same scene).
    Given a dict `stats`, fills it with `dcl_weight_stats` and the share of negatives dropped.

    Single process: B' = B, k[i] is query i's positive and k_ids defaults to q_ids. Under
    data-parallel training the model passes the keys gathered from all processes as k
    (B' = world·B) with their ids `k_ids` and `pos_index` = rank·B + arange(B).
    """
    if pos_index is None:
        if k.shape[0] != q.shape[0]:
            raise ValueError("dcl_loss: k has more rows than q; pass pos_index (and k_ids)")
        pos_index = torch.arange(q.shape[0], device=q.device)
    if k_ids is None:
        if k.shape[0] != q.shape[0]:
            raise ValueError("dcl_loss: k has more rows than q; pass k_ids")
        k_ids = q_ids
    positive = (q * k[pos_index]).sum(1, keepdim=True) / tau  # (B,1)
    sims = torch.cat([q @ k.t(), q @ queue.t()], 1)  # (B, B'+K)
    negative_mask = torch.cat([k_ids, queue_ids])[None, :] != q_ids[:, None]
    if false_negative_threshold > 0:
        with torch.no_grad():
            positive_keys = k[pos_index]
            key_sims = torch.cat([positive_keys @ k.t(), positive_keys @ queue.t()], 1)
            likely_false = negative_mask & (key_sims > false_negative_threshold)
            negative_mask = negative_mask & ~likely_false
    strength = adaptive_beta(sims.detach(), negative_mask, beta) if beta_adaptive else beta
    queue_start = k.shape[0] if weight_groups == "separate" else None
    log_weights = dcl_negative_log_weights(sims.detach(), negative_mask, strength, queue_start)
    negatives = torch.add(log_weights, sims, alpha=1 / tau)  # masked entries are -inf
    if stats is not None:
        stats.update(dcl_weight_stats(negatives.detach(), log_weights, positive.detach(), negative_mask))
        stats["beta"] = torch.as_tensor(strength, dtype=sims.dtype, device=sims.device)
        if false_negative_threshold > 0:
            stats["spared"] = likely_false.sum() / torch.cat([k_ids, queue_ids]).ne(q_ids[:, None]).sum().clamp_min(1)
    # -log(e^p / (e^p + Σ w e^s)) = logsumexp(p, s + log w) - p
    return (torch.logsumexp(torch.cat([positive, negatives], 1), 1) - positive[:, 0]).mean()


class Pairs(NamedTuple):
    """Image and caption embeddings, row i of both from the same image-caption pair, and the
    image id of each row: a batch's queries, the global batch's keys or a queue's entries."""

    image: Tensor
    text: Tensor
    ids: Tensor


def symmetric_dcl(
    queries: Pairs,
    keys: Pairs,
    queue: Pairs | None,
    pos_index: Tensor,
    tau: float,
    beta: float,
    *,
    stats: dict[str, Tensor] | None = None,
    **weighting: Any,
) -> Tensor:
    """L_DCL(v, t): the mean of the image→text and text→image `dcl_loss`.

    `queries` (B,d) are this process's; the `keys` (B',d) are the global batch's, query i's
    positive at row pos_index[i]; a `queue` (K,d) of None is empty. `weighting` is the reading
    of DCL's weights (beta_adaptive, weight_groups, false_negative_threshold). A dict `stats`
    gets `dcl_loss`'s statistics, the mean of both directions.
    """
    if queue is None:
        empty = queries.image.new_zeros(0, queries.image.shape[1])
        queue = Pairs(empty, empty, keys.ids[:0])
    shared = {"k_ids": keys.ids, "pos_index": pos_index, **weighting}
    parts: list[dict[str, Tensor] | None] = [None, None] if stats is None else [{}, {}]
    i2t = dcl_loss(queries.image, keys.text, queue.text, queries.ids, queue.ids, tau, beta, stats=parts[0], **shared)
    t2i = dcl_loss(queries.text, keys.image, queue.image, queries.ids, queue.ids, tau, beta, stats=parts[1], **shared)
    if stats is not None:
        stats.update({key: (parts[0][key] + parts[1][key]) / 2 for key in parts[0]})
    return (i2t + t2i) / 2


def triplet_loss(images: Tensor, captions: Tensor, image_ids: Tensor, margin: float, hardest: bool) -> Tensor:
    """VSE++ hardest-negative triplet loss in both directions over the batch.

    Row i of `images` and `captions` is a positive pair; pairs sharing an image id are never
    negatives. VSE++ sums over the batch; this returns that sum divided by B, so that its
    scale (and gradient clipping) does not depend on the batch size, like the DCL terms.
    `hardest=False` sums the hinge over every negative instead (VSE0, which VSE∞ trains with
    for its first epoch before switching to the hardest negative).
    """
    scores = images @ captions.t()
    positive = scores.diagonal()
    not_negative = image_ids[:, None] == image_ids[None, :]
    caption_cost = (margin + scores - positive[:, None]).clamp(min=0).masked_fill(not_negative, 0)
    image_cost = (margin + scores - positive[None, :]).clamp(min=0).masked_fill(not_negative, 0)
    if not hardest:
        return (caption_cost.sum() + image_cost.sum()) / images.shape[0]
    return (caption_cost.max(1).values.sum() + image_cost.max(0).values.sum()) / images.shape[0]


def concept_kl_loss(image_scores: Tensor, caption_scores: Tensor) -> Tensor:
    """KL(caption ‖ image) between the concept-score distributions of each pair (CVSE's KL
    regulariser: the image's predicted scores learn the caption's label-mixed ones), summed
    over concepts and averaged over the batch (CVSE sums over the batch too; the mean keeps
    its ratio to the triplet terms, which are divided by B). Rows sum to 1; zeros of the
    caption's scores contribute 0, and the image's are floored to keep the log finite."""
    tiny = torch.finfo(image_scores.dtype).tiny
    log_ratio = caption_scores.clamp_min(tiny).log() - image_scores.clamp_min(tiny).log()
    return (caption_scores * log_ratio).sum(1).mean()


def pseudo_label_loss(descriptors: Tensor, targets: Tensor, prototypes: Tensor, tau: float) -> Tensor:
    """Cross-entropy between pseudo labels `targets` (B,K_p) and softmax(s(x_c, prototypes)/τ_p).

    One modality's concept descriptors (B,d); the targets carry no gradient, the prototypes
    whatever gradient the caller leaves them (none unless they are learned). Mean over the
    batch.
    """
    log_p = F.log_softmax(descriptors @ prototypes.t() / tau, 1)
    return -(targets.detach() * log_p).sum(1).mean()


@torch.no_grad()
def pseudo_label_diagnostics(targets: Tensor, codes: Tensor, pseudo: Tensor) -> dict[str, Tensor]:
    """What the pseudo-label loss can learn: the targets' entropy (its floor), the loss minus
    that floor (the mean KL from targets to predictions), and the fraction of the prototypes
    that some batch embedding's code (`codes`, rows of samples) peaks at."""
    entropy = -(targets * targets.clamp_min(1e-12).log()).sum(1).mean()
    used = torch.zeros(codes.shape[1], dtype=torch.bool, device=codes.device)
    used[codes.argmax(1)] = True
    return {
        "target_entropy": entropy,
        "pseudo_excess": pseudo.detach() - entropy,
        "prototypes_used": used.float().mean(),
    }


@torch.no_grad()
def sinkhorn_kernel(scores: Tensor, epsilon: float) -> Tensor:
    """exp((s − 1)/ε), in float32 at least: Sinkhorn's starting matrix for cosine scores s ≤ 1.

    SwAV starts from exp(s/ε); the constant factor exp(−1/ε) cancels in the normalisations
    and keeps every entry in (0, 1], so no ε overflows. A fixed shift (not the batch's
    maximum) makes each row depend on its own scores only. In float32, entries with
    s < 1 − 87ε underflow towards 0: harmless at ε = 0.05 (s ≥ −1 gives ≥ e^−40), but below
    ε ≈ 0.02 a sample whose best score is far below 1 can lose its whole row (its code is
    then all zero).
    """
    dtype = torch.promote_types(scores.dtype, torch.float32)
    return scores.to(dtype).sub(1.0).div_(epsilon).exp_()


@torch.no_grad()
def sinkhorn_knopp(kernel: Tensor | Sequence[Tensor], iterations: int, num_rows: int | None = None) -> Tensor:
    """Soft equal-partition assignments of M samples to K prototypes (SwAV's Sinkhorn-Knopp).

    `kernel` (M,K) is `sinkhorn_kernel` of the scores s(sample, prototype), or a sequence of
    row blocks taken in order (so that the model passes the batch's rows and the queues'
    without concatenating them). SwAV alternates normalising each prototype's
    total to M/K and each sample's row to 1; this is the same computation written with scaling
    vectors (codes = diag(r)·kernel·diag(c)), so the kernel is only read. Returns the codes of
    the first `num_rows` samples (all by default; they must lie in the first block): rows sum
    to 1, and over all M samples the columns approach the equal share M/K as the iterations
    grow.
    """
    blocks = [kernel] if isinstance(kernel, Tensor) else list(kernel)
    num_samples, num_prototypes = sum(b.shape[0] for b in blocks), blocks[0].shape[1]
    num_rows = blocks[0].shape[0] if num_rows is None and len(blocks) == 1 else num_rows
    if num_rows is None or num_rows > blocks[0].shape[0]:
        raise ValueError("sinkhorn_knopp: the kept rows must lie in the first block")
    tiny = torch.finfo(blocks[0].dtype).tiny
    row_scales = [b.new_ones(b.shape[0]) for b in blocks]
    for i in range(iterations):
        column_totals = sum(b.t() @ r for b, r in zip(blocks, row_scales))
        col_scale = 1.0 / (num_prototypes * column_totals).clamp_min(tiny)
        if i + 1 < iterations:  # the last row normalisation is done on the kept rows only
            row_scales = [1.0 / (num_samples * (b @ col_scale)).clamp_min(tiny) for b in blocks]
    codes = blocks[0][:num_rows] * col_scale
    return codes / codes.sum(1, keepdim=True).clamp_min(tiny)
