"""Raw images + captions -> the SCAN "precomp" layout the training scripts read unchanged.

For every split it writes `{split}_ims.npy` (float32, N x R x D region features of a CNN
backbone), `{split}_caps.txt` (exactly k consecutive captions per image) and `{split}_ids.txt`
(the image filenames). Features go through a memory-mapped `.npy` so that even COCO's
train split is never held in RAM. An interrupted run resumes where it stopped: rows are written
into `{split}_ims.npy.partial`, and after every flushed batch `extract_progress.json` records how
many images are done, together with a fingerprint of the inputs and the backbone; the final
names appear only once a split is complete. Re-running a finished extraction is a no-op; a
re-run with different inputs or another backbone is refused (or redone with `--overwrite`),
never mixed into the old rows.

Usage:
    python extract_features.py --images DIR --captions captions.txt \
        --split train=train.txt --split dev=dev.txt --out OUT_DIR
    python extract_features.py --images COCO_ROOT --captions dataset_coco.json --out OUT_DIR
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from backbones import BACKBONES, Backbone, ImageFiles, as_list, get_backbone
from caption_sources import Entry, build_split_entries
from utils import CoderError, atomic_write, cli_entry

PROGRESS_FILE = "extract_progress.json"
PROGRESS_VERSION = 1


# --------------------------------------------------------------------------- extraction


@dataclass
class SplitOutput:
    """Where a split's precomp files are, and what went into them."""

    split: str
    ims: Path
    caps: Path
    ids: Path
    num_images: int
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _fingerprint(entries: Sequence[Entry], backbone: Backbone, captions_per_image: int, images_dir: Path) -> str:
    """What the split's features are made from: the backbone, each photo's name, captions, size
    and modification time (a photo replaced under the same name is new input)."""
    h = hashlib.sha256()
    h.update(json.dumps([backbone.fingerprint(), captions_per_image]).encode())
    for name, caps in entries:
        try:
            stat = os.stat(images_dir / name)
            file = [stat.st_size, stat.st_mtime_ns]
        except OSError:  # missing or unreadable: refused, or skipped, when it is read
            file = None
        h.update(json.dumps([name, caps, file]).encode())
    return h.hexdigest()


def _load_progress(out_dir: Path, overwrite: bool) -> dict:
    path = out_dir / PROGRESS_FILE
    if not path.exists():
        return {"version": PROGRESS_VERSION, "splits": {}}
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
        if progress.get("version") != PROGRESS_VERSION or not isinstance(progress.get("splits"), dict):
            raise ValueError("unknown layout")
        for split, record in progress["splits"].items():
            if not _valid_record(record):
                raise ValueError(f"split '{split}' has a malformed record")
        return progress
    except (OSError, ValueError, AttributeError) as err:
        if overwrite:
            return {"version": PROGRESS_VERSION, "splits": {}}
        raise CoderError(
            f"{path}: unreadable progress file ({err}); pass --overwrite to start the extraction again"
        ) from None


# The fields of a split's record in the progress file, and their types.
_RECORD_TYPES = {"fingerprint": str, "total": int, "next": int, "written": int, "skipped": list, "complete": bool}


def _valid_record(record: Any) -> bool:
    return isinstance(record, dict) and all(
        isinstance(record.get(key), kind) and (kind is not int or not isinstance(record[key], bool))
        for key, kind in _RECORD_TYPES.items()
    )


def _save_progress(out_dir: Path, progress: dict) -> None:
    data = json.dumps(progress, indent=1).encode()
    atomic_write(out_dir / PROGRESS_FILE, lambda f: f.write(data))


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    data = "".join(f"{line}\n" for line in lines).encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def _paths(out_dir: Path, split: str) -> tuple[Path, Path, Path, Path]:
    ims = out_dir / f"{split}_ims.npy"
    return ims, ims.with_name(ims.name + ".partial"), out_dir / f"{split}_caps.txt", out_dir / f"{split}_ids.txt"


