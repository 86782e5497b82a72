"""Benchmark: one training epoch over a multi-GB precomp feature file, peak memory against its size.

Writes a synthetic `train_ims.npy` (N, 36, 2048) float32 of about --gb GB plus 5 captions per
image (reused when already there), then, in a fresh process, iterates one epoch of PairDataset
through a shuffling DataLoader and samples /proc/<pid>/status. Reported (docs/benchmarks.md#component-benchmarks):
RSS (VmRSS, counts mapped page-cache pages) and anonymous memory (RssAnon), both minus an idle
interpreter with torch and the project imported; workers' memory is added when --workers > 0.
Target: peak RSS increase under 10% of the file size. Linux only.

    python bench/bench_data.py --gb 2 [--dir bench/out] [--batch-size 128] [--workers 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORDS = "a man woman dog cat red blue runs sits on the grass street with near big small ball".split()
MB = 2**20


def write_dataset(out: Path, gb: float, regions: int, dim: int) -> int:
    """Write (or reuse) train_ims.npy of ~gb GB and train_caps.txt; return the image count."""
    n = max(1, int(gb * 1e9 // (regions * dim * 4)))
    ims = out / "train_ims.npy"
    header = {"descr": "<f4", "fortran_order": False, "shape": (n, regions, dim)}
    out.mkdir(parents=True, exist_ok=True)
    expected = None
    if ims.exists():
        with ims.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape = read_header(f)[0]
            expected = f.tell() + n * regions * dim * 4
    if expected is None or shape != header["shape"] or ims.stat().st_size != expected:
        rng = np.random.default_rng(0)
        block = rng.random((256, regions, dim), dtype=np.float32)  # 75 MB, written repeatedly
        with ims.open("wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            for start in range(0, n, len(block)):
                block[: min(len(block), n - start)].tofile(f)
        rng = np.random.default_rng(1)
        lines = (" ".join(rng.choice(WORDS, size=int(rng.integers(6, 14)))) for _ in range(5 * n))
        (out / "train_caps.txt").write_text("\n".join(lines) + "\n")
    return n


def _status_kb(pid: int | str, keys: tuple[str, ...] = ("VmRSS", "RssAnon")) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {k: 0 for k in keys}
    values = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: int(values.get(k, "0 kB").split()[0]) for k in keys}


def _children() -> list[str]:
    kids: list[str] = []
    for task in Path("/proc/self/task").iterdir():
        try:
            kids += (task / "children").read_text().split()
        except OSError:
            pass
    return kids


def measure(out: Path, batch_size: int, workers: int, threads: int) -> dict:
    """Iterate one epoch in this (fresh) process and report memory and speed."""
    import functools

    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(threads)

    sys.path.insert(0, str(ROOT))
    import concepts
    import data
    import vocab

    base = _status_kb("self")
    peak = dict(base)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            now = _status_kb("self")
            for pid in _children():
                for k, v in _status_kb(pid).items():
                    now[k] += v
            for k in peak:
                peak[k] = max(peak[k], now[k])
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    split = data.load_split(out, "train")
    tok = vocab.Vocabulary.from_words(WORDS)
    graph = concepts.ConceptGraph(
        WORDS[1:], np.ones(len(WORDS) - 1), np.zeros((len(WORDS) - 1,) * 2), np.ones((len(WORDS) - 1, 50))
    )
    loader = DataLoader(
        data.PairDataset(split, tok, graph),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=functools.partial(data.collate, pad_id=tok.pad_id),
    )
    start = time.perf_counter()
    items = 0
    for batch in loader:
        items += len(batch["caption_ids"])
    elapsed = time.perf_counter() - start
    stop.set()
    sampler.join()
    file_mb = split.images_path.stat().st_size / MB
    peak_rss_mb = (peak["VmRSS"] - base["VmRSS"]) / 1024
    return {
        "file_mb": round(file_mb, 1),
        "images": split.num_images,
        "items": items,
        "batch_size": batch_size,
        "workers": workers,
        "threads": threads,
        "idle_rss_mb": round(base["VmRSS"] / 1024, 1),
        "idle_anon_mb": round(base["RssAnon"] / 1024, 1),
        "peak_rss_increase_mb": round(peak_rss_mb, 1),
        "peak_anon_increase_mb": round((peak["RssAnon"] - base["RssAnon"]) / 1024, 1),
        "peak_rss_fraction_of_file": round(peak_rss_mb / file_mb, 4),
        "items_per_s": round(items / elapsed, 1),
        "epoch_s": round(elapsed, 1),
        "target_met": peak_rss_mb < 0.1 * file_mb,
    }


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from options import script_default

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="feature file size in GB (default 2)")
    parser.add_argument("--dir", type=Path, default=ROOT / "bench" / "out", help="where the files go")
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=script_default("batch_size"))
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in the main process, where collate runs when --workers 0 (default 1)",
    )
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.dir, args.batch_size, args.workers, args.threads)))
        return
    t = time.perf_counter()
    n = write_dataset(args.dir, args.gb, args.regions, args.dim)
    print(f"dataset: {n} images in {args.dir} ({time.perf_counter() - t:.1f} s to write or check)", file=sys.stderr)
    cmd = [
        sys.executable,
        __file__,
        "--measure",
        "--dir",
        str(args.dir),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--threads",
        str(args.threads),
    ]
    result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(json.dumps(result))
    verdict = "met" if result["target_met"] else "NOT met"
    print(
        f"peak RSS +{result['peak_rss_increase_mb']} MB (anon +{result['peak_anon_increase_mb']} MB) for a "
        f"{result['file_mb']:.0f} MB file = {100 * result['peak_rss_fraction_of_file']:.2f}% (target <10%: {verdict}); "
        f"{result['items_per_s']} items/s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
