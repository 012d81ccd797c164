"""Bottleneck adapters and how they are inserted into a timm ViT block (shared by the adapter methods)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class QuickGELU(nn.Module):
    """x·σ(1.702·x) (CLIP's / NOAH's approximation of GELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Adapter(nn.Module):
    """``x + up(dropout(act(down(x))))``."""

    def __init__(self, dim: int, bottleneck: int, act: nn.Module, dropout: float = 0.0, init: str = "zeros"):
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"adapter bottleneck must be at least 1, got {bottleneck}")
        self.down = nn.Linear(dim, bottleneck)
        self.act = act
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        if init == "zeros":  # VPT code: every weight and bias zero
            for p in self.parameters():
                nn.init.zeros_(p)
        elif init == "noah":  # NOAH's adapter module: xavier-uniform weights, biases N(0, 1e-6)
            for lin in (self.down, self.up):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.normal_(lin.bias, std=1e-6)
        elif init == "trunc-normal":  # what NOAH's ViT.init_weights then redraws: timm's Linear init
            for lin in (self.down, self.up):
                nn.init.trunc_normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
        else:
            raise ValueError(f"unknown adapter init {init!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.dropout(self.act(self.down(x))))


class AdaptedMlp(nn.Module):
    """A block's original MLP followed by an adapter (replaces ``block.mlp``)."""

    def __init__(self, base: nn.Module, adapter: Adapter):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))


def insert_adapters(backbone: nn.Module, make: Callable[[int], Adapter]) -> list[Adapter]:
    """Wrap every block's MLP; returns the adapters (in block order)."""
    adapters = []
    for block in backbone.blocks:
        adapter = make(backbone.embed_dim)
        block.mlp = AdaptedMlp(block.mlp, adapter)
        adapters.append(adapter)
    return adapters
