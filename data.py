"""Precomputed region features (SCAN "precomp" layout) as PyTorch datasets.

A dataset folder holds, per split, `{split}_ims.npy` float (N_img, R, D), `{split}_caps.txt`
(k consecutive captions per image) and optionally `{split}_ids.txt`. The feature file is
memory-mapped and items are read with positioned reads, so an epoch over COCO's 33 GB train
file never holds the array in memory (neither as anonymous memory nor as mapped page cache).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from concepts import ConceptGraph
from utils import CoderError, npy_header, path_problem
from vocab import read_captions, tokenize


class TextTokenizer(Protocol):
    """What the datasets need from a tokenizer: `vocab.Vocabulary` or `vocab.BertTokenizer`."""

    pad_id: int

    def encode(self, caption: str) -> list[int]: ...


def _open_features(path: Path) -> np.memmap:
    """Memory-map a 3-D float .npy file, with a one-line error for each way it can be wrong
    (the header is checked against the file's size before anything is mapped)."""
    shape, dtype = npy_header(path, "image feature file")
    if len(shape) != 3 or not np.issubdtype(dtype, np.floating):
        raise CoderError(f"{path}: expected a float array (images, regions, dim), found {dtype} {shape}")
    if 0 in shape:
        raise CoderError(f"{path}: holds no features (shape {shape})")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CoderError(f"{path}: cannot memory-map the features ({err})") from None


@dataclass(eq=False)
class PrecompSplit:
    """One split of a precomp folder: memory-mapped features, captions, optional ids.

    `images` is a read-only np.memmap (never loaded whole); `read_image(i)` copies one image's
    regions with a positioned read. `ids` has one entry per image or per caption, as in the file.
    Pickling (DataLoader workers under spawn) re-opens the memory map instead of copying it.
    """

    images: np.memmap
    captions: list[str]
    ids: list[str] | None
    captions_per_image: int
    path: Path
    split: str
    _fd: int | None = field(default=None, init=False, repr=False, compare=False)
    _fd_pid: int | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def images_path(self) -> Path:
        return self.path / f"{self.split}_ims.npy"

    @property
    def captions_path(self) -> Path:
        return self.path / f"{self.split}_caps.txt"

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    @property
    def region_count(self) -> int:
        return int(self.images.shape[1])

    @property
    def feature_dim(self) -> int:
        return int(self.images.shape[2])

    def read_image(self, index: int, out: np.ndarray | None = None) -> np.ndarray:
        """Regions of image `index` as float32 (R, D), without touching the map: a fresh array,
        or read straight into `out` (a float32 (R, D) array, e.g. a row of a batch)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} out of range for {self.num_images} images")
        images = self.images
        if not hasattr(os, "preadv") or not images.flags.c_contiguous:
            regions, fresh = images[index], False  # a view of the map
        else:
            if self._fd is None or self._fd_pid != os.getpid():  # each DataLoader worker opens its own
                self._fd, self._fd_pid = os.open(self.images_path, os.O_RDONLY), os.getpid()
            fresh = out is None or images.dtype != out.dtype
            regions = np.empty(images.shape[1:], dtype=images.dtype) if fresh else out
            if os.preadv(self._fd, [regions], images.offset + index * regions.nbytes) != regions.nbytes:
                raise CoderError(f"{self.images_path}: file is shorter than its header says (image {index})")
        if out is None:
            out = regions.astype(np.float32, copy=not fresh)
        elif regions is not out:
            out[...] = regions
        # Checked per image as it is read (a whole-file scan of COCO's 33 GB would cost minutes):
        # a NaN is blamed on the file and row that hold it, not on the model.
        if not np.isfinite(out).all():
            raise CoderError(
                f"{self.images_path}: non-finite values (NaN or inf) in the features of image {index}; "
                f"fix or re-extract the features"
            )
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("images", "_fd", "_fd_pid")}
        state["num_images"] = self.num_images
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        num_images = state.pop("num_images")
        self.__dict__.update(state, _fd=None, _fd_pid=None)
        self.images = _open_features(self.images_path)[:num_images]

    def __del__(self) -> None:
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)


def load_split(
    data_path: str | Path,
    split: str,
    max_images: int | None = None,
    captions_per_image: int | None = None,
) -> PrecompSplit:
    """Open `{split}_ims.npy` / `_caps.txt` / `_ids.txt` of a precomp folder and validate them.

    Captions per image are inferred (caption count / image count) and must be a whole number;
    `captions_per_image`, when given, must match. `max_images` keeps the first n images and
    their captions (SCAN-family loaders validate on the first 1,000 dev images).
    """
    root = Path(data_path)
    if problem := path_problem(root, True, "data folder"):
        raise CoderError(f"{root}: {problem}")
    ims_path, caps_path, ids_path = (root / f"{split}_{s}" for s in ("ims.npy", "caps.txt", "ids.txt"))
    images = _open_features(ims_path)
    captions = read_captions(caps_path)
    n_img, n_cap = images.shape[0], len(captions)
    if n_cap % n_img:
        raise CoderError(f"{caps_path} has {n_cap} captions, not a whole multiple of the {n_img} images in {ims_path}")
    k = n_cap // n_img
    half = n_cap // 2
    if k % 2 == 0 and (captions[:half] == captions[half:] or captions[0::2] == captions[1::2]):
        raise CoderError(
            f"{caps_path}: holds its captions twice (the file written twice, or each line twice); the "
            f"images in {ims_path} would be paired with other images' captions"
        )
    if captions_per_image is not None and k != captions_per_image:
        raise CoderError(
            f"{caps_path} has {n_cap} captions for the {n_img} images in {ims_path}: "
            f"{k} per image, expected {captions_per_image}"
        )
    ids = _read_ids(ids_path, n_img, n_cap) if ids_path.exists() else None
    if max_images is not None:
        if max_images < 1:
            raise CoderError(f"max_images must be positive, got {max_images}")
        if max_images < n_img:
            if ids is not None:
                ids = ids[: max_images * (k if len(ids) == n_cap else 1)]
            images, captions = images[:max_images], captions[: max_images * k]
    return PrecompSplit(images, captions, ids, k, root, split)


def _read_ids(path: Path, num_images: int, num_captions: int) -> list[str]:
    """`{split}_ids.txt`: one line per image (each image once) or one per caption."""
    ids = read_captions(path, "id file")
    if len(ids) not in (num_images, num_captions):
        raise CoderError(f"{path} has {len(ids)} lines, expected {num_images} (images) or {num_captions} (captions)")
    if len(ids) == num_images and num_images != num_captions and len(set(ids)) != len(ids):
        first_line: dict[str, int] = {}
        line = next(i for i, name in enumerate(ids) if first_line.setdefault(name, i) != i)
        raise CoderError(f"{path}:{line + 1}: image '{ids[line]}' is listed twice (one line per image expected)")
    return ids


def data_fingerprint(split: PrecompSplit, all_rows: bool = False) -> dict[str, Any]:
    """What identifies a split's content wherever its folder lies: its sizes and a hash of its
    captions, ids and image rows. `all_rows` hashes every row (the dev split, read in full at
    each validation anyway); otherwise only the first, middle and last (the train split: a
    full read of Flickr30K's 8.5 GB at every start would cost minutes)."""
    digest = hashlib.sha256()
    for caption in split.captions:
        digest.update(caption.encode("utf-8") + b"\n")
    for name in split.ids or []:
        digest.update(name.encode("utf-8") + b"\n")
    if all_rows:
        for start in range(0, split.num_images, 256):
            digest.update(np.ascontiguousarray(split.images[start : start + 256]).tobytes())
    else:
        for index in sorted({0, split.num_images // 2, split.num_images - 1}):
            digest.update(np.ascontiguousarray(split.images[index]).tobytes())
    fingerprint = {
        "images": split.num_images,
        "captions": split.num_captions,
        "regions": split.region_count,
        "feature_dim": split.feature_dim,
        "sha256": digest.hexdigest(),
    }
    return {**fingerprint, "rows": "all"} if all_rows else fingerprint


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """A collated batch on the device, but for the caption lengths: sequence packing (the
    Bi-GRU) reads them on the host, where they stay, so that it never reads them back."""
    return {k: v if k == "lengths" else v.to(device, non_blocking=True) for k, v in batch.items()}


# --- Datasets ---------------------------------------------------------------------------------
class _CaptionItems(Dataset):
    """Shared text part of the per-caption datasets: tokens, concept labels and, given
    `text_states`, the caption's precomputed frozen-BERT states (text_cache.py)."""

    def __init__(
        self,
        split: PrecompSplit,
        tokenizer: TextTokenizer,
        concept_graph: ConceptGraph | None = None,
        text_states: Any = None,
    ):
        if text_states is not None and len(text_states) != split.num_captions:
            raise CoderError(
                f"{split.captions_path}: {len(text_states)} cached text states for {split.num_captions} captions"
            )
        self.split = split
        self.tokenizer = tokenizer
        self.concept_graph = concept_graph
        self.text_states = text_states

    def __len__(self) -> int:
        return self.split.num_captions

    def _text_item(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"caption index {index} out of range for {len(self)} captions")
        caption = self.split.captions[index]
        item: dict[str, Any] = {
            "tokens": torch.tensor(self.tokenizer.encode(caption), dtype=torch.long),
            "image_id": index // self.split.captions_per_image,
            "caption_id": index,
        }
        if self.concept_graph is not None:
            # Concept labels come from the word tokens whatever the text encoder is.
            item["concept_labels"] = torch.from_numpy(self.concept_graph.multi_hot(tokenize(caption)))
        if self.text_states is not None:
            states = np.array(self.text_states[index], dtype=np.float32)
            if states.shape[0] != len(item["tokens"]):
                raise CoderError(
                    f"caption {index} of split '{self.split.split}': {len(item['tokens'])} tokens "
                    f"but {states.shape[0]} cached states (a stale text state cache?)"
                )
            item["text_states"] = torch.from_numpy(states)
        return item


class PairDataset(_CaptionItems):
    """Training pairs: one item per caption, with its image's regions."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self._text_item(index)
        item["image"] = torch.from_numpy(self.split.read_image(item["image_id"]))
        return item

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch's items (the DataLoader's batched fetch), the images read straight into the
        rows of one (B, R, D) tensor that `collate` takes as is: no per-item arrays to
        allocate, no copy into the batch, and in a worker none into shared memory."""
        items = [self._text_item(index) for index in indices]
        block = batch_tensor((len(items), self.split.region_count, self.split.feature_dim))
        rows = block.numpy()
        for row, item in enumerate(items):
            self.split.read_image(item["image_id"], out=rows[row])
            item["image"] = block[row]
        return items


class CaptionDataset(_CaptionItems):
    """Evaluation captions: one item per caption, no image."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._text_item(index)


class ImageDataset(Dataset):
    """Evaluation images: one item per image, so each image is encoded once."""

    def __init__(self, split: PrecompSplit):
        self.split = split

    def __len__(self) -> int:
        return self.split.num_images

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": torch.from_numpy(self.split.read_image(index)), "image_id": index}


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor for a batch; in a DataLoader worker, in shared memory, where a
    batch must be to reach the main process (torch would otherwise copy it there)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.stack of same-shaped tensors into a `batch_tensor`; the tensor itself, without a
    copy, when they are its consecutive rows (`PairDataset.__getitems__`)."""
    base = tensors[0]._base
    if (
        base is not None
        and base.dim() == tensors[0].dim() + 1
        and base.shape[0] == len(tensors)
        and all(
            t._base is base and t.storage_offset() == base.storage_offset() + row * base.stride(0)
            for row, t in enumerate(tensors)
        )
    ):
        return base
    return torch.stack(list(tensors), out=batch_tensor((len(tensors), *tensors[0].shape), tensors[0].dtype))


def collate(items: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Batch items: stack images and labels, right-pad tokens with `pad_id`.

    Returns `images` (B,R,D), `tokens` (B,L), `lengths` (B,), `attention_mask` (B,L) (1 = real
    token), `text_states` (B,L,h) (zero-padded), `concept_labels` (B,N_c), `image_ids`,
    `caption_ids` (B,), each only when the items carry it.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    first = items[0]
    batch: dict[str, torch.Tensor] = {}
    if "image" in first:
        batch["images"] = stack([it["image"] for it in items])
    if "tokens" in first:
        lengths = torch.tensor([len(it["tokens"]) for it in items], dtype=torch.long)
        tokens = torch.full((len(items), int(lengths.max())), pad_id, dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for row, (it, n) in enumerate(zip(items, lengths.tolist())):
            tokens[row, :n] = it["tokens"]
            mask[row, :n] = 1
        batch.update(tokens=tokens, lengths=lengths, attention_mask=mask)
        if "text_states" in first:
            states = batch_tensor((len(items), tokens.shape[1], first["text_states"].shape[1])).zero_()
            for row, it in enumerate(items):
                states[row, : len(it["text_states"])] = it["text_states"]
            batch["text_states"] = states
    if "concept_labels" in first:
        batch["concept_labels"] = torch.stack([it["concept_labels"] for it in items])
    for key, out in (("image_id", "image_ids"), ("caption_id", "caption_ids")):
        if key in first:
            batch[out] = torch.tensor([it[key] for it in items], dtype=torch.long)
    return batch
