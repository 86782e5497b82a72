"""A searchable index of a folder of photos (and optionally a caption file) under one trained
checkpoint: the engine behind serve.py.

Photos become region features with the backbone of extract_features.py (backbones.py), then
embeddings with the checkpoint's image encoder; texts go through its text encoder the way
retrieve.py encodes queries. Each item is stored as one "fused" vector (`model.fuse`:
[√(1−μ)·x, √μ·x_c], x the instance embedding and x_c the concept descriptor, or CVSE's
l2norm((1−μ)·x + μ·x_c) for a run with fusion "weighted_sum"), so that the dot product of a
photo's and a text's fused vectors is exactly the similarity S of `CODER.similarity` that
evaluation ranks by. Exact search is a chunked matrix product; for very
large galleries an approximate faiss index can replace it.

Embeddings are cached on disk (never in the photo folder), in one file per checkpoint, backbone
and folder that holds each vector with the name, size, modification and change times of its
photo, replaced whole (atomically) on every save; a restart loads it and embeds only new or
changed photos. A photo's id is a hash of its name, so it stays with the photo across rescans.

The app searches from many threads at once: a rescan builds a new `Gallery` (photos, vectors,
search) aside and swaps it in with one assignment; the image encoder runs one batch at a time
(a rescan's batch or an upload) and the text encoder one batch of texts at a time.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import math
import os
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any, BinaryIO, Sequence

import numpy as np
import torch

from backbones import ImageFiles, PhotoTooLarge, UnreadablePhoto, as_list, get_backbone
from options import check_writable_dir
from utils import CoderError, atomic_write, read_text

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
DEFAULT_CACHE = Path(__file__).resolve().parent / "data_cache" / "photo_index"
CACHE_FILE = "index.npz"  # the vectors and, as JSON, the photo of each row
CACHE_VERSION = 2


def _sha256(text: str) -> str:
    """SHA-256 of a text that may hold a file name's undecodable bytes (kept as surrogates)."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _file_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def photo_id(name: str) -> str:
    """A photo's id: 128 bits of the SHA-256 of its name (as bytes on disk), the same whatever
    else the folder holds, so an id never moves to another photo when the folder changes."""
    return hashlib.sha256(os.fsencode(name)).hexdigest()[:32]


def shown_name(name: str) -> str:
    """A file name as text for the page: bytes that are not UTF-8 (on Linux a name is any
    bytes) become U+FFFD, which JSON can carry; the file itself is still opened by its bytes."""
    return os.fsencode(name).decode("utf-8", "replace")


def _photo_key(photo: dict[str, Any]) -> tuple[str, int, int, int]:
    """What ties a vector to a photo: its name, size, modification and change times. Any write
    or rename moves the change time, which a program cannot set back (unlike the modification time)."""
    return photo["name"], photo["size"], photo["mtime"], photo["ctime"]


def _hidden(name: str) -> bool:
    return name.startswith(".")  # .thumbnails/, macOS's ._IMG_0001.jpg resource forks


def scan_photos(folder: Path, include_hidden: bool = False) -> list[dict[str, Any]]:
    """Image files under `folder` (recursively, sorted by name), each with its size,
    modification and change times. Links that lead outside the folder are left out (they are never
    served), and so are hidden files and folders unless `include_hidden`."""
    root = folder.resolve()
    found = []
    for top, folders, files in os.walk(folder):
        folders[:] = [f for f in folders if include_hidden or not _hidden(f)]
        for file in files:
            path = Path(top) / file
            if path.suffix.lower() not in IMAGE_SUFFIXES or (_hidden(file) and not include_hidden):
                continue
            try:
                if not path.is_file() or not path.resolve(strict=True).is_relative_to(root):
                    continue
                stat = path.stat()
            except (OSError, RuntimeError):  # vanished while scanning, or a link loop
                continue
            found.append(
                {
                    "name": path.relative_to(folder).as_posix(),
                    "size": stat.st_size,
                    "mtime": stat.st_mtime_ns,
                    "ctime": stat.st_ctime_ns,
                }
            )
    return sorted(found, key=lambda p: p["name"])


