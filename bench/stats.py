"""Intervals for the benchmark's comparisons: paired t over seeds, paired bootstrap over images.

Every comparison in the docs carries one of these. A seed-paired difference (same seed, two
configurations) gets a Student t interval; a single run gets a bootstrap over the evaluated
images, each drawn with its captions, from the per-image ranks a validation saved
(`trainer.validate`'s ranks file). An interval that contains zero reads "level within noise".
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Sequence

import numpy as np

from evaluation import RECALL_KS

# Two-sided 95% quantiles of Student's t, by degrees of freedom; 1.96 beyond the table.
T_975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def t_quantile(dof: int) -> float:
    """The 97.5% quantile of t with `dof` degrees of freedom (the table's next lower entry
    between its rows, which widens the interval slightly)."""
    if dof < 1:
        raise ValueError("a t interval needs at least two paired values")
    if dof > 30:
        return 1.96
    return T_975[max(d for d in T_975 if d <= dof)]


def paired_t_interval(differences: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t interval of the mean of per-seed paired differences."""
    n = len(differences)
    mean = statistics.fmean(differences)
    half = t_quantile(n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return mean, mean - half, mean + half


def rsum_of_images(image_ranks: np.ndarray, caption_ranks: np.ndarray, images: np.ndarray) -> np.ndarray:
    """rsum over the images in each row of `images` (S, M) (repeats allowed) and their captions,
    from 0-based ranks: image_ranks (N,), caption_ranks (N·cpi,). Returns (S,)."""
    per_image = caption_ranks.reshape(len(image_ranks), -1)
    total = np.zeros(images.shape[0])
    for k in RECALL_KS:
        total += 100.0 * (image_ranks[images] < k).mean(1)
        total += 100.0 * (per_image[images] < k).mean(2).mean(1)
    return total


def bootstrap_interval(
    ranks: tuple[np.ndarray, np.ndarray],
    other: tuple[np.ndarray, np.ndarray] | None = None,
    samples: int = 2000,
    seed: int = 0,
    subset: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """(estimate, low, high), a 95% percentile interval from resampling images with their
    captions: of one run's rsum, or, given `other`'s ranks on the same images, of the paired
    difference rsum(ranks) − rsum(other). `subset` restricts both to those images."""
    images = np.arange(len(ranks[0])) if subset is None else np.asarray(subset)
    draws = np.random.default_rng(seed).choice(images, size=(samples, len(images)))
    values = rsum_of_images(*ranks, draws)
    estimate = rsum_of_images(*ranks, images[None, :])[0]
    if other is not None:
        values = values - rsum_of_images(*other, draws)
        estimate = estimate - rsum_of_images(*other, images[None, :])[0]
    low, high = np.percentile(values, [2.5, 97.5])
    return float(estimate), float(low), float(high)


def verdict(low: float, high: float) -> str:
    """How a difference with this 95% interval reads."""
    if low <= 0.0 <= high:
        return "level within noise"
    return "higher" if low > 0 else "lower"


def read_ranks(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The (image ranks, caption ranks) of a validation's ranks file."""
    with np.load(path) as saved:
        return saved["image_ranks"].astype(np.int64), saved["caption_ranks"].astype(np.int64)


def dev_halves(num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """The dev images split for choosing and reporting: even positions choose, odd report
    (both halves cover the whole file's order; the gallery stays the whole split)."""
    positions = np.arange(num_images)
    return positions[0::2], positions[1::2]