def extract_split(
    images_dir: str | os.PathLike,
    entries: Sequence[Entry],
    split: str,
    out_dir: str | os.PathLike,
    backbone: Backbone,
    *,
    batch_size: int = 32,
    workers: int = 2,
    skip_bad_images: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> SplitOutput:
    """Extract one split's region features into `out_dir` in the SCAN precomp layout.

    Resumable: a run stopped at any point continues from its last flushed batch when called
    again with the same entries and backbone; a finished split is returned untouched.
    """
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    if batch_size < 1 or workers < 0:
        raise CoderError(f"batch size must be >= 1 and workers >= 0 (got {batch_size}, {workers})")
    if not entries:
        raise CoderError(f"split '{split}' has no images")
    if not images_dir.is_dir():
        raise CoderError(f"{images_dir}: image folder does not exist")
    k = len(entries[0][1])
    if any(len(caps) != k for _, caps in entries):
        raise ValueError("every entry must carry the same number of captions")
    out_dir.mkdir(parents=True, exist_ok=True)
    ims_path, partial_path, caps_path, ids_path = _paths(out_dir, split)
    state = _load_progress(out_dir, overwrite)
    fingerprint = _fingerprint(entries, backbone, k, images_dir)
    record = _usable_record(state, split, out_dir, fingerprint, backbone, len(entries), overwrite)
    if record is not None and record["complete"]:
        return SplitOutput(split, ims_path, caps_path, ids_path, record["written"], record["skipped"])
    if record is not None and not partial_path.exists() and record["next"] == len(entries) and ims_path.exists():
        return _finish(state, record, entries, split, out_dir, 0.0)  # stopped while renaming

    shape = (len(entries), backbone.region_count, backbone.feature_dim)
    start = 0 if record is None else record["next"]
    image_paths = _image_paths(images_dir, [name for name, _ in entries[start:]], split)
    if record is None:
        for p in (ims_path, caps_path, ids_path, partial_path):
            p.unlink(missing_ok=True)
        features = np.lib.format.open_memmap(partial_path, mode="w+", dtype=np.float32, shape=shape)
        _reserve_space(partial_path, remove_on_failure=True)
        record = state["splits"][split] = {
            "fingerprint": fingerprint,
            "backbone": backbone.name,
            "backbone_fingerprint": backbone.fingerprint(),
            "total": len(entries),
            "next": 0,
            "written": 0,
            "skipped": [],
            "complete": False,
        }
        _save_progress(out_dir, state)
    else:
        features = np.lib.format.open_memmap(partial_path, mode="r+")
        _reserve_space(partial_path)  # a file written before space was reserved
        if features.shape != shape or features.dtype != np.float32:
            raise CoderError(
                f"{partial_path}: holds {features.dtype} {features.shape}, expected float32 {shape}; "
                f"pass --overwrite to start this split again"
            )
        print(f"{split}: resuming at image {start} of {len(entries)}", file=sys.stderr)

    start_time = time.perf_counter()
    loader = DataLoader(
        ImageFiles(image_paths, backbone.preprocess, start),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=as_list,
        pin_memory=torch.cuda.is_available(),
    )
    with tqdm(total=len(entries), initial=start, desc=split, unit="img", disable=not progress) as bar:
        for items in loader:
            good = []
            for index, tensor, error in items:
                if error is None:
                    good.append(tensor)
                elif skip_bad_images:
                    record["skipped"].append(entries[index][0])
                else:
                    raise CoderError(f"{error}; pass --skip-bad-images to leave it out with its captions")
            if good:
                out = backbone.regions(torch.stack(good))
                if tuple(out.shape) != (len(good), *shape[1:]):
                    raise ValueError(
                        f"backbone {backbone.name} gave {tuple(out.shape)}, expected (B, {shape[1]}, {shape[2]})"
                    )
                row = record["written"]
                features[row : row + len(good)] = out.detach().float().cpu().numpy()
                features.flush()
            # The rows are on disk before the progress file says so: a crash loses at most a batch.
            record["written"] += len(good)
            record["next"] += len(items)
            _save_progress(out_dir, state)
            bar.update(len(items))
    del features
    return _finish(state, record, entries, split, out_dir, time.perf_counter() - start_time)


def _image_paths(images_dir: Path, names: Sequence[str], split: str) -> list[Path]:
    """The image files of `names` in `images_dir`; refuses a name that leads outside the
    folder (`../x.jpg`, an absolute path) and a missing file. The check is on the name: a link
    that the user put inside the folder (a dataset assembled from links) is followed."""
    paths = [images_dir / name for name in names]
    for name, path in zip(names, paths):
        normal = os.path.normpath(name)
        if os.path.isabs(normal) or normal == ".." or normal.startswith(".." + os.sep):
            raise CoderError(
                f"{path}: image '{name}' of split '{split}' leads outside the image folder {images_dir} "
                f"(names in a caption file must be paths inside --images)"
            )
    missing = [path for path in paths if not path.is_file()]
    if missing:
        problem = "is a folder, not an image file" if missing[0].is_dir() else "does not exist"
        raise CoderError(
            f"{missing[0]}: image file of split '{split}' {problem}"
            + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "")
        )
    return paths