class Embedder:
    """Photos, uploaded image bytes and texts -> fused vectors, with a checkpoint's query
    encoders and the region backbone its training features came from."""

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        device: str = "cpu",
        backbone: str = "efficientnet-lite0",
        batch_size: int = 32,
        workers: int = 0,
        bert_path: str | None = None,
    ) -> None:
        from checkpoint import load_for_inference

        self.checkpoint = Path(checkpoint)
        self.device = torch.device(device)
        self.model, self.tokenizer, self.graph, self.config = load_for_inference(checkpoint, self.device, bert_path)
        self.mu = float(self.config["mu"])
        self.backbone = get_backbone(backbone, device)
        if self.backbone.feature_dim != self.model.cfg.image_dim:
            raise CoderError(
                f"{checkpoint}: trained on {self.model.cfg.image_dim}-d region features, but backbone "
                f"{backbone} gives {self.backbone.feature_dim}-d ones; photos can only be searched with "
                f"a checkpoint trained on features of that backbone (extract_features.py)"
            )
        self.batch_size, self.workers = batch_size, workers
        # One text batch at a time: a fast (Rust) tokenizer refuses a second thread ("Already
        # borrowed"). One image batch at a time, a rescan's or an upload's: an upload's decoding
        # and the image encoder's memory are bounded by one batch, whatever runs meanwhile.
        self._text_lock, self._image_lock = threading.Lock(), threading.Lock()
        self.key = _sha256(f"{_file_key(self.checkpoint)}|{self.backbone.fingerprint()}")

    @torch.no_grad()
    def _images(self, pixels: torch.Tensor) -> torch.Tensor:
        regions = self.backbone.regions(pixels.to(self.device))
        return self.model.fuse(*self.model.encode_images(regions.float()), self.mu).float().cpu()

    def photos(self, paths: Sequence[Path], progress: bool = False) -> tuple[torch.Tensor, dict[int, str]]:
        """Fused vectors of image files (rows of unreadable ones stay zero) and the errors by row."""
        from torch.utils.data import DataLoader
        from tqdm import tqdm

        vectors = torch.zeros(len(paths), self.dim)
        errors: dict[int, str] = {}
        loader = DataLoader(
            ImageFiles(list(paths), self.backbone.preprocess, 0),
            batch_size=self.batch_size,
            num_workers=self.workers,
            collate_fn=as_list,
        )
        with tqdm(total=len(paths), desc="indexing photos", unit="img", disable=not progress) as bar:
            for items in loader:
                good = [(i, t) for i, t, err in items if err is None]
                errors.update({i: err for i, _, err in items if err is not None})
                if good:
                    rows = torch.tensor([i for i, _ in good])
                    with self._image_lock:
                        vectors[rows] = self._images(torch.stack([t for _, t in good]))
                bar.update(len(items))
        return vectors, errors

    def image_bytes(self, data: bytes) -> torch.Tensor:
        """The fused vector of one uploaded image (CoderError if the bytes are not a photo of
        backbones.PHOTO_FORMATS, cannot be decoded or claim more pixels than its format's limit)."""
        with self._image_lock:
            try:
                pixels = self.backbone.preprocess.photo(data)
            except PhotoTooLarge as err:
                raise CoderError(f"uploaded image refused: {err}") from None
            except UnreadablePhoto as err:
                raise CoderError(str(err)) from None
            return self._images(pixels.unsqueeze(0))[0]

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Fused vectors of free texts, encoded as retrieve.py encodes queries."""
        from evaluation import BATCH_SIZE as batch_size
        from retrieve import encode_queries

        with self._text_lock:
            parts = [
                self.model.fuse(
                    *encode_queries(
                        self.model, list(texts[i : i + batch_size]), self.tokenizer, self.graph, self.device
                    ),
                    self.mu,
                )
                .float()
                .cpu()
                for i in range(0, len(texts), batch_size)
            ]
        return torch.cat(parts) if parts else torch.zeros(0, self.dim)

    @property
    def dim(self) -> int:
        return self.model.fused_dim


class VectorSearch:
    """Top-k by dot product: exact (chunked matrix product, the scores evaluation ranks by) or,
    with `approximate`, a faiss inverted-file index (`nprobe` lists searched per query)."""

    def __init__(
        self, vectors: torch.Tensor, approximate: bool = False, nprobe: int = 32, chunk_rows: int = 262_144
    ) -> None:
        self.vectors = vectors.float().contiguous()
        self.chunk_rows = chunk_rows
        self.faiss_index = build_faiss(self.vectors.numpy(), nprobe) if approximate and len(vectors) else None

    def __len__(self) -> int:
        return len(self.vectors)

    def ranked(self, queries: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
        """For each query, its top k as (index, score), best first; fewer than k where faiss's
        probed lists hold fewer vectors."""
        scores, indices = self.search(queries, k)
        return [
            [(i, s) for i, s in zip(row_i.tolist(), row_s.tolist()) if i >= 0] for row_s, row_i in zip(scores, indices)
        ]

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, indices), each (Q, min(k, N)), best first; with faiss, index -1 (score
        -inf or junk) fills the places its probed lists could not."""
        k = min(k, len(self.vectors))
        queries = queries.float().reshape(-1, self.vectors.shape[1])
        if k == 0:
            return torch.zeros(len(queries), 0), torch.zeros(len(queries), 0, dtype=torch.long)
        if self.faiss_index is not None:
            scores, indices = self.faiss_index.search(np.ascontiguousarray(queries.numpy()), k)
            return torch.from_numpy(scores), torch.from_numpy(indices).long()
        best_scores, best_indices = None, None
        for start in range(0, len(self.vectors), self.chunk_rows):
            scores = queries @ self.vectors[start : start + self.chunk_rows].t()
            top = scores.topk(min(k, scores.shape[1]), dim=1)
            indices = top.indices + start
            if best_scores is not None:
                merged = torch.cat([best_scores, top.values], 1).topk(k, dim=1)
                indices = torch.cat([best_indices, indices], 1).gather(1, merged.indices)
                top = merged
            best_scores, best_indices = top.values, indices
        return best_scores, best_indices


