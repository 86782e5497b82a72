"""Time one optimizer step (trainer.training_step: forward with its momentum and queue updates,
backward, clipping, AdamW) of the full CODER model and of the instance-only triplet baseline,
in the same run, on random data.

Default: the model of train_f30k.py's block at batch 128, 36x2048 regions, bigru text
(vocabulary 10,000, captions of about 12 tokens), 300 concepts, full queues. The models' steps
alternate so that a busy machine slows all alike; the medians are reported, and the ratio of
the fastest steps too (the least disturbed by other work on a shared machine). --ablations also
times CODER without each of its parts, to show what each costs.

    python bench/bench_step.py [--steps 5] [--batch 128] [--threads N] [--ablations]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_f30k  # noqa: E402
import trainer  # noqa: E402
from checkpoint import model_config_from  # noqa: E402
from encoders import l2norm  # noqa: E402
from model import CODER, parameter_counts  # noqa: E402
from options import script_config  # noqa: E402

SCALER = torch.amp.GradScaler("cpu", enabled=False)
DEFAULTS = script_config(vars(train_f30k))


def random_batch(
    batch: int, regions: int, feature_dim: int, vocab: int, concepts: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """A batch shaped like data.collate's output: 5 captions per image, lengths 8..16."""
    lengths = torch.randint(8, 17, (batch,), generator=gen)
    max_len = int(lengths.max())
    mask = torch.arange(max_len)[None, :] < lengths[:, None]
    tokens = torch.randint(4, vocab, (batch, max_len), generator=gen) * mask
    return {
        "images": torch.randn(batch, regions, feature_dim, generator=gen).relu(),
        "tokens": tokens,
        "lengths": lengths,
        "attention_mask": mask.long(),
        "concept_labels": (torch.rand(batch, concepts, generator=gen) < 0.01).float(),
        "image_ids": torch.arange(batch) // 5,
        "caption_ids": torch.arange(batch),
    }


def random_graph(concepts: int, word_dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse symmetric graph with self loops, normalised D^-1/2 A D^-1/2, and word vectors."""
    adjacency = (torch.rand(concepts, concepts, generator=gen) < 0.05).float()
    adjacency = ((adjacency + adjacency.t()) > 0).float() * 0.25 + torch.eye(concepts)
    scale = adjacency.sum(1).rsqrt()
    return scale[:, None] * adjacency * scale[None, :], torch.randn(concepts, word_dim, generator=gen)


def fill_queues(model: CODER, gen: torch.Generator) -> None:
    """Full queues, so that the timed steps pay for every queue entry."""
    queues = model.queues
    if queues.names:
        shape = (queues.size, model.cfg.embed_dim)
        queues.push(
            {name: l2norm(torch.randn(shape, generator=gen)) for name in queues.names},
            torch.arange(queues.size) // 5 + 10**6,
        )


def step(model: CODER, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    """The training loop's own step (trainer.training_step: forward, backward, gradient clipping
    at train_f30k.py's value and scope, AdamW), fp32 as on CPU."""
    start = time.perf_counter()
    trainer.training_step(
        model, model, optimizer, SCALER, batch, None, DEFAULTS["grad_clip"], clip_scope=DEFAULTS["grad_clip_scope"]
    )
    return time.perf_counter() - start


# Extra configurations timed with --ablations: what each part of CODER costs.
ABLATIONS = {
    "no_sinkhorn_queue": dict(sinkhorn_with_queue=False),
    "no_pseudo": dict(pseudo_label_loss=False),
    "no_concept": dict(concept_branch=False),
    "dcl_momentum_only": dict(concept_branch=False, queue_size=0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--feature-dim", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--ablations", action="store_true", help="also time CODER without each of its parts")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    concepts, concept_word_dim = 300, 300
    adjacency, vectors = random_graph(concepts, concept_word_dim, gen)
    configs = {"coder": {}, "triplet": dict(loss="triplet", concept_branch=False, queue_size=0)}
    if args.ablations:
        configs.update(ABLATIONS)
    models = {}
    for name, overrides in configs.items():  # train_f30k.py's model at the data's sizes
        cfg = model_config_from(
            DEFAULTS, image_dim=args.feature_dim, text_encoder="bigru", vocab_size=args.vocab, **overrides
        )
        graph = (adjacency, vectors) if cfg.concept_branch else (None, None)
        models[name] = CODER(cfg, *graph)
        fill_queues(models[name], gen)
    optimizers = {
        name: torch.optim.AdamW(
            trainer.param_groups(m, DEFAULTS["lr"], DEFAULTS["weight_decay"], DEFAULTS["bert_lr_scale"])
        )
        for name, m in models.items()
    }
    batches = [random_batch(args.batch, args.regions, args.feature_dim, args.vocab, concepts, gen) for _ in range(2)]
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(args.steps + 2):
        for name, model in models.items():
            elapsed = step(model, optimizers[name], batches[i % 2])
            if i >= 2:
                times[name].append(elapsed)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"regions {args.regions}x{args.feature_dim}, vocab {args.vocab}, {args.steps} timed steps"
    )
    baseline = statistics.median(times["triplet"])
    for name, model in models.items():
        counts = parameter_counts(model)
        median = statistics.median(times[name])
        print(
            f"{name:18s} step {median:.3f} s (median; min {min(times[name]):.3f}) = {median / baseline:.2f}x triplet"
            f" | params trainable {counts['trainable']:,} momentum {counts['momentum']:,}"
        )
    ratio = statistics.median(times["coder"]) / baseline
    fastest = min(times["coder"]) / min(times["triplet"])
    print(f"ratio coder/triplet {ratio:.2f} of the medians, {fastest:.2f} of the fastest steps (target <= 1.6)")


if __name__ == "__main__":
    main()
