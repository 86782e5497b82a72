"""Benchmark: photo decoding at the size the backbone needs, on camera-sized JPEGs.

Makes --photos camera-sized JPEGs (--size, default 4000x3000, quality --quality) by upscaling
Flickr8k photos into a temporary folder, then measures in one run, for the 224-px photos and
the camera-sized ones, each decoded at full size (the pre-`Image.draft` path, kept here only as
the baseline) and through `backbones.open_photo` (reduced-scale decoding where it applies):

- decoding + preprocessing alone, in photos/s (one process);
- the network alone on the preprocessed batches, and decoding's share of decoding + network;
- end-to-end `extract_features.extract_split` time (by default with the extractor's defaults:
  batch 32, 2 decoding workers), as a ratio to the 224-px photos;

each the best of --repeats rounds that time every case in turn, in wall-clock and in CPU
seconds (all threads and the decoding workers: what stays comparable while other jobs share
the machine), and
the cosine of the pooled (mean over regions) EfficientNet-Lite0 features of reduced-scale vs
full decoding, per camera-sized photo: min and mean.

Goals (docs/benchmarks.md#photo-decoding): decoding at least 3x faster on camera-sized photos, end-to-end within 1.3x
of the 224-px photos, unchanged on small ones.

    python bench/bench_decode.py [--photos 24] [--size 4000x3000] [--quality 90] [--grain 0]
        [--repeats 3] [--batch-size 32] [--workers 2]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import backbones  # noqa: E402
import extract_features  # noqa: E402


class FullDecode(backbones.CenterCropNormalize):
    """The baseline: the photo decoded at its full size, then the same preprocessing."""

    def photo(self, source: Path | str | bytes) -> torch.Tensor:
        with Image.open(source, formats=backbones.PHOTO_FORMATS) as image:
            return self(image.convert("RGB"))


def make_photos(sources: list[Path], folder: Path, size: tuple[int, int], quality: int, grain: float) -> list[Path]:
    """Upscale each source photo to `size` (bicubic), optionally add Gaussian grain of
    `grain` grey levels (camera-like detail), and save as a JPEG of `quality`."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in sources:
        with Image.open(source, formats=backbones.PHOTO_FORMATS) as image:
            image = image.convert("RGB").resize(size, Image.BICUBIC)
        if grain:
            pixels = np.asarray(image, np.float32) + rng.normal(0, grain, (size[1], size[0], 3)).astype(np.float32)
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        path = folder / source.name
        image.save(path, "JPEG", quality=quality)
        paths.append(path)
    return paths


def timed(work: Callable[[], object]) -> np.ndarray:
    """[wall, CPU] seconds of `work`; CPU counts every thread and the finished DataLoader
    workers, and is what stays comparable when other jobs share the machine."""

    def clocks() -> np.ndarray:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return np.array([time.perf_counter(), time.process_time() + children.ru_utime + children.ru_stime])

    start = clocks()
    work()
    return clocks() - start


@dataclass
class Case:
    """One kind of photo and decoding, with its best [wall, CPU] seconds so far."""

    name: str
    paths: list[Path]
    prep: backbones.CenterCropNormalize
    decode: np.ndarray = field(default_factory=lambda: np.full(2, np.inf))
    end_to_end: np.ndarray = field(default_factory=lambda: np.full(2, np.inf))


def measure_round(
    cases: list[Case], backbone: backbones.Backbone, out: Path, batch_size: int, workers: int
) -> np.ndarray:
    """Time every case once, one after another (so that other load on the machine falls on
    all alike), keeping each case's best; returns the network's time on the first case."""
    for case in cases:
        case.decode = np.minimum(case.decode, timed(lambda: [case.prep.photo(p) for p in case.paths]))
        backbone.preprocess = case.prep
        folder = Path(tempfile.mkdtemp(dir=out))  # a fresh output folder: a finished one would be a no-op
        entries = [(p.name, ["a photo"]) for p in case.paths]
        case.end_to_end = np.minimum(
            case.end_to_end,
            timed(
                lambda: extract_features.extract_split(
                    case.paths[0].parent,
                    entries,
                    "test",
                    folder,
                    backbone,
                    batch_size=batch_size,
                    workers=workers,
                    progress=False,
                )
            ),
        )
    batch = torch.stack([cases[0].prep.photo(p) for p in cases[0].paths])
    return timed(lambda: [backbone.regions(batch[i : i + batch_size]) for i in range(0, len(batch), batch_size)])


