"""What the trainer logs besides the losses: statistics of the model on a batch.

They are measured off the training path: the trainer calls `step_diagnostics` at its logging
steps, before the step that trains on the batch, with the model in evaluation mode and without
gradient. Nothing is written: the queues, prototypes and random streams are those of a run
without diagnostics. `term_gradient_norms` is the exception that needs the step's graph: the
training step calls it at those steps, before its backward pass.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from loss import pseudo_label_diagnostics
from model import CODER, StepEmbeddings, instance_part


def mean_pairwise_cosine(x: Tensor) -> Tensor:
    """Mean cosine between distinct rows of unit-norm x (B,d): near 1 when the rows are nearly
    collinear, i.e. carry little about which sample they came from."""
    n = x.shape[0]
    total = x.sum(0)
    return (total @ total - (x * x).sum()) / max(n * (n - 1), 1)


@torch.no_grad()
def step_diagnostics(model: CODER, batch: Mapping[str, Tensor], dcl_weights: bool) -> dict[str, Tensor]:
    """Scalars by log name:

    - concept_cos_image, concept_cos_text: `mean_pairwise_cosine` of v_c and t_c (1: collapsed);
    - target_entropy, pseudo_excess, prototypes_used (once the prototypes are ready):
      `loss.pseudo_label_diagnostics`;
    - with `dcl_weights`: dcl_weight_entropy, dcl_weight_top1, dcl_grad_top1, dcl_beta (and
      dcl_spared with a false-negative threshold), how the instance DCL term weighs its
      negatives (`loss.dcl_loss`).

    Under DDP every process calls it at the same steps: the keys are gathered.
    """
    training = model.training
    model.eval()
    try:
        return _measure(model, batch, dcl_weights)
    finally:
        model.train(training)


def _measure(model: CODER, batch: Mapping[str, Tensor], dcl_weights: bool) -> dict[str, Tensor]:
    cfg = model.cfg
    concepts = model.concepts() if cfg.concept_branch else None
    queries, _ = model.queries(batch, concepts)
    keys = model.momentum_keys(batch, concepts)
    out = {}
    if cfg.concept_branch:
        out = {
            "concept_cos_image": mean_pairwise_cosine(queries["image_concept"]),
            "concept_cos_text": mean_pairwise_cosine(queries["text_concept"]),
        }
    if model.prototypes is not None and model.prototypes.is_ready:
        targets, codes = model.pseudo_labels(keys, queries["ids"].shape[0])
        out.update(pseudo_label_diagnostics(targets, codes, model.pseudo_label_term(queries, targets)))
    if dcl_weights and cfg.loss == "dcl":
        stats: dict[str, Tensor] = {}
        model.contrast(instance_part, StepEmbeddings(queries, keys, model.queue_entries(copied=False)), stats=stats)
        out.update({f"dcl_{name}": value for name, value in stats.items()})
    return out


def term_gradient_norms(raw_model: torch.nn.Module, losses: Mapping[str, Tensor]) -> dict[str, float]:
    """The gradient norm of each loss term times its weight λ (the forward's `losses`, with
    their graph) on each shared instance encoder (the modules every term reaches), this
    process's batch only: which objective trains the encoders. One extra backward pass per term."""
    weights = raw_model.cfg.loss_weights()
    terms = {name: weights[name] * term for name, term in losses.items() if name != "loss"}
    modules = {
        name: [p for p in getattr(raw_model, name).parameters() if p.requires_grad]
        for name in ("image_encoder", "text_encoder")
    }
    params = [p for group in modules.values() for p in group]
    norms = {}
    for key, term in terms.items():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        start = 0
        for name, group in modules.items():
            squares = [g.float().pow(2).sum() for g in grads[start : start + len(group)] if g is not None]
            norms[f"grad/{name}/{key}"] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
            start += len(group)
    return norms
