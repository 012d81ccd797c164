"""Training-time augmentation on uint8 image batches (FGVC, spec §7.2).

``random_crop_flip(x, size)`` is torchvision's ``RandomCrop(size)`` followed by
``RandomHorizontalFlip(0.5)``, applied to every image of a batch independently, on tensors: one
crop offset and one coin per image, drawn from torch's global RNG (so ``torch.manual_seed`` and the
RNG state a checkpoint saves make it reproducible and resumable). It works on any device and never
leaves uint8, so it costs next to nothing compared with the model.

The batch comes from :func:`peftbench.data.load_split`, which stores FGVC training images as the
centre square of the image resized to 256/224 × ``size`` on the shorter side; see the module
docstring of :mod:`peftbench.data` for how this relates to VPT's ``Resize(256) → RandomCrop(224)``.
"""
from __future__ import annotations

import torch


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
