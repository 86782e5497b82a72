"""Benchmark: vectorised `evaluation.recall_metrics` vs the per-query argsort loops of the
SCAN/VSE++ evaluation code, on a COCO-5K-sized (5,000 x 25,000) float32 score matrix.

Both run in the same process on the same matrix; the script asserts that they give identical
ranks and metrics, and prints the times, the speed ratio and the peak memory of each.

    python bench/bench_metrics.py                 # 5,000 images x 5 captions
    python bench/bench_metrics.py --images 1000   # quicker
    python bench/bench_metrics.py --device cuda   # the vectorised version on a GPU
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import evaluation  # noqa: E402


def scan_style_ranks(sims: np.ndarray, cpi: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference loops as SCAN/VSE++ write them (i2t and t2i functions of evaluation.py)."""
    n_img = sims.shape[0]
    image_ranks = np.zeros(n_img)
    for index in range(n_img):
        inds = np.argsort(sims[index])[::-1]
        rank = 1e20
        for i in range(cpi * index, cpi * index + cpi):
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        image_ranks[index] = rank
    caption_ranks = np.zeros(cpi * n_img)
    for index in range(n_img):
        columns = sims[:, cpi * index : cpi * index + cpi].T
        for i in range(cpi):
            inds = np.argsort(columns[i])[::-1]
            caption_ranks[cpi * index + i] = np.where(inds == index)[0][0]
    return image_ranks, caption_ranks


def scan_style_metrics(sims: np.ndarray, cpi: int) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    image_ranks, caption_ranks = scan_style_ranks(sims, cpi)
    metrics: dict[str, float] = {}
    for prefix, ranks in (("i2t", image_ranks), ("t2i", caption_ranks)):
        for k in (1, 5, 10):
            metrics[f"{prefix}_r{k}"] = 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
        metrics[f"{prefix}_medr"] = float(np.floor(np.median(ranks)) + 1)
        metrics[f"{prefix}_meanr"] = float(ranks.mean() + 1)
    metrics["rsum"] = sum(metrics[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in (1, 5, 10))
    return metrics, image_ranks, caption_ranks


def make_sims(n_img: int, cpi: int, seed: int) -> np.ndarray:
    """Gaussian float32 scores with a boost on the ground truth (so recalls are neither 0 nor
    100), nudged so that no ground-truth score ties another score in its row or column: with
    a tie, argsort order (SCAN) and the project's rule (docs/training.md#evaluation) may legitimately differ."""
    rng = np.random.default_rng(seed)
    sims = rng.standard_normal((n_img, n_img * cpi), dtype=np.float32)
    caps = np.arange(n_img * cpi)
    owner = caps // cpi
    sims[owner, caps] += 4.0
    for _ in range(100):
        own = sims[owner, caps]
        tied_cols = np.flatnonzero((sims == own[None, :]).sum(axis=0) > 1)
        best_cap = own.reshape(n_img, cpi).argmax(axis=1) + np.arange(n_img) * cpi
        tied_rows = np.flatnonzero((sims == own[best_cap][:, None]).sum(axis=1) > 1)
        tied = np.union1d(tied_cols, best_cap[tied_rows])
        if tied.size == 0:
            return sims
        sims[owner[tied], tied] = np.nextafter(sims[owner[tied], tied], np.float32(np.inf))
    raise RuntimeError("could not remove ties at the ground truth")


def _proc_status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float | None]:
    """Run fn once: (result, seconds, peak RSS above the starting RSS in MiB, or None).

    Peak RSS is Linux's VmHWM after resetting it through /proc/self/clear_refs, so it sees
    every allocation (torch's CPU allocator included) at no cost to the timing.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        rss_start: int | None = _proc_status("VmRSS")
    except OSError:
        rss_start = None
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    rss_peak = None if rss_start is None else (_proc_status("VmHWM") - rss_start) / 1024
    return result, seconds, rss_peak


def traced_peak(fn: Callable[[], Any]) -> float:
    """tracemalloc peak in MiB of an untimed run: Python and NumPy allocations only (torch's
    CPU allocator is invisible to it, which is why RSS is measured too)."""
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return peak


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the fast version (best is reported)")
    parser.add_argument("--device", default="cpu", help="where recall_metrics runs (cpu, cuda)")
    parser.add_argument(
        "--trace-slow", action="store_true", help="also run the slow loops under tracemalloc (doubles the run time)"
    )
    args = parser.parse_args()
    cpi = args.captions_per_image

    device = torch.device(args.device)
    sims = make_sims(args.images, cpi, args.seed)
    scores = sims if device.type == "cpu" else torch.from_numpy(sims).to(device)
    print(
        f"matrix: {sims.shape[0]} x {sims.shape[1]} float32 ({sims.nbytes / 2**20:.0f} MiB), "
        f"no ground-truth ties; recall_metrics on {device}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads; load average {os.getloadavg()[0]:.1f}"
    )

    def run_fast() -> dict[str, float]:
        return evaluation.recall_metrics(scores, cpi)  # ends with a device-to-host copy (synchronises)

    def run_slow() -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        return scan_style_metrics(sims, cpi)

    fast_runs = [measure(run_fast) for _ in range(args.repeats)]
    fast, fast_s, fast_rss = fast_runs[0][0], min(run[1] for run in fast_runs), fast_runs[-1][2]
    fast_notes = [f"peak RSS +{mib(fast_rss)} (last run)", f"tracemalloc peak {mib(traced_peak(run_fast))}"]
    fast_1t_s = None
    if device.type == "cpu":
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        fast_1t_s = min(measure(run_fast)[1] for _ in range(args.repeats))
        torch.set_num_threads(torch_threads)
        fast_notes.insert(0, f"{fast_1t_s:.3f} s with 1 torch thread")
    else:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run_fast()
        fast_notes.append(f"GPU peak +{mib((torch.cuda.max_memory_allocated(device) - base) / 2**20)} above the matrix")
    (slow, slow_img, slow_cap), slow_s, slow_rss = measure(run_slow)
    slow_traced = traced_peak(run_slow) if args.trace_slow else None

    fast_img, fast_cap = evaluation.retrieval_ranks(scores, cpi)
    assert np.array_equal(fast_img.cpu().numpy(), slow_img), "image ranks differ"
    assert np.array_equal(fast_cap.cpu().numpy(), slow_cap), "caption ranks differ"
    assert fast == slow, f"metrics differ:\n{fast}\n{slow}"
    print("identical ranks and metrics:")
    print(evaluation.format_table(fast))
    print(
        f"recall_metrics (vectorised, {device}): {fast_s:.3f} s best of {args.repeats} "
        f"({', '.join(f'{run[1]:.3f}' for run in fast_runs)}); {'; '.join(fast_notes)}"
    )
    print(
        f"SCAN/VSE++ argsort loops (NumPy, CPU): {slow_s:.3f} s; peak RSS +{mib(slow_rss)}, "
        f"tracemalloc peak {mib(slow_traced)}"
    )
    ratio = f"speed-up: {slow_s / fast_s:.1f}x"
    if fast_1t_s is not None:
        ratio += f" ({slow_s / fast_1t_s:.1f}x with 1 torch thread, like NumPy's single-threaded argsort)"
    print(ratio + "; target >= 30x")


if __name__ == "__main__":
    main()
