"""Train a photo-search model on a folder of photos and their captions (the Flickr8k download
layout), then print the serve.py command that searches the photos with it.

    python train_photos.py --data ~/Downloads/flickr8k          # Images/ (or images/) + captions.txt
    python train_photos.py --data DIR --epochs 1 --out runs/try # a quick, weaker model

The recipe is the Flickr8k benchmark's full-model row (`coder` in bench/bench_flickr8k.py:
EfficientNet-Lite0 region features, MiniLM with its bottom 5 layers frozen and cached, the
concept branch and pseudo labels, 6 epochs), trained with train_f30k.py and validated on dev
after every epoch (best.pt is the best dev epoch). `train.txt` and `dev.txt` in --data are used
when both are there; otherwise a fixed split is made (see `default_split`) and written to
--out/splits. Everything is cached under --out: a second call reuses the features and the
finished run and only prints the command again.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_flickr8k  # noqa: E402
from caption_sources import read_captions_csv  # noqa: E402
from concepts import load_concepts  # noqa: E402
from options import ArgumentParser, check_writable_dir, positive_int, script_default  # noqa: E402
from utils import CoderError, cli_entry  # noqa: E402

RECIPE = "coder"  # the benchmark row trained here
RECIPE_SCALE = "full"  # the benchmark's settings for full Flickr8k (FULL_COMMON, FULL_BERT)
CAPTIONS_PER_PHOTO = 5
DEV_PHOTOS = 1000  # Flickr8k's dev size; an eighth of the photos in smaller folders


def find_layout(data: Path) -> tuple[Path, Path]:
    """(photo folder, captions file) of a Flickr8k-layout folder: Images/ or images/, captions.txt."""
    if not data.is_dir():
        raise CoderError(f"--data {data}: folder not found")
    images = next((data / name for name in ("Images", "images") if (data / name).is_dir()), None)
    if images is None:
        raise CoderError(f"--data {data}: has no Images/ or images/ folder of photos")
    captions = data / "captions.txt"
    if not captions.is_file():
        raise CoderError(f"--data {data}: has no captions.txt (CSV with an 'image,caption' header)")
    return images, captions


def default_split(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train, dev): dev is the DEV_PHOTOS photos (an eighth of them when there are fewer than
    8 x DEV_PHOTOS) whose names have the smallest SHA-256, train the rest; both sorted. Depends
    on the names only, so the same folder always gets the same split."""
    ranked = sorted(names, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    dev_count = min(DEV_PHOTOS, max(1, len(ranked) // 8))
    return sorted(ranked[dev_count:]), sorted(ranked[:dev_count])


def split_files(data: Path, images: Path, captions: Path, out: Path) -> dict[str, str]:
    """The train and dev split files: the folder's own, or a `default_split` of the photos that
    are in the photo folder and have at least CAPTIONS_PER_PHOTO captions, written to out/splits."""
    own = {split: data / f"{split}.txt" for split in ("train", "dev")}
    if all(path.is_file() for path in own.values()):
        print(f"using the split files {own['train']} and {own['dev']}", flush=True)
        return {split: str(path) for split, path in own.items()}
    by_photo = read_captions_csv(captions)
    usable = [
        name for name, texts in by_photo.items() if len(texts) >= CAPTIONS_PER_PHOTO and (images / name).is_file()
    ]
    if len(usable) < 2:
        raise CoderError(
            f"--data {data}: fewer than 2 photos of {images} have {CAPTIONS_PER_PHOTO} captions in "
            f"{captions}; a model needs photos to train and to validate on"
        )
    train, dev = default_split(usable)
    folder = out / "splits"
    folder.mkdir(parents=True, exist_ok=True)
    for split, names in (("train", train), ("dev", dev)):
        (folder / f"{split}.txt").write_text("\n".join(names) + "\n")
    left_out = len(by_photo) - len(usable)
    print(
        f"no train.txt/dev.txt in {data}: split {len(usable)} photos into {len(train)} train and {len(dev)} dev "
        f"({folder})"
        + (
            f"; {left_out} captioned photos left out (missing, or under {CAPTIONS_PER_PHOTO} captions)"
            if left_out
            else ""
        ),
        flush=True,
    )
    return {split: str(folder / f"{split}.txt") for split in ("train", "dev")}


def serve_command(checkpoint: Path, images: Path, captions: Path) -> str:
    return " ".join(
        [
            "python",
            "serve.py",
            "--checkpoint",
            shlex.quote(str(checkpoint)),
            "--images",
            shlex.quote(str(images)),
            "--captions",
            shlex.quote(str(captions)),
        ]
    )


@cli_entry
def main(argv: Sequence[str] | None = None) -> Path:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--data", required=True, help="folder with Images/ (or images/) and captions.txt")
    parser.add_argument("--out", default="", help="features, split files and the run (default runs/photos_<folder>)")
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help=f"epochs to train (default the recipe's {bench_flickr8k.FULL_COMMON['epochs']})",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: delete --out's features, split files and run first (after the photos or captions changed)",
    )
    args = parser.parse_args(argv)
    data = Path(args.data).expanduser()
    images, captions = find_layout(data)
    out = Path(args.out) if args.out else ROOT / "runs" / f"photos_{data.resolve().name}"
    check_writable_dir(out, "--out")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CoderError("--device cuda: CUDA is not available on this machine (use cpu)")
    if args.overwrite:
        for made in ("precomp", "splits", "runs"):
            shutil.rmtree(out / made, ignore_errors=True)
    start = time.perf_counter()
    splits = split_files(data, images, captions, out)
    bert_path = bench_flickr8k.minilm_path()
    print("step 1 of 2: region features of the photos (cached: a second call skips this)", flush=True)
    prepared = bench_flickr8k.prepare(data, out / "precomp", images=images, splits=splits)
    graph = load_concepts(prepared["paths"]["concept_path"])
    if graph.stats(script_default("concept_threshold"))["edges"] == 0:
        raise CoderError(
            f"--data {data}: the training captions give the concept graph no edge (no two concepts occur "
            f"together often enough); the recipe's concept branch needs one: add photos with captions"
        )
    settings = bench_flickr8k.run_settings(RECIPE, RECIPE_SCALE, args.device, args.epochs)
    run_dir = out / "runs" / f"{RECIPE}_s{args.seed}"
    print(
        f"step 2 of 2: training {settings['epochs']} epoch{'' if settings['epochs'] == 1 else 's'} of '{bench_flickr8k.CONFIGS[RECIPE][0]}', "
        f"validated on dev after each (steps in {run_dir / 'train.log'})",
        flush=True,
    )
    progress = bench_flickr8k.Progress([(RECIPE, args.seed)], {RECIPE: settings["epochs"]})
    result = bench_flickr8k.run_one(RECIPE, args.seed, settings, prepared["paths"], out, bert_path, True, progress, 0)
    checkpoint = run_dir / "best.pt"
    best = result["best"]
    print(
        f"best dev rsum {best['rsum']:.1f} (image->text R@1 {best['i2t_r1']:.1f}, text->image R@1 "
        f"{best['t2i_r1']:.1f}) at epoch {result['best_epoch']}"
        + (" (cached run)" if result.get("cached") else "")
        + f"; {time.perf_counter() - start:.0f} s in all. Search the photos with:\n\n"
        f"    {serve_command(checkpoint, images, captions)}\n",
        flush=True,
    )
    return checkpoint


if __name__ == "__main__":
    main()
