"""Captions and split lists of a raw image dataset, in the formats extract_features.py reads:
a CSV `image,caption` (Flickr8k-style), Karpathy's dataset_*.json (Flickr30K, COCO), and one
image name per line for a split; `build_split_entries` turns them into (image, k captions)."""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from utils import CoderError, open_input, read_json, read_text, read_text_lines, text_encoding

# SCAN's split names for Karpathy's JSON: COCO's "restval" images join the training set.
KARPATHY_DEFAULT_SPLITS = {"train": ("train", "restval"), "dev": ("val",), "test": ("test",)}
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

Entry = tuple[str, list[str]]  # (image filename relative to the image folder, its k captions)


def read_captions_csv(path: str | os.PathLike) -> dict[str, list[str]]:
    """CSV with an `image,caption` header, one row per caption -> {image: [captions]}.

    Captions keep their file order; quoted fields may contain commas.
    """
    path = Path(path)
    captions: dict[str, list[str]] = {}
    text = read_text(path, "captions file")
    try:
        with io.StringIO(text, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise CoderError(f"{path}: captions file is empty")
            names = [h.strip().lower() for h in header]
            if "image" not in names or "caption" not in names:
                raise CoderError(f"{path}: first line must be the header 'image,caption' (found {','.join(header)!r})")
            i_img, i_cap = names.index("image"), names.index("caption")
            for row in reader:
                if not row or all(not x.strip() for x in row):
                    continue
                if len(row) != len(header):
                    raise CoderError(
                        f"{path}, line {reader.line_num}: {len(row)} fields where the header has "
                        f"{len(header)} (quote captions that contain commas)"
                    )
                image, caption = row[i_img].strip(), _clean_caption(row[i_cap])
                if not image or not caption:
                    raise CoderError(f"{path}, line {reader.line_num}: empty image name or caption")
                captions.setdefault(image, []).append(caption)
    except csv.Error as err:
        raise CoderError(f"{path}, line {reader.line_num}: not a CSV captions file ({err})") from None
    if not captions:
        raise CoderError(f"{path}: captions file has a header but no captions")
    return captions


def read_karpathy_json(path: str | os.PathLike) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Karpathy's `dataset_*.json` -> ({image: [captions]}, {image: split}).

    An image is named `filepath/filename` where the entry has a `filepath` (COCO), else
    `filename` (Flickr30K), relative to the image folder.
    """
    path = Path(path)
    doc = read_json(path, "captions file")
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise CoderError(f"{path}: expected Karpathy's format, an object with an 'images' list")
    captions: dict[str, list[str]] = {}
    splits: dict[str, str] = {}
    for i, item in enumerate(images):
        try:
            name = item["filename"]
            if item.get("filepath"):
                name = f"{item['filepath']}/{name}"
            split = item["split"]
            sentences = [_clean_caption(_string(s["raw"])) for s in item["sentences"]]
        except (KeyError, TypeError, AttributeError) as err:
            raise CoderError(
                f"{path}: images[{i}] lacks filename/split/sentences[].raw ({type(err).__name__}: {err})"
            ) from None
        if not isinstance(name, str) or not isinstance(split, str):
            raise CoderError(f"{path}: images[{i}] has a non-string filename or split")
        if name in captions:
            raise CoderError(f"{path}: image '{name}' is listed twice (images[{i}])")
        if any(not s for s in sentences):
            raise CoderError(f"{path}: image '{name}' has an empty caption")
        captions[name], splits[name] = sentences, split
    if not captions:
        raise CoderError(f"{path}: the 'images' list is empty")
    return captions, splits


def read_split_list(path: str | os.PathLike) -> list[str]:
    """A split file: one image filename per line (blank lines ignored, no duplicates)."""
    names = [line.strip() for line in read_text_lines(path, "split file") if line.strip()]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise CoderError(f"{path}: image '{name}' is listed twice")
        seen.add(name)
    if not names:
        raise CoderError(f"{path}: split file lists no images")
    return names


def kept_captions(captions: Sequence[str], k: int) -> list[str]:
    """The k captions kept of an image's list: the first k, except that a caption repeated
    among them gives way to a distinct one listed later (a list with a row pasted twice keeps
    the image's k distinct captions), in file order. Without k distinct captions the repeats
    stay: Flickr8k's own captions.txt gives 9 images the same caption twice among their 5."""
    seen: set[str] = set()
    firsts, repeats = [], []
    for i, caption in enumerate(captions):
        (repeats if caption in seen else firsts).append(i)
        seen.add(caption)
    return [captions[i] for i in sorted((firsts + repeats)[:k])]


def _clean_caption(text: str) -> str:
    # One caption per line in {split}_caps.txt: embedded newlines, U+2028 and other line-break
    # characters and runs of whitespace become single spaces.
    return " ".join(text.split())


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a caption is {type(value).__name__}, not a string")
    return value


def _is_json(path: Path) -> bool:
    if path.suffix.lower() == ".json":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return head.decode(text_encoding(head), "ignore").lstrip().startswith("{")


def build_split_entries(
    captions: str | os.PathLike,
    splits: Mapping[str, Any] | None,
    captions_per_image: int = 5,
) -> dict[str, list[Entry]]:
    """Resolve the captions file and split definitions into {split: [(image, k captions)]}.

    CSV captions: each split value is a split file path (one image filename per line).
    Karpathy JSON: each value is a Karpathy split name, a list of them or a comma-separated
    string ("train,restval"); without `splits` the SCAN names train/dev/test are used.
    Images with more than k captions keep k of them (`kept_captions`); fewer than k is an error.
    """
    captions = Path(captions)
    open_input(captions, "captions file").close()  # not found, a folder, under a file, empty
    if captions_per_image < 1:
        raise CoderError(f"captions per image must be at least 1 (got {captions_per_image})")
    names: dict[str, list[str]] = {}
    if _is_json(captions):
        caps, image_split = read_karpathy_json(captions)
        present = set(image_split.values())
        if not splits:
            splits = {  # Flickr30K's file has no "restval": train is then its "train" alone
                out: [v for v in values if v in present]
                for out, values in KARPATHY_DEFAULT_SPLITS.items()
                if present.intersection(values)
            }
        for out, value in splits.items():
            wanted = value.split(",") if isinstance(value, str) else [str(v) for v in value]
            wanted = [w.strip() for w in wanted if w.strip()]
            unknown = [w for w in wanted if w not in present]
            if unknown or not wanted:
                raise CoderError(
                    f"{captions}: split '{out}' asks for Karpathy split(s) {unknown or wanted} that no "
                    f"image has (present: {', '.join(sorted(present))})"
                )
            names[out] = [name for name, s in image_split.items() if s in wanted]
    else:
        if not splits:
            raise CoderError(f"{captions}: a CSV captions file needs split lists, e.g. --split train=train.txt")
        caps = read_captions_csv(captions)
        for out, value in splits.items():
            names[out] = read_split_list(value)
            for name in names[out]:
                if name not in caps:
                    raise CoderError(f"{value}: image '{name}' has no captions in {captions}")
    result: dict[str, list[Entry]] = {}
    for out, images in names.items():
        if not _SPLIT_NAME.match(out):
            raise CoderError(f"split name '{out}' may only contain letters, digits, '_', '-', '.'")
        entries = []
        for name in images:
            if len(caps[name]) < captions_per_image:
                raise CoderError(
                    f"{captions}: image '{name}' has {len(caps[name])} captions, fewer than the "
                    f"{captions_per_image} per image required (set --captions-per-image)"
                )
            entries.append((name, kept_captions(caps[name], captions_per_image)))
        result[out] = entries
    return result