def pooled_features(backbone: backbones.Backbone, case: Case) -> torch.Tensor:
    """(N, D) features of a case's photos, averaged over the regions."""
    return torch.cat([backbone.regions(case.prep.photo(p)[None]).mean(1) for p in case.paths])


def report(cases: list[Case], network: np.ndarray, cosine: torch.Tensor) -> None:
    small, small_full, before, after = cases
    n = len(small.paths)
    print(f"network alone: {n / network[0]:.1f} photos/s, {network[1] / n * 1e3:.0f} CPU ms a photo")
    print(f"{'photos':<24}{'decode photos/s':>16}{'CPU ms':>8}{'decode share':>14}{'end-to-end s':>14}{'CPU s':>8}")
    for case in cases:
        share = case.decode[1] / (case.decode[1] + network[1])
        print(
            f"{case.name:<24}{n / case.decode[0]:>16.1f}{case.decode[1] / n * 1e3:>8.1f}{share:>14.0%}"
            f"{case.end_to_end[0]:>14.2f}{case.end_to_end[1]:>8.2f}"
        )
    for clock, i in (("wall", 0), ("CPU", 1)):
        print(
            f"{clock}: decoding speed-up on camera-sized photos (reduced / full) "
            f"{before.decode[i] / after.decode[i]:.2f}x (goal >= 3x), on 224-px photos "
            f"{small_full.decode[i] / small.decode[i]:.2f}x; end-to-end camera / 224 px: before "
            f"{before.end_to_end[i] / small.end_to_end[i]:.2f}x, "
            f"after {after.end_to_end[i] / small.end_to_end[i]:.2f}x "
            f"(goal <= 1.3x)"
        )
    print(f"pooled-feature cosine, reduced vs full decoding: min {cosine.min():.5f}, mean {cosine.mean():.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=Path, default=ROOT / "data" / "flickr8k" / "images", help="Flickr8k's photos")
    parser.add_argument("--photos", type=int, default=24, help="number of Flickr8k photos to use")
    parser.add_argument("--size", default="4000x3000", help="camera size WIDTHxHEIGHT")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the camera-sized photos")
    parser.add_argument(
        "--grain",
        type=float,
        default=0.0,
        help="Gaussian grain (grey levels) added to the upscaled photos, for camera-like detail",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (the best of each is kept)")
    parser.add_argument("--batch-size", type=int, default=32, help="extraction batch size (the extractor's default)")
    parser.add_argument("--workers", type=int, default=2, help="decoding workers (the extractor's default)")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    sources = sorted(args.images.glob("*.jpg"))[: args.photos]
    if len(sources) < args.photos:
        raise SystemExit(f"{args.images}: needs {args.photos} JPEG photos, found {len(sources)} (--images DIR)")
    backbone = backbones.get_backbone("efficientnet-lite0")
    fields = {k: getattr(backbone.preprocess, k) for k in ("size", "resize", "mean", "std")}
    reduced, full = backbones.CenterCropNormalize(**fields), FullDecode(**fields)
    backbone.regions(torch.zeros(1, 3, 224, 224))  # load the weights before any timing
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        camera = make_photos(sources, tmp / "camera", size, args.quality, args.grain)
        print(
            f"{len(camera)} photos of {size[0]}x{size[1]} (quality {args.quality}, grain {args.grain}) made in "
            f"{time.perf_counter() - start:.1f} s; batch {args.batch_size}, {args.workers} workers, "
            f"torch threads {torch.get_num_threads()}",
            file=sys.stderr,
        )
        cases = [
            Case("224px", sources, reduced),
            Case("224px_full_decode", sources, full),
            Case("camera_full_decode", camera, full),
            Case("camera_reduced_decode", camera, reduced),
        ]
        network = np.min(
            [measure_round(cases, backbone, tmp, args.batch_size, args.workers) for _ in range(args.repeats)], axis=0
        )
        cosine = torch.nn.functional.cosine_similarity(
            pooled_features(backbone, cases[2]), pooled_features(backbone, cases[3]), dim=1
        )
    report(cases, network, cosine)


if __name__ == "__main__":
    main()
