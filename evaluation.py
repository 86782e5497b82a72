"""Image-text retrieval evaluation: encode a split, score every image against every caption,
and compute Recall@K / median / mean rank in both directions (docs/training.md#evaluation).

The pieces compose: `encode_split` (once per model) -> `similarity_matrix` (per mu, cheap) ->
`recall_metrics` / `coco_metrics`. `evaluate` chains them for a model or an ensemble, and
`sweep_mu` reuses one encoding to tune the instance/concept mixing weight on dev.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from model import fused_similarity
from options import script_default
from utils import CoderError, as_numpy, atomic_write

RECALL_KS = (1, 5, 10)
PROTOCOLS = ("f30k", "coco")
# Images or captions per encoder call (memory and speed, not results): the train scripts' value.
BATCH_SIZE = script_default("eval_batch_size")
# Scores compared per chunk in `retrieval_ranks`: bounds the temporary masks whatever the matrix
# size (5,000 x 25,000 is 125 M scores). On the CPU a chunk that stays in cache is fastest
# (1 M: 2-4x faster than 16 M); on a GPU bigger chunks mean fewer kernel launches.
_CHUNK_ELEMENTS_CPU = 1 << 20
_CHUNK_ELEMENTS_GPU = 1 << 22

ScoreFn = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, "torch.Tensor | None", float], torch.Tensor]


# --------------------------------------------------------------------------- metrics


def _as_tensor(sims: Any) -> torch.Tensor:
    """A torch view of `sims` (no copy for NumPy arrays or tensors; stays on its device)."""
    if isinstance(sims, torch.Tensor):
        return sims.detach()
    array = np.asarray(sims)
    if array.dtype.kind not in "biuf":
        raise CoderError(f"similarity matrix: expected numbers, got dtype {array.dtype}")
    if any(stride < 0 for stride in array.strides):
        array = np.ascontiguousarray(array)
    with warnings.catch_warnings():
        # Read-only arrays (memmaps, np.load(mmap_mode='r')) are safe: we never write to them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _check_shape(scores: torch.Tensor, captions_per_image: int) -> tuple[int, int]:
    if isinstance(captions_per_image, bool) or not isinstance(captions_per_image, int) or captions_per_image < 1:
        raise CoderError(f"captions_per_image must be a positive integer, got {captions_per_image!r}")
    if scores.dim() != 2:
        raise CoderError(f"similarity matrix must be 2-D (images x captions), got shape {tuple(scores.shape)}")
    n_img, n_cap = scores.shape
    if n_img == 0:
        raise CoderError("similarity matrix has no images")
    if n_cap != n_img * captions_per_image:
        raise CoderError(
            f"similarity matrix has {n_cap} captions for {n_img} images; expected "
            f"{n_img * captions_per_image} ({n_img} images x {captions_per_image} captions per image)"
        )
    return n_img, n_cap


def _rank_summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    """R@K in percent and 1-based median/mean rank from 0-based ranks (VSE++ conventions)."""
    out = {f"{prefix}_r{k}": 100.0 * int(np.count_nonzero(ranks < k)) / len(ranks) for k in RECALL_KS}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)) + 1)
    out[f"{prefix}_meanr"] = float(np.mean(ranks) + 1)
    return out


def retrieval_ranks(
    sims: Any, captions_per_image: int = 5, *, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of the ground truth: (image ranks (N_img,), caption ranks (N_cap,)).

    A rank counts the wrong items scored at least as high as the ground truth: a tie counts
    against the model, so a collapsed model (all scores equal) ranks every ground truth last,
    never first. An image's rank is that of its best-scored caption (its other captions are
    never counted against it). One pass over row chunks computes both directions on the matrix's own
    device; the temporaries are chunk-sized boolean masks, never a sorted copy of the matrix.
    """
    scores = _as_tensor(sims)
    n_img, n_cap = _check_shape(scores, captions_per_image)
    device = scores.device
    caption_idx = torch.arange(n_cap, device=device)
    # Score of each caption with its own image, and each image's best own-caption score.
    own = scores[caption_idx // captions_per_image, caption_idx]
    best_own = own.view(n_img, captions_per_image).amax(dim=1)
    if chunk_rows is None:
        budget = _CHUNK_ELEMENTS_CPU if device.type == "cpu" else _CHUNK_ELEMENTS_GPU
        chunk_rows = max(1, budget // n_cap)
    if chunk_rows < 1:
        raise CoderError(f"chunk_rows must be positive, got {chunk_rows}")
    rows = chunk_rows
    # int32 counts: ranks are below 2**31, and int32 reductions are twice as fast as int64.
    image_ranks = torch.empty(n_img, dtype=torch.int32, device=device)
    caption_ranks = torch.zeros(n_cap, dtype=torch.int32, device=device)
    for start in range(0, n_img, rows):
        block = scores[start : start + rows]
        # A NaN/inf anywhere makes the block's sum non-finite (a cheap scalar test); only then
        # is the exact elementwise test needed, since huge finite scores can overflow the sum.
        if (
            block.is_floating_point()
            and not bool(torch.isfinite(block.sum()))
            and not bool(torch.isfinite(block).all())
        ):
            raise CoderError(
                f"similarity matrix has non-finite scores in images {start}..{start + len(block) - 1} "
                f"(NaN/inf: did the model diverge?)"
            )
        best = best_own[start : start + rows]
        # >= counts the image's own captions that reach its best score too: subtract them.
        own_ties = (own.view(n_img, captions_per_image)[start : start + rows] >= best[:, None]).sum(
            dim=1, dtype=torch.int32
        )
        image_ranks[start : start + len(block)] = (block >= best[:, None]).sum(dim=1, dtype=torch.int32) - own_ties
        caption_ranks += (block >= own[None, :]).sum(dim=0, dtype=torch.int32)
    return image_ranks, caption_ranks - 1  # each caption's own image was counted


def recall_metrics(sims: Any, captions_per_image: int = 5, *, chunk_rows: int | None = None) -> dict[str, float]:
    """Retrieval metrics of an images x captions score matrix (NumPy or torch, any device).

    Caption j belongs to image j // captions_per_image. Returns i2t_r1/r5/r10 and
    t2i_r1/r5/r10 (percent), rsum (their sum), and i2t/t2i medr and meanr (1-based).
    """
    image_ranks, caption_ranks = retrieval_ranks(sims, captions_per_image, chunk_rows=chunk_rows)
    metrics = _rank_summary(as_numpy(image_ranks), "i2t")
    metrics.update(_rank_summary(as_numpy(caption_ranks), "t2i"))
    metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    return metrics


def constant_scores(sims: Any) -> bool:
    """Whether every score of a similarity matrix is the same (a collapsed model: its metrics
    are then the worst possible, and reports say why)."""
    scores = _as_tensor(sims)
    return scores.numel() > 0 and bool(scores.max() == scores.min())


def coco_metrics(sims: Any, captions_per_image: int = 5, fold_size: int = 1000) -> dict[str, dict[str, float]]:
    """COCO protocol: "1k" = mean over consecutive `fold_size`-image folds (each with its own
    captions), "5k" = the whole matrix (5,000 images on testall)."""
    scores = _as_tensor(sims)
    n_img, _ = _check_shape(scores, captions_per_image)
    if fold_size < 1 or n_img % fold_size:
        raise CoderError(
            f"COCO 1K protocol needs a multiple of {fold_size} images, got {n_img} (use the 5,000-image testall split)"
        )
    folds = [
        recall_metrics(
            scores[f : f + fold_size, f * captions_per_image : (f + fold_size) * captions_per_image],
            captions_per_image,
        )
        for f in range(0, n_img, fold_size)
    ]
    one_k = {key: float(np.mean([fold[key] for fold in folds])) for key in folds[0]}
    return {"1k": one_k, "5k": recall_metrics(scores, captions_per_image)}


def protocol_metrics(sims: Any, protocol: str, captions_per_image: int = 5) -> dict[str, Any]:
    """Metrics for a dataset protocol: "f30k" -> one metrics dict, "coco" -> {"1k", "5k"}.

    A COCO split that is not several whole 1,000-image folds (the 1K `test` split, a dev
    subset, demo data) has no 1K/5K distinction and gets the single metrics dict."""
    if protocol == "f30k":
        return recall_metrics(sims, captions_per_image)
    if protocol == "coco":
        num_images = _as_tensor(sims).shape[0]
        if num_images < 2000 or num_images % 1000:
            return recall_metrics(sims, captions_per_image)
        return coco_metrics(sims, captions_per_image)
    raise CoderError(f"unknown evaluation protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")


# --------------------------------------------------------------------------- encoding


@dataclass
class Embeddings:
    """A split's L2-normalised embeddings from one model, on the CPU in float32.

    Kept apart from the similarity matrix so that mu can be swept (or models ensembled)
    without re-encoding. The concept parts are None for a model without a concept branch;
    `fusion` is the model's way of combining them (`model.fuse`).
    """

    image_instance: torch.Tensor
    image_concept: torch.Tensor | None
    caption_instance: torch.Tensor
    caption_concept: torch.Tensor | None
    fusion: str
    captions_per_image: int = 5

    def __post_init__(self) -> None:
        if (self.image_concept is None) != (self.caption_concept is None):
            raise CoderError("embeddings: images and captions must both have concept parts or neither")
        n_img, n_cap = len(self.image_instance), len(self.caption_instance)
        if n_cap != n_img * self.captions_per_image:
            raise CoderError(
                f"embeddings: {n_cap} captions for {n_img} images; expected "
                f"{n_img * self.captions_per_image} ({self.captions_per_image} per image)"
            )
        for name, part, n in (
            ("image_concept", self.image_concept, n_img),
            ("caption_concept", self.caption_concept, n_cap),
        ):
            if part is not None and len(part) != n:
                raise CoderError(f"embeddings: {name} has {len(part)} rows, expected {n}")

    @property
    def num_images(self) -> int:
        return len(self.image_instance)

    @property
    def num_captions(self) -> int:
        return len(self.caption_instance)

    @property
    def has_concepts(self) -> bool:
        return self.image_concept is not None


def _encode_dataset(
    loader: DataLoader,
    encode: Callable[[dict], tuple[torch.Tensor, torch.Tensor | None]],
    id_key: str,
    count: int,
    desc: str,
    progress: bool | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run `encode` over the loader, placing each row at its item id (order-proof)."""
    instance = concept = None
    seen = torch.zeros(count, dtype=torch.bool)
    # disable=None lets tqdm hide the bar when stderr is not a terminal (logs, CI).
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None if progress is None else not progress):
        inst, con = encode(batch)
        ids = batch[id_key]
        if instance is None:
            instance = torch.empty(count, inst.shape[1], dtype=torch.float32)
            concept = None if con is None else torch.empty(count, con.shape[1], dtype=torch.float32)
        instance[ids] = inst.detach().float().cpu()
        if concept is not None:
            concept[ids] = con.detach().float().cpu()
        seen[ids] = True
    if instance is None or not bool(seen.all()):
        missing = count - int(seen.sum())
        raise CoderError(f"encoding {desc}: {missing} of {count} items were never produced by the data loader")
    return instance, concept


def encode_split(
    model: Any,
    split: Any,
    tokenizer: Any,
    concept_graph: Any,
    device: str | torch.device,
    batch_size: int = BATCH_SIZE,
    num_workers: int = 0,
    progress: bool | None = None,
    text_states: Any = None,
) -> Embeddings:
    """Embed every image once and every caption once with the model's online encoders.

    `model` is anything with `cfg.fusion`, `encode_images(images)` and
    `encode_captions(captions)` (a caption batch by name: tokens, lengths, attention_mask,
    concept_labels, text_states) returning (instance, concept or None). Runs in eval mode under
    no_grad and restores the model's training mode afterwards, so the training loop can call it
    for validation. `progress=None` shows a bar only on a terminal. `text_states`
    (text_cache.TokenStates of the split's captions) gives the frozen BERT bottom's output, which
    the model then does not rerun.
    """
    import data  # imported here so this module works (and is testable) without the data stack

    device = torch.device(device)
    collate = functools.partial(data.collate, pad_id=tokenizer.pad_id)
    images = data.ImageDataset(split)
    captions = data.CaptionDataset(split, tokenizer, concept_graph, text_states=text_states)
    if len(images) == 0:
        raise CoderError("cannot evaluate a split with no images")
    expected = getattr(getattr(model, "cfg", None), "image_dim", None)
    if expected is not None and split.feature_dim != expected:
        raise CoderError(
            f"{split.images_path}: {split.feature_dim}-d region features, but the model was trained "
            f"on {expected}-d ones; use features from the same extractor as its training data"
        )

    def loader(dataset: Any) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)

    def on_device(batch: dict, key: str) -> torch.Tensor | None:
        value = batch.get(key)
        return None if value is None else value.to(device, non_blocking=True)

    def encode_images(batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        return model.encode_images(on_device(batch, "images"))

    def encode_captions(batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        captions = {key: on_device(batch, key) for key in ("tokens", "attention_mask", "concept_labels", "text_states")}
        captions["lengths"] = batch["lengths"]  # on the host, where sequence packing reads them
        return model.encode_captions(captions)

    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()
    try:
        with torch.no_grad():
            img_inst, img_con = _encode_dataset(
                loader(images), encode_images, "image_ids", len(images), "images", progress
            )
            cap_inst, cap_con = _encode_dataset(
                loader(captions), encode_captions, "caption_ids", len(captions), "captions", progress
            )
    finally:
        if was_training is not None:
            model.train(was_training)
    return Embeddings(
        img_inst,
        img_con,
        cap_inst,
        cap_con,
        captions_per_image=len(captions) // len(images),
        fusion=model.cfg.fusion,
    )


def _as_list(value: Any, n: int, name: str) -> list:
    if isinstance(value, (list, tuple, torch.nn.ModuleList)):
        if len(value) != n:
            raise CoderError(f"{len(value)} {name} for {n} models: give one per model or a single shared one")
        return list(value)
    return [value] * n


def encode_models(
    models: Any,
    split: Any,
    tokenizers: Any,
    concept_graphs: Any,
    device: str | torch.device,
    batch_size: int = BATCH_SIZE,
    num_workers: int = 0,
    progress: bool | None = None,
) -> list[Embeddings]:
    """`encode_split` for one model or a list of them (an ensemble); tokenizers and concept
    graphs are given per model or once for all."""
    models = list(models) if isinstance(models, (list, tuple, torch.nn.ModuleList)) else [models]
    if not models:
        raise CoderError("no models to evaluate")
    tokenizers = _as_list(tokenizers, len(models), "tokenizers")
    graphs = _as_list(concept_graphs, len(models), "concept graphs")
    return [
        encode_split(m, split, tok, graph, device, batch_size, num_workers, progress)
        for m, tok, graph in zip(models, tokenizers, graphs)
    ]


# --------------------------------------------------------------------------- similarities


def _check_mu(mu: float) -> float:
    if not isinstance(mu, (int, float)) or isinstance(mu, bool) or not 0.0 <= mu <= 1.0:
        raise CoderError(f"mu must be a number in [0, 1], got {mu!r}")
    return float(mu)


def similarity_matrix(
    emb: Embeddings,
    mu: float,
    device: str | torch.device = "cpu",
    chunk_size: int = 1024,
    *,
    score_fn: ScoreFn | None = None,
) -> torch.Tensor:
    """S = (1-mu)·(v·t) + mu·(v_c·t_c) (docs/method.md), or the model's other `emb.fusion`
    (`model.fused_similarity`), or v·t without a concept branch.

    Computed `chunk_size` images at a time on `device` (the captions are moved there once);
    returned on the CPU in float32. `score_fn(v, v_c, t, t_c, mu)` replaces the formula, e.g.
    a model's own `similarity` method.
    """
    mu = _check_mu(mu)
    if chunk_size < 1:
        raise CoderError(f"chunk_size must be positive, got {chunk_size}")
    device = torch.device(device)
    captions = emb.caption_instance.to(device)
    captions_c = None if emb.caption_concept is None else emb.caption_concept.to(device)
    out = torch.empty(emb.num_images, emb.num_captions, dtype=torch.float32)
    for start in range(0, emb.num_images, chunk_size):
        stop = min(start + chunk_size, emb.num_images)
        v = emb.image_instance[start:stop].to(device)
        v_c = None if emb.image_concept is None else emb.image_concept[start:stop].to(device)
        scores = (
            score_fn(v, v_c, captions, captions_c, mu)
            if score_fn
            else fused_similarity(v, v_c, captions, captions_c, mu, emb.fusion)
        )
        out[start:stop] = scores.float().cpu()
    return out


def ensemble_similarity(
    embeddings: Sequence[Embeddings],
    mu: float | Sequence[float],
    device: str | torch.device = "cpu",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Mean of the models' similarity matrices (one mu for all, or one per model)."""
    if not embeddings:
        raise CoderError("no embeddings to score")
    mus = _as_list(mu, len(embeddings), "mu values")
    shapes = {(e.num_images, e.num_captions) for e in embeddings}
    if len(shapes) > 1:
        raise CoderError(f"ensemble members were encoded on different splits: shapes {sorted(shapes)}")
    total = similarity_matrix(embeddings[0], mus[0], device, chunk_size)
    for emb, m in zip(embeddings[1:], mus[1:]):
        total += similarity_matrix(emb, m, device, chunk_size)
    if len(embeddings) > 1:
        total /= len(embeddings)
    return total


def evaluate(
    models: Any,
    split: Any,
    tokenizers: Any,
    concept_graphs: Any,
    device: str | torch.device,
    mu: float | Sequence[float],
    *,
    protocol: str = "f30k",
    batch_size: int = BATCH_SIZE,
    num_workers: int = 0,
    chunk_size: int = 1024,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Encode `split` with one model or an ensemble (mean of the similarity matrices) and
    score it: protocol "f30k" -> a metrics dict, "coco" -> {"1k": 5-fold mean, "5k": all}."""
    if protocol not in PROTOCOLS:
        raise CoderError(f"unknown evaluation protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")
    embeddings = encode_models(models, split, tokenizers, concept_graphs, device, batch_size, num_workers, progress)
    sims = ensemble_similarity(embeddings, mu, device, chunk_size)
    return protocol_metrics(sims, protocol, embeddings[0].captions_per_image)


def sweep_mu(
    embeddings: Embeddings | Sequence[Embeddings],
    mus: Sequence[float],
    device: str | torch.device = "cpu",
    chunk_size: int = 1024,
) -> tuple[float, dict[float, float]]:
    """Tune mu on dev: rsum for each mu, reusing the embeddings (only similarities are
    recomputed). Returns (best mu, {mu: rsum}); on equal rsum the first mu listed wins."""
    members = [embeddings] if isinstance(embeddings, Embeddings) else list(embeddings)
    if not mus:
        raise CoderError("sweep_mu needs at least one mu value")
    if members and not any(e.has_concepts for e in members):
        raise CoderError("sweep_mu: no model has a concept branch, so mu has no effect")
    table: dict[float, float] = {}
    for mu in mus:
        sims = ensemble_similarity(members, _check_mu(mu), device, chunk_size)
        table[float(mu)] = recall_metrics(sims, members[0].captions_per_image)["rsum"]
    best = max(table, key=lambda m: table[m])
    return best, table


# --------------------------------------------------------------------------- reporting


def _table_rows(metrics: dict[str, float], label: str) -> list[str]:
    rows = []
    for prefix, name in (("i2t", "image->text"), ("t2i", "text->image")):
        recalls = "".join(f"{metrics[f'{prefix}_r{k}']:8.2f}" for k in RECALL_KS)
        rows.append(
            f"{(label + ' ' + name).strip():<20}{recalls}"
            f"{metrics[f'{prefix}_medr']:8.1f}{metrics[f'{prefix}_meanr']:9.2f}"
        )
    rows.append(f"{(label + ' rsum').strip():<20}{metrics['rsum']:8.2f}")
    return rows


def format_table(metrics: dict[str, Any]) -> str:
    """A plain-text table of R@1/5/10 both ways, medr/meanr and rsum; accepts a metrics dict
    or a protocol result such as coco_metrics' {"1k": ..., "5k": ...}."""
    header = f"{'':<20}" + "".join(f"{'R@' + str(k):>8}" for k in RECALL_KS) + f"{'medr':>8}{'meanr':>9}"
    if "rsum" in metrics:
        rows = _table_rows(metrics, "")
    else:
        rows = [row for name, sub in metrics.items() for row in _table_rows(sub, f"[{name}]")]
    return "\n".join([header, *rows])


# --------------------------------------------------------------------------- command line

MU_GRID = tuple(round(0.05 * i, 2) for i in range(21))


def main(argv: Sequence[str] | None, protocol: str) -> dict[str, Any]:
    """The eval_f30k.py / eval_coco.py command line: one checkpoint or an ensemble, an
    optional mu sweep on dev, a printed table and an optional JSON file of the metrics."""
    import json
    from pathlib import Path

    import data
    from checkpoint import load_for_inference
    from options import (
        ArgumentParser,
        check_output_file,
        default_device,
        fraction,
        non_negative_int,
        positive_int,
        torch_device,
    )

    default_split = "testall" if protocol == "coco" else "test"
    parser = ArgumentParser(
        prog=f"eval_{protocol}.py",
        allow_abbrev=False,
        description=f"Evaluate CODER checkpoints on {'MSCOCO (1K 5-fold and 5K)' if protocol == 'coco' else 'Flickr30K'}; "
        "several checkpoints are evaluated as an ensemble (averaged similarities).",
    )
    parser.add_argument("--checkpoint", nargs="+", required=True, help="one or more checkpoint files")
    parser.add_argument("--data_path", "--data-path", default="", help="precomp folder (default: the run's)")
    parser.add_argument("--split", default=default_split)
    parser.add_argument(
        "--mu", type=fraction, default=None, help="concept-branch weight in [0, 1] (default: each run's)"
    )
    parser.add_argument(
        "--sweep-mu", "--sweep_mu", action="store_true", help="pick mu on the dev split (by rsum) before evaluating"
    )
    parser.add_argument("--dev_split", "--dev-split", default="dev")
    parser.add_argument(
        "--dev_max_images",
        "--dev-max-images",
        type=non_negative_int,
        default=script_default("val_max_images", f"train_{protocol}.py"),
        help="first N dev images for the sweep (0: all)",
    )
    parser.add_argument("--json", default="", help="also write the metrics to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument("--batch_size", "--batch-size", type=positive_int, default=BATCH_SIZE)
    parser.add_argument("--workers", type=non_negative_int, default=2)
    parser.add_argument("--device", type=torch_device, default=default_device())
    parser.add_argument(
        "--bert_path",
        "--bert-path",
        default=None,
        help="a bert checkpoint's BERT folder, if the checkpoint does not hold its config and vocabulary",
    )
    args = parser.parse_args(argv)
    if args.json:
        check_output_file(args.json, "--json", args.overwrite, inputs=args.checkpoint)

    device = torch.device(args.device)
    loaded = [load_for_inference(path, device, args.bert_path) for path in args.checkpoint]
    models, tokenizers, graphs, configs = (list(x) for x in zip(*loaded))
    data_path = args.data_path or configs[0]["data_path"]
    mus: list[float] = [args.mu if args.mu is not None else c["mu"] for c in configs]

    def embed(split_name: str, max_images: int | None) -> tuple[Any, list[Embeddings]]:
        split = data.load_split(data_path, split_name, max_images=max_images)
        return split, encode_models(models, split, tokenizers, graphs, device, args.batch_size, args.workers)

    result: dict[str, Any] = {
        "checkpoints": [str(p) for p in args.checkpoint],
        "data_path": str(data_path),
        "split": args.split,
    }
    if args.sweep_mu:
        _, dev_embeddings = embed(args.dev_split, args.dev_max_images or None)
        best, table = sweep_mu(dev_embeddings, MU_GRID, device)
        print(f"mu sweep on {args.dev_split} (rsum): " + " ".join(f"{m:g}:{r:.1f}" for m, r in table.items()))
        print(f"best mu = {best:g}")
        mus = [best] * len(models)
        result["mu_sweep"] = {str(m): r for m, r in table.items()}
    split, embeddings = embed(args.split, None)
    sims = ensemble_similarity(embeddings, mus, device)
    metrics = protocol_metrics(sims, protocol, split.captions_per_image)
    result.update({"mu": mus if len(mus) > 1 else mus[0], "metrics": metrics})
    if constant_scores(sims):
        result["collapsed"] = True
        print("every score is equal (a collapsed model): each ground truth ranks last")
    print(f"{split.num_images} images, {split.num_captions} captions, {len(models)} model(s), mu {result['mu']}")
    print(format_table(metrics))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, lambda f: f.write(json.dumps(result, indent=2)), mode="w")
    return result
