"""Benchmark: the frozen-BERT text state cache at COCO size, peak memory against the file size.

Synthetic captions (COCO's 566,000 training captions by default, about 13.5 BERT tokens each)
go through a random BERT of MiniLM's width (384) whose single frozen layer is cheap, in two
fresh processes: one builds the cache file (text_cache.frozen_text_states), one reads every
caption once in a shuffled order and pads batches as the training loader does. Each samples
/proc/self/status as bench/bench_data.py does for the features: peak RSS (counts mapped
page-cache pages) and RssAnon over an idle interpreter with torch, the project and the encoder
loaded (its weights resident, after one warm-up batch), as a share of the file. The token-id lists (which a training run holds while it looks
up the cache) are counted. BERT-base (768 wide) doubles the file, and only the per-batch
buffers of the growth. Target: peak RSS growth under 10% of the file. Linux only.

    python bench/bench_text_states.py [--captions 566000] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench_data import _status_kb  # noqa: E402  (the same /proc reading as the feature benchmark)
from options import script_default  # noqa: E402

HIDDEN = 384  # MiniLM's width
BERT_BASE_HIDDEN = 768
MEAN_TOKENS = 13.5  # COCO: about 11.5 words a caption, plus [CLS] and [SEP]
MB = 2**20


def synthetic_token_ids(count: int) -> list[list[int]]:
    """COCO-like captions as BERT token ids, as Python lists (what the trainer builds)."""
    rng = np.random.default_rng(0)
    lengths = np.clip(np.rint(rng.normal(MEAN_TOKENS, 2.5, count)), 8, 50).astype(int)
    ids = rng.integers(1000, 30000, int(lengths.sum()))
    cuts = np.cumsum(lengths)[:-1]
    return [part.tolist() for part in np.split(ids, cuts)]


def random_encoder(folder: Path) -> Any:
    """A BertTextEncoder over a random 384-wide BERT whose bottom is one frozen layer."""
    import torch
    from transformers import BertConfig, BertModel

    from encoders import BertTextEncoder

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=6, intermediate_size=HIDDEN
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return BertTextEncoder(str(folder), 32, "mean", length_groups=1, frozen_layers=1, l2norm_items=False)


def peak_growth(work: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """`work()`'s result and this process's peak VmRSS / RssAnon growth (MB) while it ran."""
    base = _status_kb("self")
    peak = dict(base)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for key, value in _status_kb("self").items():
                peak[key] = max(peak[key], value)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = work()
    finally:
        stop.set()
        sampler.join()
    return result, {
        "seconds": time.perf_counter() - start,
        "idle_rss_mb": base["VmRSS"] / 1024,
        "rss_mb": (peak["VmRSS"] - base["VmRSS"]) / 1024,
        "anon_mb": (peak["RssAnon"] - base["RssAnon"]) / 1024,
    }


def read_epoch(states: Any, batch_size: int) -> int:
    """Every caption once, shuffled, padded into (B, L, h) batches as data.collate does."""
    import torch

    order = np.random.default_rng(1).permutation(len(states))
    for start in range(0, len(order), batch_size):
        rows = [torch.from_numpy(states[int(i)]) for i in order[start : start + batch_size]]
        batch = torch.zeros(len(rows), max(len(r) for r in rows), rows[0].shape[1])
        for i, r in enumerate(rows):
            batch[i, : len(r)] = r
    return len(order)


def measure(phase: str, folder: Path, captions: int, batch_size: int) -> dict[str, Any]:
    """One phase ("build" or "read") in this fresh process."""
    import torch

    import text_cache

    torch.set_num_threads(2)
    encoder = random_encoder(folder / "bert")
    sum(float(p.sum()) for p in encoder.parameters())  # the weights (a mapped file) resident, as in training
    warm_up = torch.ones(batch_size, 50, dtype=torch.long)  # the longest batch, so that lazily loaded
    encoder.bottom_states(warm_up, warm_up)  # kernels and allocator pools are idle memory

    def run() -> Any:
        states = text_cache.frozen_text_states(
            encoder, synthetic_token_ids(captions), folder / "cache", batch_size=batch_size
        )
        return read_epoch(states, 128) if phase == "read" else len(states)

    done, growth = peak_growth(run)
    (path,) = (folder / "cache").glob("*.states.npy")
    return {"phase": phase, "captions": done, "file_mb": path.stat().st_size / MB, **growth}


def _child(phase: str, folder: Path, captions: int, batch_size: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--measure",
        phase,
        "--dir",
        str(folder),
        "--captions",
        str(captions),
        "--batch-size",
        str(batch_size),
    ]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def report(build: dict[str, Any], read: dict[str, Any]) -> str:
    tokens = build["file_mb"] * MB / (HIDDEN * 4)
    lines = [
        f"{build['captions']:,} captions, {tokens:,.0f} tokens: file {build['file_mb'] / 1024:.2f} GiB at width "
        f"{HIDDEN}; {build['file_mb'] * BERT_BASE_HIDDEN / HIDDEN / 1024:.2f} GiB at BERT-base's {BERT_BASE_HIDDEN}"
    ]
    for phase in (build, read):
        share = phase["rss_mb"] / phase["file_mb"]
        lines.append(
            f"{phase['phase']}: {phase['seconds']:.0f} s ({phase['captions'] / phase['seconds']:,.0f} "
            f"captions/s); peak RSS +{phase['rss_mb']:.0f} MiB = {100 * share:.1f}% of the file (RssAnon "
            f"+{phase['anon_mb']:.0f} MiB) over an idle {phase['idle_rss_mb']:.0f} MiB; target <10%: "
            f"{'met' if share < 0.1 else 'NOT met'}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--captions", type=int, default=566_000, help="synthetic captions (default: COCO's 566,000)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a new temporary folder)")
    parser.add_argument(
        "--batch-size", type=int, default=script_default("eval_batch_size"), help="captions per BERT batch"
    )
    parser.add_argument("--keep", action="store_true", help="keep the cache file (default: deleted at the end)")
    parser.add_argument("--measure", choices=("build", "read"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.dir, args.captions, args.batch_size)))
        return
    folder = args.dir or Path(tempfile.mkdtemp(prefix="text_states_bench_"))
    needed = args.captions * MEAN_TOKENS * HIDDEN * 4 * 1.05
    free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    if free < needed:
        raise SystemExit(f"{folder}: {needed / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free; pass fewer --captions")
    try:
        build = _child("build", folder, args.captions, args.batch_size)
        read = _child("read", folder, args.captions, args.batch_size)
    finally:
        if not args.keep:
            shutil.rmtree(folder / "cache", ignore_errors=True)
            shutil.rmtree(folder / "bert", ignore_errors=True)
            if args.dir is None:
                shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"build": build, "read": read}))
    print(report(build, read), file=sys.stderr)


if __name__ == "__main__":
    main()