def build_faiss(vectors: np.ndarray, nprobe: int = 32) -> Any:
    """An inner-product IVF-Flat faiss index over `vectors` (about 4·√N lists, trained on at
    most 100,000 of them); `pip install faiss-cpu`."""
    try:
        import faiss
    except ImportError:
        raise CoderError("--index faiss needs faiss: pip install faiss-cpu") from None
    n, dim = vectors.shape
    lists = max(1, min(int(4 * math.sqrt(n)), n // 39))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
    sample = vectors[np.random.default_rng(0).permutation(n)[:100_000]]
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    index.nprobe = min(nprobe, lists)
    return index  # (faiss's wrapper keeps the quantizer alive with the index)


class PhotoNotServed(LookupError):
    """An id the index does not have, or an indexed photo that is no longer a regular file
    inside the folder (deleted, or replaced by a link, or a folder on its path by a link)."""


@dataclass(frozen=True)
class Gallery:
    """One consistent state of the index: the photos, their ids (`photo_id` of each name) and
    the search over their vectors (which ranks positions in `photos`). Never changed in place;
    a rescan makes a new one."""

    photos: tuple[dict[str, Any], ...]
    index: VectorSearch
    ids: tuple[str, ...] = field(init=False, repr=False, compare=False)
    positions: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = tuple(photo_id(p["name"]) for p in self.photos)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "positions", {i: position for position, i in enumerate(ids)})

    @property
    def vectors(self) -> torch.Tensor:
        return self.index.vectors

    def search(self, queries: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
        """For each query vector, the top k photos as (position in `photos`, score), best first."""
        return self.index.ranked(queries, k)


def open_beneath(root: Path, parts: Sequence[str]) -> int:
    """A read-only descriptor of the regular file root/parts[0]/.../parts[-1], each component
    opened from the descriptor of the one before without following a link (O_NOFOLLOW): a link
    anywhere on the way, even one swapped in a moment ago, is an OSError (ELOOP or ENOTDIR),
    never followed; so is anything but a regular file (a FIFO does not block the opening)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    folder = os.open(root, flags | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            inner = os.open(part, flags | os.O_DIRECTORY, dir_fd=folder)
            os.close(folder)
            folder = inner
        fd = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=folder)
    finally:
        os.close(folder)
    if not S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


class PhotoIndex:
    """The photos of a folder as fused vectors, cached on disk and refreshed incrementally.

    `gallery` is the current Gallery; a reader takes it once per request, so that a rescan
    running meanwhile (which swaps in its new Gallery with one assignment) never mixes the
    names of one state with the positions of another."""

    def __init__(
        self,
        embedder: Embedder,
        folder: str | os.PathLike,
        cache_root: str | os.PathLike | None = None,
        approximate: bool = False,
        include_hidden: bool = False,
    ) -> None:
        self.embedder, self.approximate, self.include_hidden = embedder, approximate, include_hidden
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CoderError(f"--images {folder}: photo folder not found")
        self.root = self.folder.resolve()
        check_writable_dir(cache_root or DEFAULT_CACHE, "--cache_dir")
        key = _sha256(f"{embedder.key}|{self.root}")[:24]
        self.cache = Path(cache_root or DEFAULT_CACHE) / key
        if self.cache.resolve().is_relative_to(self.root):
            raise CoderError(f"--cache_dir {cache_root}: lies inside the photo folder, which is never written to")
        self._refresh_lock = threading.Lock()
        photos, vectors = self._load_cache()
        self.gallery = Gallery(tuple(photos), VectorSearch(vectors, approximate))

    def _load_cache(self) -> tuple[list[dict[str, Any]], torch.Tensor]:
        """The cached photos and their vectors, or none when the file is missing, damaged or of
        another layout (it is then rebuilt, never trusted). Each row's photo is read from the
        same file as its vector, so no write, crash or second server can pair them wrongly."""
        empty = ([], torch.zeros(0, self.embedder.dim))
        try:
            with np.load(self.cache / CACHE_FILE, allow_pickle=False) as stored:
                meta = json.loads(stored["photos"].tobytes().decode("ascii"))
                vectors = stored["vectors"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing or damaged
            return empty
        photos = meta.get("photos") if isinstance(meta, dict) and meta.get("version") == CACHE_VERSION else None
        fields = {"name": str, "size": int, "mtime": int, "ctime": int}
        if (
            not isinstance(photos, list)
            or vectors.dtype != np.float32
            or vectors.shape != (len(photos), self.embedder.dim)
            or not np.isfinite(vectors).all()
            or not all(
                isinstance(p, dict)
                and p.keys() == fields.keys()
                and all(type(p[k]) is kind for k, kind in fields.items())
                for p in photos
            )
        ):
            return empty
        return photos, torch.from_numpy(vectors)

    def _save_cache(self, gallery: Gallery) -> None:
        """The photos and their vectors as one file, replaced atomically (a temporary file of its
        own, then a rename): a reader, or another server on the same folder, sees a whole old
        or a whole new file; two servers saving at once leave the one saved last."""
        meta = json.dumps({"version": CACHE_VERSION, "photos": list(gallery.photos)})  # ASCII: JSON escapes the rest
        self.cache.mkdir(mode=0o700, parents=True, exist_ok=True)  # names and vectors of private photos
        atomic_write(
            self.cache / CACHE_FILE,
            lambda f: np.savez(
                f, vectors=gallery.vectors.numpy(), photos=np.frombuffer(meta.encode("ascii"), np.uint8)
            ),
            private=True,
        )

    def refresh(self, progress: bool = False) -> dict[str, Any]:
        """Embed new or changed photos, drop removed ones, save the cache, then swap the new
        Gallery in; returns the counts and the photos that could not be read (left out).
        One rescan at a time; searches go on meanwhile on the previous Gallery."""
        with self._refresh_lock:
            old = self.gallery
            on_disk = scan_photos(self.folder, self.include_hidden)
            known = {_photo_key(p): i for i, p in enumerate(old.photos)}
            kept = [(p, known[_photo_key(p)]) for p in on_disk if _photo_key(p) in known]
            new = [p for p in on_disk if _photo_key(p) not in known]
            vectors, errors = self.embedder.photos([self.folder / p["name"] for p in new], progress)
            readable = [i for i in range(len(new)) if i not in errors]
            removed = len(old.photos) - len(kept)
            photos = tuple([p for p, _ in kept] + [new[i] for i in readable])
            all_vectors = torch.cat([old.vectors[[i for _, i in kept]], vectors[readable]])
            gallery = Gallery(photos, VectorSearch(all_vectors, self.approximate))
            if readable or removed or errors:
                self._save_cache(gallery)
            self.gallery = gallery
        return {
            "added": len(readable),
            "removed": removed,
            "kept": len(kept),
            "unreadable": {new[i]["name"]: err for i, err in errors.items()},
        }

    def open(self, gallery: Gallery, photo: str) -> BinaryIO:
        """The file of the photo with id `photo` in `gallery`, opened for reading. Its name is
        resolved now (links followed) and must lead inside the folder; that path is then opened
        with `open_beneath`, so a folder on it swapped for a link after the check is refused,
        not followed. A photo gone, leading out of the folder or not a regular file is
        PhotoNotServed."""
        position = gallery.positions.get(photo)
        if position is None:
            raise PhotoNotServed("no photo with this id (the folder may have been rescanned; search again)")
        name = gallery.photos[position]["name"]
        shown = shown_name(name)
        try:
            real = (self.folder / name).resolve(strict=True)
        except (OSError, RuntimeError):  # deleted, or a link loop
            raise PhotoNotServed(f"photo {shown} is no longer in the folder; rescan") from None
        if not real.is_relative_to(self.root):
            raise PhotoNotServed(f"photo {shown} now leads out of the photo folder; it is not served")
        try:
            return os.fdopen(open_beneath(self.root, real.relative_to(self.root).parts), "rb")
        except FileNotFoundError:
            raise PhotoNotServed(f"photo {shown} is no longer in the folder; rescan") from None
        except OSError as err:  # ELOOP, ENOTDIR: a link swapped in; EINVAL: not a regular file
            raise PhotoNotServed(
                f"photo {shown} changed while it was opened ({err.strerror}); it is not served"
            ) from None


class CaptionSet:
    """The captions of a file, as fused vectors (cached like the photos): a CSV `image,caption`
    (then each caption knows its photo) or a plain file with one caption per line."""

    def __init__(
        self,
        embedder: Embedder,
        path: str | os.PathLike,
        cache_root: str | os.PathLike | None = None,
        progress: bool = False,
    ) -> None:
        self.path = Path(path)
        self.texts, self.images = read_caption_file(self.path)
        key = _sha256(f"{embedder.key}|{_file_key(self.path)}")[:24]
        cache = Path(cache_root or DEFAULT_CACHE) / f"captions_{key}.npy"
        vectors = None
        if cache.is_file():
            try:
                vectors = np.load(cache, allow_pickle=False)
            except (OSError, ValueError):
                vectors = None
        if vectors is None or vectors.shape != (len(self.texts), embedder.dim):
            if progress:
                print(f"encoding {len(self.texts)} captions of {self.path}", flush=True)
            vectors = embedder.texts(self.texts).numpy()
            cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(cache, lambda f: np.save(f, vectors), private=True)
        self.index = VectorSearch(torch.from_numpy(np.asarray(vectors, dtype=np.float32)))


def read_caption_file(path: Path) -> tuple[list[str], list[str | None]]:
    """(captions, the photo name of each or None): a CSV with an `image,caption` header, or one
    caption per line."""
    from caption_sources import read_captions_csv
    from vocab import read_captions

    if not path.is_file():
        raise CoderError(f"--captions {path}: caption file not found")
    first_line = read_text(path, "captions file").partition("\n")[0]
    header = {field.strip().lower() for field in next(csv.reader([first_line]), [])}
    if {"image", "caption"} <= header:
        by_image = read_captions_csv(path)
        pairs = [(caption, image) for image, captions in by_image.items() for caption in captions]
        return [c for c, _ in pairs], [i for _, i in pairs]
    texts = read_captions(path)
    return texts, [None] * len(texts)
