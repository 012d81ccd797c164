"""Optimisers (a registry) and the learning-rate schedule of the VPT/E^2VPT code (docs/protocols.md).

* ``sgd``: SGD, momentum 0.9, no Nesterov, weight decay on every trainable parameter except the
  names the model lists in ``no_weight_decay()`` (the head bias).
* ``adamw``: AdamW (betas 0.9/0.999, eps 1e-8), weight decay except biases and 1-d parameters
  (NOAH/timm convention), used by the ``fixed`` protocol.
* ``adamw-all``: AdamW (betas 0.9/0.999, eps 1e-8) with the weight decay on **every** trainable tensor, biases
  and the head's included: ``AdamW(trainable, lr, weight_decay)`` as FacT, Convpass and RepAdapter call it.
* ``vpt-adamw``: the full fine-tuning optimiser of the VPT code, quirks included: with a grid
  weight decay > 0 it is AdamW (eps 1e-6) with a *fixed* decay of 0.01 on every parameter whose name
  has no "bias" (the grid value itself is ignored); with weight decay 0 it falls through to SGD
  (momentum 0.9).

Schedules (``HParams.schedule``), stepped once per epoch (docs/protocols.md §5), or after every update for
``timm-cosine`` with ``schedule_per_update`` (:func:`lr_at_update`):

* ``vpt`` (the VPT/E^2VPT code's ``WarmupCosineSchedule``): factor e / W during the W warm-up epochs (so
  epoch 0 runs at lr 0 when ``warmup_lr`` is 0), then 0.5 · (1 + cos(π (e − W) / (E − W))), scaled
  between ``min_lr`` and the peak.
* ``timm-cosine`` (timm's ``CosineLRScheduler``, ``t_in_epochs=True``, ``warmup_prefix=False``,
  ``cycle_limit=1``, ``k_decay=1``, the loops of NOAH, SSF, FacT, GPS, SPT...): f(t) = η_w + t (η − η_w) / W for
  t < W, else η_min + ½ (η − η_min)(1 + cos(π t / T)) while t < T, else η_min (so the cosine **overlaps** the
  warm-up: it counts from t = 0, not from W; epochs past T are a cool-down at η_min). T = ``cosine_epochs``
  (default: the epochs). With ``schedule_lag`` 1 (a loop that calls ``scheduler.step(epoch)`` after epoch
  ``epoch``: NOAH, FacT, Convpass, RepAdapter, SPT) epoch e trains at f(e − 1), and epoch 0 at η_w (what the
  constructor set); with lag 0 (``step(epoch + 1)``: SSF, GPS) epoch e trains at f(e).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .._registry import Registry

OptimizerBuilder = Callable[[list[tuple[str, nn.Parameter]], set[str], float, float], torch.optim.Optimizer]

# name -> builder(named trainable parameters, names without weight decay, lr, weight decay); third-party
# packages add optimisers through the `peftbench.optimizers` entry-point group
OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer", group="peftbench.optimizers")


def register_optimizer(name: str):
    def deco(fn: OptimizerBuilder) -> OptimizerBuilder:
        OPTIMIZERS.add(name, fn)
        return fn
    return deco


def effective_lr(base_lr: float, batch_size: int) -> float:
    """lr actually used = base lr × batch / 256 (the VPT code's rule)."""
    return base_lr * batch_size / 256


def _groups(decay: list, no_decay: list, weight_decay: float) -> list[dict]:
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@register_optimizer("sgd")
def _sgd(named, skip, lr, weight_decay):
    decay = [p for n, p in named if n not in skip]
    no_decay = [p for n, p in named if n in skip]
    return torch.optim.SGD(_groups(decay, no_decay, weight_decay), lr=lr, momentum=0.9)


@register_optimizer("adamw")
def _adamw(named, skip, lr, weight_decay):
    decay = [p for n, p in named if n not in skip and p.ndim > 1 and not n.endswith(".bias")]
    ids = {id(p) for p in decay}
    no_decay = [p for _, p in named if id(p) not in ids]
    return torch.optim.AdamW(_groups(decay, no_decay, weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8)


@register_optimizer("adamw-all")
def _adamw_all(named, skip, lr, weight_decay):
    return torch.optim.AdamW([p for _, p in named], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)


@register_optimizer("vpt-adamw")
def _vpt_adamw(named, skip, lr, weight_decay):
    if weight_decay == 0:
        return torch.optim.SGD([p for _, p in named], lr=lr, momentum=0.9, weight_decay=0.0)
    decay = [p for n, p in named if "bias" not in n]
    no_decay = [p for n, p in named if "bias" in n]
    return torch.optim.AdamW(_groups(decay, no_decay, 0.01), lr=lr, betas=(0.9, 0.999), eps=1e-6)


def build_optimizer(kind: str, model: nn.Module, lr: float, weight_decay: float,
                    head_wd: float | None = None) -> torch.optim.Optimizer:
    """The optimiser ``kind`` over the model's trainable tensors; ``head_wd`` (not None): the head's tensors that the
    optimiser decays get that weight decay instead, in a group of their own (DA-VPT's ``wd_head``,
    Noahsark/DA-VPT@1a5ac609:utils/utils.py:125-165: the decayed tensors whose name holds "head")."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    build = OPTIMIZERS.get(kind)
    optimizer = build(named, skip, lr, weight_decay)
    if head_wd is not None:
        # which head tensors the optimiser decays is its rule's (bias, 1-d, no_weight_decay), whatever the weight decay:
        # read it from the same optimiser built with a non-zero decay (with wd 0 every group has decay 0)
        probe = build(named, skip, lr, weight_decay or 1.0)
        decayed = {id(p) for g in probe.param_groups if g["weight_decay"] != 0 for p in g["params"]}
        head = {id(p) for n, p in named if n.startswith("head.") and id(p) in decayed}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in head]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in head]
                optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"},
                                           "params": moved, "weight_decay": head_wd})
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    return optimizer


def clip_gradients(optimizer: torch.optim.Optimizer, clip: float, mode: str = "norm") -> None:
    """Clip the gradients of the tensors ``optimizer`` steps (timm's ``dispatch_clip_grad``): ``norm``: their total
    L2 norm to at most ``clip``; ``value``: every element to [−clip, clip] (``clip_grad_value_``, DA-VPT's loop)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if mode == "value":
        torch.nn.utils.clip_grad_value_(params, clip)
    else:
        torch.nn.utils.clip_grad_norm_(params, clip)


def timm_cosine(t: int, peak: float, t_initial: int, warmup: int, warmup_lr: float, min_lr: float) -> float:
    """timm's ``CosineLRScheduler`` value at index ``t`` (the defaults of timm 0.5.4 to 1.x: no warm-up prefix,
    one cycle, k_decay 1)."""
    if t < warmup:
        return warmup_lr + t * (peak - warmup_lr) / warmup
    if t >= t_initial:  # past the one cycle: the floor
        return min_lr
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * t / t_initial))


def lr_at_epoch(epoch: int, peak: float, epochs: int, warmup: int, warmup_lr: float = 0.0,
                min_lr: float = 0.0, schedule: str = "vpt", cosine_epochs: int | None = None, lag: int = 0) -> float:
    """The learning rate used during ``epoch`` (0-based) under ``schedule`` (module docstring)."""
    if schedule == "timm-cosine":
        t = epoch - lag
        if t < 0:  # the scheduler's constructor set the warm-up start; nobody stepped it yet
            return warmup_lr if warmup > 0 else peak
        return timm_cosine(t, peak, cosine_epochs or epochs, warmup, warmup_lr, min_lr)
    if epoch < warmup:
        return warmup_lr + (peak - warmup_lr) * epoch / warmup
    span = max(1, epochs - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / span))


def lr_at_update(update: int, steps_per_epoch: int, peak: float, epochs: int, warmup: int, warmup_lr: float = 0.0,
                 min_lr: float = 0.0, cosine_epochs: int | None = None) -> float:
    """timm-cosine stepped per update (timm's ``sched_on_updates``: ``t_in_epochs=False``, ``t_initial`` and
    ``warmup_t`` in updates, ``step_update(num_updates)`` after every update): update ``update`` (0-based over the
    run) trains at f(update)."""
    return timm_cosine(update, peak, (cosine_epochs or epochs) * steps_per_epoch, warmup * steps_per_epoch,
                       warmup_lr, min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
