"""bench/stats.py against straightforward computations: loops over images and captions."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import stats  # noqa: E402


def naive_rsum(image_ranks, caption_ranks, images, cpi):
    """R@1+5+10 both ways over a list of images (repeats count twice) and their captions."""
    total = 0.0
    for k in (1, 5, 10):
        total += 100.0 * sum(image_ranks[i] < k for i in images) / len(images)
        hits = [caption_ranks[i * cpi + c] < k for i in images for c in range(cpi)]
        total += 100.0 * sum(hits) / len(hits)
    return total


def random_ranks(n: int, cpi: int, seed: int, scale: float = 8.0):
    rng = np.random.default_rng(seed)
    return (rng.exponential(scale, n).astype(np.int64), rng.exponential(scale, n * cpi).astype(np.int64))


def test_rsum_of_images_matches_loops() -> None:
    image_ranks, caption_ranks = random_ranks(30, 5, seed=1)
    draws = np.random.default_rng(2).integers(0, 30, size=(4, 30))
    got = stats.rsum_of_images(image_ranks, caption_ranks, draws)
    for row, value in zip(draws, got):
        assert value == pytest.approx(naive_rsum(image_ranks, caption_ranks, list(row), 5), abs=1e-9)


def test_paired_t_interval_against_the_formula() -> None:
    diffs = [7.9, 6.4, 1.6]
    mean, low, high = stats.paired_t_interval(diffs)
    half = 4.303 * statistics.stdev(diffs) / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((statistics.fmean(diffs), mean - half, mean + half))
    assert low < 0 < high and stats.verdict(low, high) == "level within noise"
    with pytest.raises(ValueError):
        stats.paired_t_interval([1.0])


def test_t_quantile_matches_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    for dof in (1, 2, 3, 5, 10, 30):
        assert stats.t_quantile(dof) == pytest.approx(scipy_stats.t.ppf(0.975, dof), abs=1e-3)


def test_bootstrap_is_paired_and_centred() -> None:
    ranks = random_ranks(200, 5, seed=3)
    better = (np.maximum(ranks[0] - 2, 0), np.maximum(ranks[1] - 2, 0))  # every rank improves
    estimate, low, high = stats.bootstrap_interval(better, ranks, samples=500)
    assert estimate == pytest.approx(naive_rsum(*better, range(200), 5) - naive_rsum(*ranks, range(200), 5))
    assert 0 < low <= estimate <= high and stats.verdict(low, high) == "higher"
    # a run against itself: a zero-width interval at zero
    assert stats.bootstrap_interval(ranks, ranks, samples=100) == (0.0, 0.0, 0.0)
    # one run alone: its rsum inside its interval; a subset uses only those images
    estimate, low, high = stats.bootstrap_interval(ranks, samples=500, subset=np.arange(0, 200, 2))
    assert estimate == pytest.approx(naive_rsum(*ranks, range(0, 200, 2), 5))
    assert low < estimate < high


def test_dev_halves_partition_the_images() -> None:
    choose, report = stats.dev_halves(7)
    assert sorted(np.concatenate([choose, report]).tolist()) == list(range(7))
    assert not set(choose.tolist()) & set(report.tolist())


def test_false_negative_shares_against_loops() -> None:
    import false_negatives as fn

    rng = np.random.default_rng(4)
    n_img, cpi = 12, 2
    sims = rng.normal(size=(n_img, n_img * cpi))
    weight, _, _ = fn.top_negative_shares(sims, cpi, beta=0.0, tau=0.5, top_fraction=0.1)
    assert weight == pytest.approx(2 / 22)  # uniform weights: 2 of 22 negatives
    weight, gradient, top = fn.top_negative_shares(sims, cpi, beta=3.0, tau=0.5, top_fraction=0.1)
    weights, gradients = [], []
    for i in range(n_img):
        negatives = [j for j in range(n_img * cpi) if j // cpi != i]
        order = sorted(negatives, key=lambda j: -sims[i, j])[:2]  # 10% of 22 negatives
        assert sorted(top[i].tolist()) == sorted(order)
        w = {j: math.exp(3.0 * sims[i, j]) for j in negatives}
        g = {j: w[j] * math.exp(sims[i, j] / 0.5) for j in negatives}
        weights.append(sum(w[j] for j in order) / sum(w.values()))
        gradients.append(sum(g[j] for j in order) / sum(g.values()))
    assert weight == pytest.approx(statistics.fmean(weights)) and gradient == pytest.approx(statistics.fmean(gradients))
    text = rng.normal(size=(n_img * cpi, 5))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    text_sims = text @ text.T
    median = fn.within_image_median(text_sims, cpi)
    assert median == pytest.approx(float(np.median([text_sims[2 * i, 2 * i + 1] for i in range(n_img)])))
    same = [max(text_sims[i * cpi + c, j] for c in range(cpi)) >= median for i in range(n_img) for j in top[i]]
    assert fn.same_scene_share(top, text_sims, cpi, median) == pytest.approx(sum(same) / len(same))


def test_sparing_shares_against_loops() -> None:
    import false_negatives as fn

    rng = np.random.default_rng(5)
    n_img, cpi = 9, 3
    n_cap = n_img * cpi
    key = rng.normal(size=(n_cap, 4))
    key /= np.linalg.norm(key, axis=1, keepdims=True)
    scene = rng.normal(size=(n_cap, 4))
    scene /= np.linalg.norm(scene, axis=1, keepdims=True)
    key_sims, scene_sims = key @ key.T, scene @ scene.T
    for threshold, scene_threshold in ((0.3, 0.4), (0.6, 0.2)):
        pairs = [(c, n) for c in range(n_cap) for n in range(n_cap) if c // cpi != n // cpi]
        dropped = {(c, n) for c, n in pairs if key_sims[c, n] > threshold}
        same = {
            (c, n) for c, n in pairs if max(scene_sims[c // cpi * cpi + o, n] for o in range(cpi)) >= scene_threshold
        }
        share, precision, recall = fn.sparing_shares(key_sims, scene_sims, cpi, threshold, scene_threshold)
        assert share == pytest.approx(len(dropped) / len(pairs))
        assert precision == pytest.approx(len(dropped & same) / len(dropped))
        assert recall == pytest.approx(len(dropped & same) / len(same))
