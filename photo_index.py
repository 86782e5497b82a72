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

Embeddings are cached on disk (never in the photo folder), keyed by the checkpoint, the
backbone and the folder; each photo is keyed by its name, size and modification time, so a
restart loads the cache and only new or changed photos are embedded.

The app searches from many threads at once: a rescan builds a new `Gallery` (photos, vectors,
search) aside and swaps it in with one assignment, and the encoders run one request at a time.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from backbones import ImageFiles, PhotoTooLarge, UnreadablePhoto, as_list, get_backbone
from options import check_writable_dir
from utils import CoderError, atomic_write

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
DEFAULT_CACHE = Path(__file__).resolve().parent / "data_cache" / "photo_index"


def _file_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _hidden(name: str) -> bool:
    return name.startswith(".")  # .thumbnails/, macOS's ._IMG_0001.jpg resource forks


def scan_photos(folder: Path, include_hidden: bool = False) -> list[dict[str, Any]]:
    """Image files under `folder` (recursively, sorted by name), each with its size and
    modification time. Links that lead outside the folder are left out (they are never
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
            found.append({"name": path.relative_to(folder).as_posix(), "size": stat.st_size,
                          "mtime": stat.st_mtime_ns})
    return sorted(found, key=lambda p: p["name"])


class Embedder:
    """Photos, uploaded image bytes and texts -> fused vectors, with a checkpoint's query
    encoders and the region backbone its training features came from."""

    def __init__(self, checkpoint: str | os.PathLike, device: str = "cpu", backbone: str = "efficientnet-lite0",
                 batch_size: int = 32, workers: int = 0) -> None:
        from checkpoint import load_for_inference

        self.checkpoint = Path(checkpoint)
        self.device = torch.device(device)
        self.model, self.tokenizer, self.graph, self.config = load_for_inference(checkpoint, self.device)
        self.mu = float(self.config["mu"])
        self.backbone = get_backbone(backbone, device)
        if self.backbone.feature_dim != self.model.cfg.image_dim:
            raise CoderError(f"{checkpoint}: trained on {self.model.cfg.image_dim}-d region features, but backbone "
                             f"{backbone} gives {self.backbone.feature_dim}-d ones; photos can only be searched with "
                             f"a checkpoint trained on features of that backbone (extract_features.py)")
        self.batch_size, self.workers = batch_size, workers
        # One text batch and one uploaded image at a time: a fast (Rust) tokenizer refuses a
        # second thread ("Already borrowed"), and one decode at a time bounds an upload's memory.
        self._text_lock, self._image_lock = threading.Lock(), threading.Lock()
        self.key = hashlib.sha256(f"{_file_key(self.checkpoint)}|{self.backbone.fingerprint()}".encode()).hexdigest()

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
        loader = DataLoader(ImageFiles(list(paths), self.backbone.preprocess, 0), batch_size=self.batch_size,
                            num_workers=self.workers, collate_fn=as_list)
        with tqdm(total=len(paths), desc="indexing photos", unit="img", disable=not progress) as bar:
            for items in loader:
                good = [(i, t) for i, t, err in items if err is None]
                errors.update({i: err for i, _, err in items if err is not None})
                if good:
                    rows = torch.tensor([i for i, _ in good])
                    vectors[rows] = self._images(torch.stack([t for _, t in good]))
                bar.update(len(items))
        return vectors, errors

    def image_bytes(self, data: bytes) -> torch.Tensor:
        """The fused vector of one uploaded image (CoderError if the bytes are not an image, or
        one of more than backbones.MAX_PHOTO_PIXELS pixels)."""
        with self._image_lock:
            try:
                pixels = self.backbone.preprocess.photo(data)
            except PhotoTooLarge as err:
                raise CoderError(f"uploaded image refused: {err}") from None
            except UnreadablePhoto:
                raise CoderError("not an image this server can read (JPEG, PNG, GIF, BMP or WebP)") from None
            return self._images(pixels.unsqueeze(0))[0]

    @torch.no_grad()
    def texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Fused vectors of free texts, encoded as retrieve.py encodes queries."""
        from retrieve import encode_queries

        with self._text_lock:
            parts = [self.model.fuse(*encode_queries(self.model, list(texts[i:i + batch_size]), self.tokenizer,
                                                     self.graph, self.device), self.mu).float().cpu()
                     for i in range(0, len(texts), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, self.dim)

    @property
    def dim(self) -> int:
        return self.model.fused_dim


class VectorSearch:
    """Top-k by dot product: exact (chunked matrix product, the scores evaluation ranks by) or,
    with `approximate`, a faiss inverted-file index (`nprobe` lists searched per query)."""

    def __init__(self, vectors: torch.Tensor, approximate: bool = False, nprobe: int = 32,
                 chunk_rows: int = 262_144) -> None:
        self.vectors = vectors.float().contiguous()
        self.chunk_rows = chunk_rows
        self.faiss_index = build_faiss(self.vectors.numpy(), nprobe) if approximate and len(vectors) else None

    def __len__(self) -> int:
        return len(self.vectors)

    def ranked(self, queries: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
        """For each query, its top k as (index, score), best first; fewer than k where faiss's
        probed lists hold fewer vectors."""
        scores, indices = self.search(queries, k)
        return [[(i, s) for i, s in zip(row_i.tolist(), row_s.tolist()) if i >= 0]
                for row_s, row_i in zip(scores, indices)]

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
            scores = queries @ self.vectors[start:start + self.chunk_rows].t()
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
    """An id the index does not have, or an indexed photo that is no longer a file inside the
    folder (deleted, or replaced by a link that leads out of it since it was indexed)."""


@dataclass(frozen=True)
class Gallery:
    """One consistent state of the index: the photos (ids are positions in `photos`) and the
    search over their vectors. Never changed in place; a rescan makes a new one."""

    photos: tuple[dict[str, Any], ...]
    index: VectorSearch

    @property
    def vectors(self) -> torch.Tensor:
        return self.index.vectors

    def search(self, queries: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
        """For each query vector, the top k photos as (photo id, score), best first."""
        return self.index.ranked(queries, k)


class PhotoIndex:
    """The photos of a folder as fused vectors, cached on disk and refreshed incrementally.

    `gallery` is the current Gallery; a reader takes it once per request, so that a rescan
    running meanwhile (which swaps in its new Gallery with one assignment) never mixes the
    names of one state with the ids of another."""

    def __init__(self, embedder: Embedder, folder: str | os.PathLike, cache_root: str | os.PathLike | None = None,
                 approximate: bool = False, include_hidden: bool = False) -> None:
        self.embedder, self.approximate, self.include_hidden = embedder, approximate, include_hidden
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CoderError(f"--images {folder}: photo folder not found")
        self.root = self.folder.resolve()
        check_writable_dir(cache_root or DEFAULT_CACHE, "--cache_dir")
        key = hashlib.sha256(f"{embedder.key}|{self.root}".encode()).hexdigest()[:24]
        self.cache = Path(cache_root or DEFAULT_CACHE) / key
        if self.cache.resolve().is_relative_to(self.root):
            raise CoderError(f"--cache_dir {cache_root}: lies inside the photo folder, which is never written to")
        self._refresh_lock = threading.Lock()
        photos, vectors = self._load_cache()
        self.gallery = Gallery(tuple(photos), VectorSearch(vectors, approximate))

    def _load_cache(self) -> tuple[list[dict[str, Any]], torch.Tensor]:
        meta, vectors = self.cache / "photos.json", self.cache / "vectors.npy"
        empty = ([], torch.zeros(0, self.embedder.dim))
        if not (meta.is_file() and vectors.is_file()):
            return empty
        try:
            photos = json.loads(meta.read_text())
            array = np.load(vectors, allow_pickle=False)
        except (OSError, ValueError):
            return empty  # a damaged cache is rebuilt, not trusted
        if array.shape != (len(photos), self.embedder.dim):
            return empty
        return photos, torch.from_numpy(array.astype(np.float32))

    def _save_cache(self, gallery: Gallery) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        atomic_write(self.cache / "vectors.npy", lambda f: np.save(f, gallery.vectors.numpy()))
        atomic_write(self.cache / "photos.json", lambda f: f.write(json.dumps(list(gallery.photos))), mode="w")

    def refresh(self, progress: bool = False) -> dict[str, Any]:
        """Embed new or changed photos, drop removed ones, save the cache, then swap the new
        Gallery in; returns the counts and the photos that could not be read (left out).
        One rescan at a time; searches go on meanwhile on the previous Gallery."""
        with self._refresh_lock:
            old = self.gallery
            on_disk = scan_photos(self.folder, self.include_hidden)
            known = {(p["name"], p["size"], p["mtime"]): i for i, p in enumerate(old.photos)}
            kept = [(p, known[(p["name"], p["size"], p["mtime"])]) for p in on_disk
                    if (p["name"], p["size"], p["mtime"]) in known]
            new = [p for p in on_disk if (p["name"], p["size"], p["mtime"]) not in known]
            vectors, errors = self.embedder.photos([self.folder / p["name"] for p in new], progress)
            readable = [i for i in range(len(new)) if i not in errors]
            removed = len(old.photos) - len(kept)
            photos = tuple([p for p, _ in kept] + [new[i] for i in readable])
            all_vectors = torch.cat([old.vectors[[i for _, i in kept]], vectors[readable]])
            gallery = Gallery(photos, VectorSearch(all_vectors, self.approximate))
            if readable or removed or errors:
                self._save_cache(gallery)
            self.gallery = gallery
        return {"added": len(readable), "removed": removed, "kept": len(kept),
                "unreadable": {new[i]["name"]: err for i, err in errors.items()}}

    def path(self, gallery: Gallery, photo_id: int) -> Path:
        """The file of photo `photo_id` of `gallery`, resolved now (links followed): a photo
        replaced since indexing by a link out of the folder, or gone, is PhotoNotServed."""
        if not 0 <= photo_id < len(gallery.photos):
            raise PhotoNotServed(f"no photo {photo_id} (the index has {len(gallery.photos)})")
        name = gallery.photos[photo_id]["name"]
        try:
            real = (self.folder / name).resolve(strict=True)
        except (OSError, RuntimeError):  # deleted, or a link loop
            raise PhotoNotServed(f"photo {photo_id} ({name}) is no longer in the folder; rescan") from None
        if not real.is_relative_to(self.root) or not real.is_file():
            raise PhotoNotServed(f"photo {photo_id} ({name}) now leads out of the photo folder; it is not served")
        return real


class CaptionSet:
    """The captions of a file, as fused vectors (cached like the photos): a CSV `image,caption`
    (then each caption knows its photo) or a plain file with one caption per line."""

    def __init__(self, embedder: Embedder, path: str | os.PathLike, cache_root: str | os.PathLike | None = None,
                 progress: bool = False) -> None:
        self.path = Path(path)
        self.texts, self.images = read_caption_file(self.path)
        key = hashlib.sha256(f"{embedder.key}|{_file_key(self.path)}".encode()).hexdigest()[:24]
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
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache, lambda f: np.save(f, vectors))
        self.index = VectorSearch(torch.from_numpy(np.asarray(vectors, dtype=np.float32)))


def read_caption_file(path: Path) -> tuple[list[str], list[str | None]]:
    """(captions, the photo name of each or None): a CSV with an `image,caption` header, or one
    caption per line."""
    from caption_sources import read_captions_csv
    from vocab import read_captions

    if not path.is_file():
        raise CoderError(f"--captions {path}: caption file not found")
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().strip().lower().replace(" ", "")
    if header.startswith("image,caption"):
        by_image = read_captions_csv(path)
        pairs = [(caption, image) for image, captions in by_image.items() for caption in captions]
        return [c for c, _ in pairs], [i for _, i in pairs]
    texts = read_captions(path)
    return texts, [None] * len(texts)