def _usable_record(
    state: dict, split: str, out_dir: Path, fingerprint: str, backbone: Backbone, total: int, overwrite: bool
) -> dict | None:
    """The split's progress record when its work can be reused, None to start afresh; refuses
    (unless `overwrite`) to replace files made from other inputs or by someone else."""
    ims_path, partial_path, caps_path, ids_path = _paths(out_dir, split)
    record = state["splits"].get(split)
    if record is not None and record.get("fingerprint") != fingerprint:
        if not overwrite:
            then = record.get("backbone_fingerprint")  # (records before it was kept: unknown)
            if then is None:
                what = (
                    f"with other inputs or another backbone ({record.get('backbone')}, {record.get('total')} "
                    f"images; now {backbone.name}, {total} images)"
                )
            elif then != backbone.fingerprint():
                what = (
                    f"by another backbone, preprocessing or photo decoder (then {then}; now {backbone.fingerprint()})"
                )
            else:
                what = f"from other photos, captions or split lists ({record.get('total')} images; now {total})"
            raise CoderError(
                f"{out_dir / PROGRESS_FILE}: split '{split}' was extracted {what}; pass --overwrite "
                f"to redo it, or use another --out"
            )
        return None
    if record is None:
        stray = [p.name for p in (ims_path, caps_path, ids_path, partial_path) if p.exists()]
        if stray and not overwrite:
            raise CoderError(
                f"{out_dir}: {', '.join(stray)} exist(s) but were not written by this extraction "
                f"(no entry in {PROGRESS_FILE}); pass --overwrite to replace them"
            )
        return None
    if record["complete"]:
        if all(p.exists() for p in (ims_path, caps_path, ids_path)):
            return record
        print(f"{split}: output files are missing, extracting again", file=sys.stderr)
        return None
    if not partial_path.exists() and not (record["next"] == total and ims_path.exists()):
        print(f"{split}: {partial_path.name} is missing, extracting again", file=sys.stderr)
        return None
    return record


def _finish(
    state: dict, record: dict, entries: Sequence[Entry], split: str, out_dir: Path, seconds: float
) -> SplitOutput:
    """Write captions and ids of the kept images, give the features their final name, and
    mark the split complete (each step is safe to repeat after a crash)."""
    ims_path, partial_path, caps_path, ids_path = _paths(out_dir, split)
    skipped = set(record["skipped"])
    kept = [entry for entry in entries if entry[0] not in skipped]
    if not kept:
        raise CoderError(f"split '{split}': every image was unreadable")
    _write_lines(caps_path, [c for _, caps in kept for c in caps])
    _write_lines(ids_path, [name for name, _ in kept])
    if partial_path.exists():
        if skipped:
            _copy_rows(partial_path, ims_path, len(kept))
            partial_path.unlink()
        else:
            os.replace(partial_path, ims_path)
    record["complete"] = True
    _save_progress(out_dir, state)
    return SplitOutput(split, ims_path, caps_path, ids_path, len(kept), list(record["skipped"]), seconds)


def _reserve_space(path: Path, remove_on_failure: bool = False) -> None:
    """Allocate the disk blocks of a memory-mapped output before any row is written into it.
    A write into a mapped page that finds the disk full kills the process with SIGBUS, without
    a word; a full disk is then one line here instead."""
    size = path.stat().st_size
    if not hasattr(os, "posix_fallocate"):  # macOS: rows are written as they come
        return
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: written as it goes
            return
        if remove_on_failure:
            path.unlink(missing_ok=True)
        raise CoderError(
            f"{path}: cannot write ({err.strerror or err}); the features need {size:,} bytes there; "
            f"free space or use another --out"
        ) from None


def _copy_rows(src: Path, dst: Path, rows: int, chunk: int = 1024) -> None:
    """Copy the first `rows` rows of a .npy into a new .npy chunk by chunk (after skipped
    images the partial array has unused rows at its end), renaming it in place when done."""
    source = np.lib.format.open_memmap(src, mode="r")
    tmp = dst.with_name(dst.name + ".tmp")
    target = np.lib.format.open_memmap(tmp, mode="w+", dtype=source.dtype, shape=(rows, *source.shape[1:]))
    _reserve_space(tmp, remove_on_failure=True)
    for i in range(0, rows, chunk):
        target[i : i + chunk] = source[i : min(i + chunk, rows)]
    target.flush()
    del source, target
    os.replace(tmp, dst)


