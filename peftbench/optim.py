"""Optimisers and the learning-rate schedule of the VPT/E^2VPT code (spec §2.4, §4.2).

* ``sgd``: SGD, momentum 0.9, no Nesterov, weight decay on every trainable parameter except the
  names the model lists in ``no_weight_decay()`` (the head bias).
* ``adamw``: AdamW (betas 0.9/0.999, eps 1e-8), weight decay except biases and 1-d parameters
  (NOAH/timm convention), used by the ``fixed`` protocol.
* ``vpt-adamw``: the full fine-tuning optimiser of the VPT code, quirks included: with a grid
  weight decay > 0 it is AdamW (eps 1e-6) with a *fixed* decay of 0.01 on every parameter whose name
  has no "bias" (the grid value itself is ignored); with weight decay 0 it falls through to SGD
  (momentum 0.9).

The schedule is stepped once per epoch: factor e / W during the W warm-up epochs (so epoch 0 runs at
lr 0 when ``warmup_lr`` is 0), then 0.5 · (1 + cos(π (e − W) / (E − W))), scaled between ``min_lr``
and the peak.
"""
from __future__ import annotations

import math

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adamw", "vpt-adamw")


def effective_lr(base_lr: float, batch_size: int) -> float:
    """lr actually used = base lr × batch / 256 (spec §2.4)."""
    return base_lr * batch_size / 256


def build_optimizer(kind: str, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if kind == "sgd":
        decay = [p for n, p in named if n not in skip]
        no_decay = [p for n, p in named if n in skip]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=0.9)
    if kind == "adamw":
        decay = [p for n, p in named if n not in skip and p.ndim > 1 and not n.endswith(".bias")]
        ids = {id(p) for p in decay}
        no_decay = [p for _, p in named if id(p) not in ids]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if kind == "vpt-adamw":
        if weight_decay == 0:
            return torch.optim.SGD([p for _, p in named], lr=lr, momentum=0.9, weight_decay=0.0)
        decay = [p for n, p in named if "bias" not in n]
        no_decay = [p for n, p in named if "bias" in n]
        groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-6)
    raise ValueError(f"unknown optimizer {kind!r} (known: {', '.join(OPTIMIZERS)})")


def lr_at_epoch(epoch: int, peak: float, epochs: int, warmup: int, warmup_lr: float = 0.0,
                min_lr: float = 0.0) -> float:
    """The learning rate used during ``epoch`` (0-based)."""
    if epoch < warmup:
        return warmup_lr + (peak - warmup_lr) * epoch / warmup
    span = max(1, epochs - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / span))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
