"""How images become model input: preprocessing geometries and training augmentations, as registries.

A task names one of each (``Task.preprocess``, ``Task.augment``); third-party packages add more
through the ``peftbench.transforms`` entry-point group (an object registered with
:func:`register_preprocess` / :func:`register_augment`, or a module that calls them).

Preprocessing decides what the decoded-image cache stores for a (task, split, input size): a
:class:`Geometry`. Built in:

* ``resize`` (VTAB): every split is resized straight to ``size`` × ``size`` (aspect not kept).
* ``resize-crop`` (FGVC), with ``R = int(size * 256 / 224)`` (256 for 224, VPT's ``transforms.py`` rule):

  - evaluation splits: shorter side resized to ``R`` (aspect kept, bilinear), then the centre
    ``size`` × ``size`` crop: exactly VPT's ``Resize(256) → CenterCrop(224)``;
  - training splits of a task that has an augmentation: shorter side resized to ``R`` the same way,
    then the centre ``R`` × ``R`` square is stored; the augmentation cuts a random ``size`` crop from
    it at every step. **Approximation:** VPT's ``Resize(256) → RandomCrop(224)`` draws the crop from
    the whole resized image; here the crop position along the longer side is limited to the central
    256 pixels (square images are not affected; docs/data.md).

Augmentations run on uint8 batches on the device, every step. Built in:

* ``crop-flip`` (FGVC): torchvision's ``RandomCrop(size)`` then ``RandomHorizontalFlip(0.5)``, per image,
  drawn from torch's global RNG (so seeding and the RNG state a checkpoint saves make it reproducible
  and resumable).
* ``rrc-flip``: timm's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bilinear or bicubic) then a flip, per
  image, from the stored image (a recipe's ``augment``: SSF on FGVC).
* ``flip-rand-m9-mstd0.5-inc1``: a flip, then timm's RandAugment ``rand-m9-mstd0.5-inc1`` with bicubic resampling,
  per image: timm's ``create_transform(is_training=True, auto_augment=..., interpolation="bicubic")`` whose crop the
  caller replaced by the stored resize (a recipe's ``augment``: SCT's ``train_aug``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .._registry import Registry
from ..tasks import Task

# ---------------------------------------------------------------------------------------------
# preprocessing: what is stored for a split
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """How a split's images are stored: ``stored`` × ``stored``, made by resizing straight to it
    (``resize_shorter`` None) or by resizing the shorter side to ``resize_shorter`` and centre-cropping."""

    stored: int
    resize_shorter: int | None = None
    interpolation: str = "bilinear"

    @property
    def tag(self) -> str:
        how = f"s{self.resize_shorter}c{self.stored}" if self.resize_shorter else f"r{self.stored}"
        return f"{how}{'' if self.interpolation == 'bilinear' else '-' + self.interpolation}"


Preprocess = Callable[[Task, str, int], Geometry]  # (task, split, input size) -> geometry
Augment = Callable[[int], Callable[[torch.Tensor], torch.Tensor]]  # input size -> batch transform

PREPROCESS: Registry[Preprocess] = Registry("preprocessing", group="peftbench.transforms")
AUGMENT: Registry[Augment] = Registry("augmentation", loader=PREPROCESS.load)


def register_preprocess(name: str):
    """Decorator: ``fn(task, split, size) -> Geometry`` registered as a preprocessing."""
    def deco(fn: Preprocess) -> Preprocess:
        PREPROCESS.add(name, fn)
        return fn
    return deco


def register_augment(name: str):
    """Decorator: ``factory(size) -> (uint8 batch -> uint8 batch)`` registered as an augmentation."""
    def deco(fn: Augment) -> Augment:
        AUGMENT.add(name, fn)
        return fn
    return deco


def resize_length(size: int) -> int:
    """VPT's resize length for a crop of ``size`` (224 → 256)."""
    return int(size * 256 / 224)


def training_splits(task: Task) -> set[str]:
    return {pair[0] for pair in task.splits.values()}


def geometry(task: Task, split: str, size: int, interpolation: str | None = None) -> Geometry:
    """What the cache stores for ``split`` of ``task`` at input ``size`` (``interpolation``: replaces the
    preprocessing's resampling, e.g. a paper's PIL bicubic)."""
    geo = PREPROCESS.get(task.preprocess)(task, split, size)
    return dataclasses.replace(geo, interpolation=interpolation) if interpolation else geo


def resampling(task: Task, data_root, interpolation: str | None = None) -> str | None:
    """The resampling a run uses: its own, else that of the pipeline the task's files at ``data_root`` come from
    (the TFDS layout's tf-bilinear), else None (the preprocessing's)."""
    from .layouts import locate

    return interpolation or (locate(task, Path(data_root))[0].interpolation if data_root is not None else None)


def pipeline(task: Task, size: int, interpolation: str | None = None, mean=None, std=None, data_root=None,
             augment: str | None = None) -> dict:
    """What a run's images went through, as its record keeps it (``record.data_pipeline``): the files (the layout
    found at ``data_root``, else the task's main one), each split role's geometry, the training augmentation and
    the normalisation."""
    from .images import IMAGENET_MEAN, IMAGENET_STD
    from .layouts import locate

    layout = locate(task, Path(data_root))[0].name if data_root is not None else task.layout
    interpolation = resampling(task, data_root, interpolation)
    out = {"layout": layout, "preprocess": task.preprocess, "augment": augment or task.augment}
    for role, (train, evaluate) in sorted(task.splits.items()):
        out[f"{role}_train"] = geometry(task, train, size, interpolation).tag
        out[f"{role}_eval"] = geometry(task, evaluate, size, interpolation).tag
    out["interpolation"] = interpolation or geometry(task, task.splits["final"][1], size).interpolation
    out["mean"] = list(mean or IMAGENET_MEAN)
    out["std"] = list(std or IMAGENET_STD)
    return out