def extract_dataset(
    images_dir: str | os.PathLike,
    captions: str | os.PathLike,
    out_dir: str | os.PathLike,
    splits: Mapping[str, Any] | None = None,
    backbone: str | Backbone = "efficientnet-lite0",
    *,
    captions_per_image: int = 5,
    batch_size: int = 32,
    workers: int = 2,
    skip_bad_images: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, SplitOutput]:
    """Extract every split of a dataset (see `build_split_entries` for `splits`) into
    `out_dir`; returns each split's output paths. Safe to call again after an interruption."""
    entries = build_split_entries(captions, splits, captions_per_image)
    if isinstance(backbone, str):
        backbone = get_backbone(backbone, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return {
        split: extract_split(
            images_dir,
            split_entries,
            split,
            out_dir,
            backbone,
            batch_size=batch_size,
            workers=workers,
            skip_bad_images=skip_bad_images,
            overwrite=overwrite,
            progress=progress,
        )
        for split, split_entries in entries.items()
    }


def build_text_resources(out_dir: str | os.PathLike, train_caps: str | os.PathLike) -> tuple[Path, Path]:
    """Write `out_dir/vocab.json` and the concept folder `out_dir/concepts` from the training
    captions, with the data layer's builders and the GloVe package's word vectors."""
    out_dir = Path(out_dir)
    try:
        import concepts
        import vocab
    except ImportError as err:
        raise CoderError(f"--concepts needs the project's vocab.py and concepts.py ({err})") from None
    vocab.build_vocab([train_caps]).save(out_dir / "vocab.json")
    concepts.build_concepts([train_caps], out_dir / "concepts", word_vectors=concepts.GLOVE_PACKAGE)
    return out_dir / "vocab.json", out_dir / "concepts"


def _parse_split(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise CoderError(f"--split '{text}': expected NAME=FILE (CSV captions) or NAME=KARPATHY_SPLITS (JSON)")
    return name.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    from options import ArgumentParser, non_negative_int, positive_int, torch_device

    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder holding the image files")
    parser.add_argument("--captions", required=True, help="CSV with header image,caption, or Karpathy's dataset_*.json")
    parser.add_argument(
        "--split",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="output split NAME from a split file (CSV captions) or from Karpathy split "
        "names such as train,restval (JSON; default train=train,restval dev=val test=test)",
    )
    parser.add_argument("--out", required=True, help="output folder (SCAN precomp layout)")
    parser.add_argument("--backbone", default="efficientnet-lite0", choices=sorted(BACKBONES))
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument(
        "--captions-per-image",
        type=positive_int,
        default=5,
        help="k captions kept per image (the first k distinct ones); fewer is an error",
    )
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave unreadable images (and their captions) out instead of stopping",
    )
    parser.add_argument("--workers", type=non_negative_int, default=2, help="image-decoding worker processes")
    parser.add_argument(
        "--device", type=torch_device, default=None, help="cpu, cuda or cuda:N (default: cuda if available)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="redo splits whose earlier extraction used other inputs or another backbone",
    )
    parser.add_argument(
        "--concepts", action="store_true", help="then build OUT/vocab.json and OUT/concepts from the train captions"
    )
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, SplitOutput]:
    from options import check_writable_dir

    args = build_parser().parse_args(argv)
    check_writable_dir(args.out, "--out")
    splits: dict[str, str] = {}
    for text in args.split:
        name, value = _parse_split(text)
        if name in splits:
            raise CoderError(f"--split '{name}' is given twice")
        splits[name] = value
    if args.concepts and splits and "train" not in splits:
        raise CoderError("--concepts builds from the training captions: give a split named 'train'")
    try:
        outputs = extract_dataset(
            args.images,
            args.captions,
            args.out,
            splits or None,
            args.backbone,
            captions_per_image=args.captions_per_image,
            batch_size=args.batch_size,
            workers=args.workers,
            skip_bad_images=args.skip_bad_images,
            overwrite=args.overwrite,
            device=args.device,
        )
    except KeyboardInterrupt:
        print(f"interrupted: run the same command again to resume ({Path(args.out) / PROGRESS_FILE})", file=sys.stderr)
        raise SystemExit(130) from None
    for out in outputs.values():
        timing = f" in {out.seconds:.1f} s" if out.seconds else " (already complete)"
        print(f"{out.split}: {out.num_images} images -> {out.ims}{timing}")
        if out.skipped:
            print(f"{out.split}: skipped {len(out.skipped)} unreadable image(s): {', '.join(out.skipped)}")
    if args.concepts:
        if "train" not in outputs:
            raise CoderError("--concepts builds from the training captions: there is no split named 'train'")
        vocab_path, concept_dir = build_text_resources(args.out, outputs["train"].caps)
        print(f"vocabulary -> {vocab_path}; concepts -> {concept_dir}")
    return outputs


if __name__ == "__main__":
    main()
