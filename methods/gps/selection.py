"""GPS's selection stage (docs/methods/gps.md §2): gradients of a supervised contrastive loss on the training
split, summed over one epoch, then the K largest |gradient| entries of every output row of every weight."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

TEMPERATURE = 0.07  # SupConLoss(temperature=0.07, base_temperature=0.07, contrast_mode="all")


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "all" anchors) of 2B features: rows 0..B−1 are the
    first view of images 0..B−1, rows B..2B−1 the second view; ``labels`` (B,).

    z = f / ||f||, s_ij = z_i·z_j / τ; for every anchor a the positives P(a) = {p ≠ a : y_p = y_a} (always
    containing a's other view); L = mean_a −(1/|P(a)|) Σ_{p∈P(a)} (s_ap − log Σ_{j≠a} exp s_aj)."""
    z = F.normalize(features.float(), dim=1)
    y = torch.cat([labels, labels])
    n = z.shape[0]
    s = z @ z.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    log_den = torch.logsumexp(s.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    log_prob = s - log_den
    positive = (y[:, None] == y[None, :]) & ~self_mask
    per_anchor = (log_prob * positive).sum(1) / positive.sum(1)
    return -per_anchor.mean()


def contrastive_augment(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The official ``--contrast-aug`` view, per image of a uint8 (N, 3, H, W) batch: RandomResizedCrop(size,
    scale (0.08, 1), bicubic) → horizontal flip (0.5) → ColorJitter(0.4, 0.4, 0.4, 0.1) with probability 0.8
    → grayscale with probability 0.2 (torchvision, torch's global RNG)."""
    from torchvision.transforms import v2

    aug = v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ])
    return lambda x: torch.stack([aug(img) for img in x])


def accumulate_gradients(model, weights: dict[str, torch.Tensor], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                         views: Callable[[torch.Tensor], torch.Tensor], prepare: Callable[[torch.Tensor], torch.Tensor],
                         loss_fn=supcon_loss) -> tuple[dict[str, torch.Tensor], dict]:
    """Σ_batches ∂L_b/∂W for the frozen tensors ``weights`` (name → tensor), L_b = ``loss_fn`` of the CLS
    features of two views of every image of batch b (no zeroing in between, as the official pass).
    The caller sets the model's mode (train: the method's stochastic depth is active)."""
    flags = {n: w.requires_grad for n, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    losses = []
    try:
        for x, y in batches:
            v = torch.cat([views(x), views(x)])
            feats = model.features(prepare(v))
            loss = loss_fn(feats, y)
            loss.backward()
            losses.append(float(loss.detach()))
        grads = {n: (w.grad.detach().clone() if w.grad is not None else torch.zeros_like(w)) for n, w in weights.items()}
    finally:
        for n, w in weights.items():
            w.grad = None
            w.requires_grad_(flags[n])
        for p in model.parameters():
            p.grad = None
    if not losses:
        raise ValueError("no batches to compute gradients from")
    return grads, {"num_batches": len(losses), "mean_loss": sum(losses) / len(losses)}
