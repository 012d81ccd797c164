"""Decoding images into uint8 tensors, and normalising them on the device.

VTAB preprocessing (spec §7.1): resize straight to the model's square input size (aspect ratio not
kept), scale to [0, 1], normalise with the protocol's mean/std. No augmentation.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .task import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def decode(path: Path, size: int | tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    """One image as an (H, W, 3) uint8 array, resized to ``size``. Errors name the file."""
    h, w = (size, size) if isinstance(size, int) else size
    try:
        with Image.open(path) as im:
            im.load()
            # RGB, L, P, CMYK, I;16 ... -> RGB; alpha is dropped, as TF's decode_image(channels=3) does
            rgb = im if im.mode == "RGB" else im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except Exception as exc:  # PIL raises many kinds (UnidentifiedImageError, OSError: truncated, ...)
        raise DataError(f"image {path} cannot be decoded: {exc}") from None
    if rgb.size != (w, h):
        rgb = rgb.resize((w, h), _RESAMPLE[interpolation])
    return np.asarray(rgb, dtype=np.uint8)


def decode_many(paths: Sequence[Path], size: int, interpolation: str = "bilinear", workers: int = 4) -> torch.Tensor:
    """(N, 3, H, W) uint8 tensor of all images, decoded in parallel threads (PIL releases the GIL)."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = decode(paths[i], size, interpolation)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(work, range(len(paths))))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


class Normalizer:
    """uint8 (N, 3, H, W) on any device -> float, normalised; cheap enough to run per batch."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, device="cpu", dtype=torch.float32):
        self.mean = torch.tensor(mean, device=device, dtype=dtype).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device, dtype=dtype).view(1, 3, 1, 1) * 255
        self.dtype = dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.mean.device, self.dtype, non_blocking=True) - self.mean) / self.std
