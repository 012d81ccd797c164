"""Pieces of timm's own training set-up that methods trained with timm's scripts (GPS, SPT) use: its head init
and its stochastic depth."""
from __future__ import annotations

import torch
from torch import nn


def timm_head(in_features: int, num_classes: int) -> nn.Linear:
    """Linear(D, C) as a timm ViT initialises a new classifier: weight trunc_normal(std 0.02), bias 0."""
    head = nn.Linear(in_features, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


def drop_path_rates(depth: int, rate: float) -> list[float]:
    """timm's linear stochastic-depth rule: block i drops with probability rate · i / (depth − 1)."""
    return [float(x) for x in torch.linspace(0, rate, depth, device="cpu")]  # (also under a meta-device build)


def add_drop_path(backbone: nn.Module, rate: float) -> list[nn.Module]:
    """Replace every block's ``drop_path1`` / ``drop_path2`` by timm's ``DropPath`` with the linear rule (no-op for
    rate 0); returns the new modules (to be put in train mode while training)."""
    from timm.layers import DropPath

    added: list[nn.Module] = []
    if rate <= 0:
        return added
    for block, r in zip(backbone.blocks, drop_path_rates(len(backbone.blocks), rate)):
        if r > 0:
            for name in ("drop_path1", "drop_path2"):
                if hasattr(block, name):
                    module = DropPath(r)
                    current = getattr(block, name)
                    if isinstance(getattr(current, "drop_path", None), nn.Module):
                        current.drop_path = module  # a method's wrapper around the drop path (NOAH's adapter) stays
                    else:
                        setattr(block, name, module)
                    added.append(module)
    return added


def vit_stem(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What timm's ``VisionTransformer.forward_features`` does before its blocks: patch embedding, class token and
    position embedding (timm's private ``_pos_embed``), patch dropout and the pre-norm. The one place peftbench
    touches a private timm method: prompt methods insert their tokens between this and the blocks."""
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)