def augmenter(task: Task, size: int, name: str | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The training augmentation ``name`` (a recipe's), else the task's, at input ``size`` (None: none)."""
    name = name or task.augment
    return None if name is None else AUGMENT.get(name)(size)


@register_preprocess("resize")
def _resize(task: Task, split: str, size: int) -> Geometry:
    return Geometry(size)


@register_preprocess("resize-crop")
def _resize_crop(task: Task, split: str, size: int) -> Geometry:
    r = resize_length(size)
    if task.augment is not None and split in training_splits(task):
        return Geometry(r, r)  # random crops of `size` are cut from it while training
    return Geometry(size, r)


# ---------------------------------------------------------------------------------------------
# augmentation
# ---------------------------------------------------------------------------------------------


@register_augment("crop-flip")
def _crop_flip(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: random_crop_flip(x, size)


@register_augment("rrc-flip")
def _rrc_flip(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: random_resized_crop_flip(x, size)


@register_augment("flip-rand-m9-mstd0.5-inc1")
def _flip_randaugment(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: flip_randaugment(x, size)


def flip_randaugment(x: torch.Tensor, size: int, policy: str = "rand-m9-mstd0.5-inc1",
                     mean: tuple[float, float, float] = (0.485, 0.456, 0.406), flip_p: float = 0.5) -> torch.Tensor:
    """(N, C, H, W) uint8 → the same shape: per image ``RandomHorizontalFlip(flip_p)`` (torch's generator) then timm's
    ``rand_augment_transform(policy)`` on the PIL image (numpy's generator picks the ops, Python's draws their
    probabilities, magnitudes and signs), with the parameters timm's ``transforms_imagenet_train`` gives it:
    ``translate_const = int(0.45 · size)``, ``img_mean`` = the normalisation mean in 0-255 (the fill of the geometric
    ops) and bicubic resampling. SCT's ``vtab.py:55-66`` (``create_transform`` with ``auto_augment`` and
    ``interpolation="bicubic"``, its crop replaced by ``Resize((224, 224))``, colour jitter off as timm turns it off
    under RandAugment, no random erasing). It runs on the CPU; the batch comes back on its device. The
    checkpoints keep numpy's and Python's generators, so a resumed run draws on as an uninterrupted one."""
    import numpy as np
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

    if x.dim() != 4:
        raise ValueError(f"flip_randaugment expects an (N, C, H, W) batch, got shape {tuple(x.shape)}")
    params = {"translate_const": int(size * 0.45), "img_mean": tuple(min(255, round(255 * m)) for m in mean),
              "interpolation": Image.BICUBIC}
    augment = rand_augment_transform(policy, params)
    out = []
    for img in x.cpu():
        if torch.rand(1) < flip_p:
            img = img.flip(-1)
        pil = augment(Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()))
        out.append(torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(out).to(x.device) if out else x


def random_resized_crop_flip(x: torch.Tensor, size: int, scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5) -> torch.Tensor:
    """(N, C, H, W) uint8 → (N, C, size, size): timm's ``--simple-aug`` training transform (SSF, GPS on FGVC:
    ``RandomResizedCropAndInterpolation(size, scale 0.08-1, ratio 3/4-4/3, interpolation "random")`` then
    ``RandomHorizontalFlip(0.5)``) per image, on the stored image: torchvision's crop parameters (the same
    rule), bilinear or bicubic at even odds, antialiased, all drawn from torch's global generator.
    **Approximation:** the crop is drawn from the stored square (the central ``R`` × ``R`` of the shorter-side
    resize, docs/data.md), not from the whole original image."""
    from torchvision.transforms import InterpolationMode, RandomResizedCrop
    from torchvision.transforms.v2 import functional as TF

    if x.dim() != 4:
        raise ValueError(f"random_resized_crop_flip expects an (N, C, H, W) batch, got shape {tuple(x.shape)}")
    out = []
    for img in x:
        top, left, h, w = RandomResizedCrop.get_params(img, list(scale), list(ratio))
        mode = InterpolationMode.BICUBIC if torch.rand(()) < 0.5 else InterpolationMode.BILINEAR
        crop = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=mode, antialias=True)
        out.append(crop.flip(-1) if torch.rand(()) < flip_p else crop)
    return torch.stack(out) if out else x[:, :, :size, :size]


def random_crop_flip(x: torch.Tensor, size: int, flip_p: float = 0.5) -> torch.Tensor:
    """(N, C, H, W) → (N, C, size, size): a random ``size`` crop and a horizontal flip with
    probability ``flip_p``, independently per image. ``H`` and ``W`` must be at least ``size``."""
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip expects an (N, C, H, W) batch, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if h < size or w < size:
        raise ValueError(f"random_crop_flip: images of {h}x{w} are smaller than the crop {size}")
    if n == 0:
        return x[:, :, :size, :size]
    # offsets and coins from torch's global (CPU) generator, whatever the device of x
    top = torch.randint(0, h - size + 1, (n,))
    left = torch.randint(0, w - size + 1, (n,))
    flip = torch.rand(n) < flip_p
    ar = torch.arange(size)
    rows = top[:, None] + ar  # (n, size)
    cols = left[:, None] + ar  # (n, size)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    dev = x.device
    rows, cols = rows.to(dev), cols.to(dev)
    idx_n = torch.arange(n, device=dev)[:, None, None, None]
    idx_c = torch.arange(c, device=dev)[None, :, None, None]
    return x[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]
