"""Decoding images into uint8 tensors, and normalising them on the device.

VTAB preprocessing: resize straight to the model's square input size (aspect ratio not kept), scale
to [0, 1], normalise with ImageNet's mean/std (as the VPT/E^2VPT code). No augmentation.

FGVC preprocessing uses ``resize_shorter``: the shorter side is resized to that length
(the longer one to ``int(resize_shorter * long / short)``, aspect kept, as torchvision's
``Resize(int)`` does on a PIL image) and the centre ``size`` × ``size`` square is cut out with
torchvision's ``CenterCrop`` rounding. See :mod:`peftbench.data.transforms` for which split gets which geometry.

Resampling: PIL's ``bilinear`` (the default) and ``bicubic`` (NOAH's, SSF's ...), and ``tf-bilinear``: TensorFlow 2's
``tf.image.resize(image, size)`` (bilinear, half-pixel centres, no antialiasing), the resize of VPT's and E^2VPT's
TFDS pipeline (KMnP/vpt@4410440 src/data/datasets/tf_dataset.py ``preprocess_fn``), computed as torch's
``interpolate(mode="bilinear", align_corners=False, antialias=False)`` (the same formula: source coordinate
``(i + 0.5) * in / out - 0.5``, clamped at the edges). TF keeps the result as float; the cache stores it rounded to
uint8 (at most 0.5/255 from TF's value, docs/data.md). PIL's bilinear antialiases when it shrinks an image, TF's does
not: the two differ for images larger than the input size (SUN397, DMLab, KITTI ...), not for smaller ones.

An image is a file (``Path``) or a member of a container file (:class:`~peftbench.data.layouts.Member`: a TFRecord
image, whose ``scale`` multiplies the decoded pixels before resizing, as dSprites' ``image * 255``).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from ..errors import DataError
from .layouts import Member

if TYPE_CHECKING:  # torch is imported lazily: `data verify` does not need it
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
RESAMPLINGS = ("bilinear", "bicubic", "tf-bilinear")


def tf_resize(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    """TF 2's ``tf.image.resize(arr, (h, w))`` (bilinear, half-pixel centres, no antialiasing) of an (H, W, C)
    array, as float64."""
    import torch

    x = torch.from_numpy(np.array(arr, dtype=np.float64)).permute(2, 0, 1)[None]
    y = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    return y[0].permute(1, 2, 0).numpy()


def tf_bilinear(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    """:func:`tf_resize` rounded to uint8 (what the decoded-image cache stores)."""
    return np.clip(np.round(tf_resize(arr, h, w)), 0, 255).astype(np.uint8)


def _resize(im: Image.Image, w: int, h: int, interpolation: str) -> Image.Image:
    if interpolation == "tf-bilinear":
        return Image.fromarray(tf_bilinear(np.asarray(im, dtype=np.uint8), h, w))
    return im.resize((w, h), _RESAMPLE[interpolation])


def _open(path) -> Image.Image:
    """The decoded image of a file or a container member, as RGB (scaled first for a member with a scale)."""
    with Image.open(path.open() if isinstance(path, Member) else path) as im:
        im.load()
        scale = getattr(path, "scale", 1)
        if scale != 1:  # dSprites: 0/1 masks, times 255 before anything else (task_adaptation dsprites.py)
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "RGB") else im, dtype=np.uint16) * scale
            im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        # RGB, L, P, CMYK, I;16 ... -> RGB (a grey image's channel repeated, as tf.tile(image, [1, 1, 3]));
        # alpha is dropped, as TF's decode_image(channels=3) does
        return im if im.mode == "RGB" else im.convert("RGB")


def decode(path, size: int | tuple[int, int], interpolation: str = "bilinear",
           resize_shorter: int | None = None) -> np.ndarray:
    """One image (a ``Path`` or a container member) as an (H, W, 3) uint8 array, resized to ``size`` (or, with
    ``resize_shorter``: shorter side resized to it, then centre-cropped to ``size``). Errors name the file."""
    h, w = (size, size) if isinstance(size, int) else size
    try:
        rgb = _open(path)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except Exception as exc:  # PIL raises many kinds (UnidentifiedImageError, OSError: truncated, ...)
        raise DataError(f"image {path} cannot be decoded: {exc}") from None
    if resize_shorter is not None:
        return center_crop(resize_shorter_side(rgb, resize_shorter, interpolation), h, w)
    if rgb.size != (w, h):
        rgb = _resize(rgb, w, h, interpolation)
    return np.asarray(rgb, dtype=np.uint8)


def resize_shorter_side(im: Image.Image, length: int, interpolation: str = "bilinear") -> Image.Image:
    """torchvision ``Resize(length)`` on a PIL image: shorter side → ``length``, aspect kept."""
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = length, int(length * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return im
    return _resize(im, new_w, new_h, interpolation)


def center_crop(im: Image.Image, h: int, w: int) -> np.ndarray:
    """torchvision ``CenterCrop((h, w))`` (top/left = round((H - h) / 2)); pads with 0 when smaller."""
    arr = np.asarray(im, dtype=np.uint8)
    H, W = arr.shape[:2]
    if H < h or W < w:  # torchvision pads with zeros, then crops
        pad = np.zeros((max(H, h), max(W, w), 3), dtype=np.uint8)
        top, left = (max(H, h) - H) // 2, (max(W, w) - W) // 2
        pad[top:top + H, left:left + W] = arr
        arr, H, W = pad, pad.shape[0], pad.shape[1]
    top = int(round((H - h) / 2.0))
    left = int(round((W - w) / 2.0))
    return np.ascontiguousarray(arr[top:top + h, left:left + w])


def check_image(path) -> str | None:
    """None when the image (a file or a container member) exists and decodes completely; otherwise what is wrong
    (for verify)."""
    try:
        with Image.open(path.open() if isinstance(path, Member) else path) as im:
            im.load()  # a truncated file fails here (LOAD_TRUNCATED_IMAGES is off)
            if im.width < 1 or im.height < 1:
                return "has no pixels"
    except FileNotFoundError:
        return "does not exist"
    except IsADirectoryError:
        return "is a directory, not an image"
    except Exception as exc:
        return f"cannot be decoded ({type(exc).__name__}: {exc})"
    return None


def decode_into(out: np.ndarray, paths: Sequence, size: int, interpolation: str = "bilinear",
                resize_shorter: int | None = None, workers: int = 4, progress=None) -> None:
    """Decode ``paths`` into ``out`` ((N, 3, size, size) uint8, e.g. a memory map) in parallel threads
    (PIL releases the GIL). ``progress(done)`` is called now and then."""
    def work(i: int) -> None:
        out[i] = decode(paths[i], size, interpolation, resize_shorter).transpose(2, 0, 1)

    step = max(1, len(paths) // 100)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, _ in enumerate(pool.map(work, range(len(paths))), 1):
            if progress is not None and (done % step == 0 or done == len(paths)):
                progress(done)


def decode_many(paths: Sequence, size: int, interpolation: str = "bilinear", workers: int = 4,
                resize_shorter: int | None = None) -> torch.Tensor:
    """(N, 3, H, W) uint8 tensor of all images, decoded in parallel threads (PIL releases the GIL)."""
    import torch

    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    decode_into(out, paths, size, interpolation, resize_shorter, workers)
    return torch.from_numpy(out)


class Normalizer:
    """uint8 (N, 3, H, W) on any device -> float, normalised; cheap enough to run per batch."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, device="cpu", dtype=None):
        import torch

        dtype = dtype or torch.float32
        self.mean = torch.tensor(mean, device=device, dtype=dtype).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device, dtype=dtype).view(1, 3, 1, 1) * 255
        self.dtype = dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.mean.device, self.dtype, non_blocking=True) - self.mean) / self.std
