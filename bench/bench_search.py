"""Search-app benchmark (serve.py, photo_index.py): index build time, query latency, and an
approximate faiss index against exact search.

    python bench/bench_search.py --checkpoint bench/out/flickr8k/runs/coder_s0/best.pt \
        --photos data/flickr8k/images [--build_photos 1000] [--gallery 100000] [--faiss 1000000]

1. index build: the first --build_photos photos of --photos embedded from their files (region
   backbone + the checkpoint's image encoder), seconds per 1,000 photos;
2. text queries against --gallery synthetic photo embeddings (unit vectors around 1,000
   random centres, the checkpoint's fused size): latency p50/p95 of the whole query (text
   encoder + exact search) and of the search alone, over 200 queries;
3. --faiss synthetic vectors of the same kind: build time of the faiss IVF index, its
   recall@10 against exact search and both latencies, for a few nprobe values (0 skips).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUERIES = [
    "a dog runs through the snow",
    "two children play on the beach",
    "a man rides a bike on a dirt path",
    "a girl in a pink dress jumps",
    "people walk down a busy city street",
    "a brown dog swims in a lake",
    "a skateboarder does a trick",
    "a climber on a rock wall",
    "a group of people sit on a bench",
    "a black and white dog catches a ball",
]


def synthetic(n: int, dim: int, seed: int) -> torch.Tensor:
    """Unit vectors clustered around 1,000 random centres: closer to real embeddings (which
    form groups) than uniform noise, on which no approximate index works."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(1000, dim, generator=gen), dim=1)
    out = torch.empty(n, dim)
    for start in range(0, n, 100_000):
        rows = min(100_000, n - start)
        which = torch.randint(0, 1000, (rows,), generator=gen)
        noise = 2.0 * torch.randn(rows, dim, generator=gen) / dim**0.5  # norm about 2: loose clusters
        out[start : start + rows] = torch.nn.functional.normalize(centres[which] + noise, dim=1)
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50_ms": 1000 * statistics.median(ordered), "p95_ms": 1000 * ordered[int(0.95 * (len(ordered) - 1))]}


def time_queries(run, repeats: int = 200) -> dict[str, float]:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - start)
    return percentiles(times)


def main(argv: list[str] | None = None) -> dict:
    from photo_index import Embedder, VectorSearch, build_faiss

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--photos", default=str(ROOT / "data" / "flickr8k" / "images"))
    parser.add_argument("--build_photos", type=int, default=1000)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--faiss", type=int, default=1_000_000)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    embedder = Embedder(args.checkpoint, "cpu")
    result: dict = {"threads": torch.get_num_threads(), "dim": embedder.dim}

    paths = sorted(p for p in Path(args.photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    paths = paths[: args.build_photos]
    start = time.perf_counter()
    embedder.photos(paths)
    seconds = time.perf_counter() - start
    result["build"] = {"photos": len(paths), "seconds": seconds, "seconds_per_1000": 1000 * seconds / len(paths)}
    print(
        f"index build: {len(paths)} photos in {seconds:.1f} s = {result['build']['seconds_per_1000']:.0f} s per "
        f"1,000 photos",
        flush=True,
    )

    gallery = VectorSearch(synthetic(args.gallery, embedder.dim, 1))
    query_vectors = embedder.texts(QUERIES)
    gallery.search(query_vectors[:1], 10)  # warm-up
    result["gallery"] = {
        "photos": args.gallery,
        "text_query": time_queries(lambda i: gallery.search(embedder.texts([QUERIES[i % len(QUERIES)]]), 10)),
        "search_only": time_queries(lambda i: gallery.search(query_vectors[i % len(QUERIES)], 10)),
    }
    print(
        f"{args.gallery:,} photos: text query p50 {result['gallery']['text_query']['p50_ms']:.1f} ms, p95 "
        f"{result['gallery']['text_query']['p95_ms']:.1f} ms; search alone p50 "
        f"{result['gallery']['search_only']['p50_ms']:.2f} ms, p95 {result['gallery']['search_only']['p95_ms']:.2f} ms",
        flush=True,
    )

    if args.faiss:
        vectors = synthetic(args.faiss, embedder.dim, 2)
        exact = VectorSearch(vectors)
        queries = torch.nn.functional.normalize(
            vectors[torch.randperm(args.faiss)[:200]] + 0.05 * torch.randn(200, embedder.dim), dim=1
        )
        truth = exact.search(queries, 10)[1]
        exact_time = time_queries(lambda i: exact.search(queries[i : i + 1], 10), repeats=50)
        start = time.perf_counter()
        index = build_faiss(vectors.numpy())
        build_seconds = time.perf_counter() - start
        rows = []
        for nprobe in (8, 32, 128):
            index.nprobe = nprobe
            found = torch.from_numpy(index.search(queries.numpy(), 10)[1])
            recall = float(sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth)) / truth.numel())
            latency = time_queries(lambda i: index.search(queries[i : i + 1].numpy(), 10))
            rows.append({"nprobe": nprobe, "recall_at_10": recall, **latency})
            print(
                f"faiss IVF ({index.nlist} lists) nprobe {nprobe}: recall@10 {recall:.3f}, p50 "
                f"{latency['p50_ms']:.2f} ms, p95 {latency['p95_ms']:.2f} ms",
                flush=True,
            )
        result["faiss"] = {
            "vectors": args.faiss,
            "lists": index.nlist,
            "build_seconds": build_seconds,
            "exact": exact_time,
            "rows": rows,
        }
        print(
            f"{args.faiss:,} vectors: faiss build {build_seconds:.0f} s; exact search p50 "
            f"{exact_time['p50_ms']:.1f} ms, p95 {exact_time['p95_ms']:.1f} ms",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
