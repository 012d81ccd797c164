"""The training regularisers of the papers' timm-based recipes (SSF and GPS on FGVC keep timm's defaults: mixup 0.8,
CutMix 1.0, random erasing 0.25, a model EMA whose weights are the ones evaluated; docs/protocols.md §15).

* :class:`BatchRegulariser`: timm's own ``Mixup`` (mode ``batch``: one λ per batch, the batch mixed with its
  reverse; its soft targets carry the label smoothing) and ``RandomErasing`` (mode ``pixel``, one box), applied in
  that order to the normalised training batch, as timm's prefetching loader does (mixing in the collate function,
  erasing after the normalisation). Both draw from numpy's and Python's global generators, which the run's
  checkpoints save (:func:`peftbench.train.loop.rng_state`), so a resumed run continues the same draws.
* :class:`TrainableEMA`: timm's ``ModelEmaV2`` update, ``ema = decay · ema + (1 − decay) · p`` after every optimiser
  step, kept for the trained tensors only (a frozen tensor is its own average), and swapped in for evaluation.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .hparams import HParams


class BatchRegulariser:
    """``(x, y) -> (x, target)`` for a training batch: mixed / erased images and, when mixing, soft targets."""

    def __init__(self, hp: HParams, num_classes: int, device: torch.device):
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        self.mix = None
        if hp.mixup > 0 or hp.cutmix > 0:
            self.mix = Mixup(mixup_alpha=hp.mixup, cutmix_alpha=hp.cutmix, prob=hp.mixup_prob,
                             switch_prob=hp.mixup_switch_prob, mode="batch", label_smoothing=hp.label_smoothing,
                             num_classes=num_classes)
        self.erase = (RandomErasing(probability=hp.random_erasing, mode="pixel", max_count=1, device=str(device))
                      if hp.random_erasing > 0 else None)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mix is not None:
            x, y = self.mix(x, y)
        if self.erase is not None:
            x = self.erase(x)
        return x, y


def batch_regulariser(hp: HParams, num_classes: int, device: torch.device) -> BatchRegulariser | None:
    """The run's batch regulariser, None when its recipe has none (every unified protocol)."""
    if hp.mixup > 0 or hp.cutmix > 0 or hp.random_erasing > 0:
        return BatchRegulariser(hp, num_classes, device)
    return None


def loss_smoothing(target: torch.Tensor, label_smoothing: float) -> float:
    """The cross entropy's own label smoothing: none for soft targets (mixup's already carry it)."""
    return 0.0 if target.is_floating_point() else label_smoothing


class TrainableEMA:
    """The exponential moving average of a model's trained (floating-point, ``requires_grad``) tensors."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            e = self.shadow[n]
            e.copy_(e * self.decay + (1.0 - self.decay) * p.detach())  # ModelEmaV2's expression, as it rounds

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor], where: str) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"{where}: the model EMA lacks {missing[:5]}")
        for n, e in self.shadow.items():
            e.copy_(state[n])

    @contextmanager
    def applied(self):
        """The model with the averaged tensors in place of the trained ones (evaluation, the saved weights)."""
        with torch.no_grad():
            kept = {n: p.detach().clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(kept[n])
