"""Bottleneck adapters after every block's MLP (spec §4.4), backbone frozen and in eval mode.

Both variants wrap ``block.mlp`` of a timm ViT in :class:`AdaptedMlp` (the original MLP, then the
adapter), so timm's own block computes ``out = x + adapter(mlp(norm2(x)))``; no timm code is forked.

* ``adapter`` (alias ``adapter-vpt``): the adapter of the VPT / E^2VPT tables (Pfeiffer placement,
  VPT code ``vit_adapter``): ``h + W_up·GELU(W_down·h + b_d) + b_u`` with W_down: D → D/r,
  W_up: D/r → D, weights **and** biases zero-initialised, exact GELU, no dropout. Reduction factor
  ``reduction`` r (tables: 8, 64, 256; default 8). Optimiser: the full fine-tuning recipe (the VPT
  code's AdamW quirk). Parameters: depth·(2·D·D/r + D/r + D) + head (ViT-B/16 r=8: 1,779,840).

  Note: with every tensor zero, only b_u gets a gradient at first (W_up's gradient is GELU(0)=0 times
  the input, W_down's and b_d's go through W_up=0). This is what the VPT code does; it is kept.
* ``adapter-noah``: NOAH's adapter (``adapter_super.py``): ``h + W_up·Dropout(QuickGELU(W_down·h +
  b_d)) + b_u``, bottleneck 8, dropout 0.1 (in train mode while training), xavier-uniform weights,
  biases N(0, 1e-6). Parameters: depth·(2·D·8 + 8 + D) + head (ViT-B/16: 156,768).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dataclasses import replace

from peftbench.method import FULL_FT_RECIPE, Method, Option, PeftModel, Recipe, register_method

# NOAH's optimisation (spec §4.5: AdamW, batch 64, 100 epochs, 10 warm-up) for the VPT protocol's lr x wd
# search. Base rates: the engine multiplies them by batch/256, so 0.004 is NOAH's 1e-3 at batch 64.
# (The NOAH protocol itself, with its absolute lr 1e-3 and wd 1e-4, is ``--protocol fixed``.)
NOAH_RECIPE = Recipe(
    optimizer="adamw", batch_size=64, epochs=100, warmup_epochs=10,
    lr_grid=(0.004, 0.002, 0.0004, 0.02), wd_grid=(0.0001, 0.001, 0.01, 0.0),
    # demo suite (tiny ViT, 10 epochs): base 0.04 (lr 0.01) beat 0.008 on demo_digits val for lora
    # (96.5 vs 86.0 %) and adapter-noah (95.5 vs 80.0 %)
    demo_lr=0.04, demo_wd=0.0001, demo_batch_size=64,
)


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
        elif init == "noah":  # NOAH: xavier-uniform weights, biases N(0, 1e-6)
            for lin in (self.down, self.up):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.normal_(lin.bias, std=1e-6)
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


def _finish(backbone: nn.Module, num_classes: int, adapters: list[Adapter]) -> PeftModel:
    model = PeftModel(backbone, num_classes)  # freezes the whole backbone, adapters included
    for a in adapters:
        for p in a.parameters():
            p.requires_grad = True
    model.train_modules.extend(adapters)  # their dropout (NOAH) runs in train mode; the backbone stays in eval
    return model


@register_method
class AdapterVpt(Method):
    name = "adapter"
    aliases = ("adapter-vpt", "adapter-pfeiffer")
    description = "adapter of the VPT tables: zero-init bottleneck D/r after every MLP (spec §4.4)"
    recipe = replace(FULL_FT_RECIPE, demo_lr=0.32)  # demo lr chosen on val200 (results/demo-hparam-search.csv)
    options = {"reduction": Option(8, "reduction factor r: bottleneck D/r (VPT tables: 8, 64, 256)")}

    def build(self, backbone, num_classes, opts):
        r = int(opts["reduction"])
        if r < 1 or backbone.embed_dim // r < 1:
            raise ValueError(f"adapter: reduction {r} leaves no bottleneck for width {backbone.embed_dim}")
        adapters = insert_adapters(backbone, lambda d: Adapter(d, d // r, nn.GELU(), 0.0, "zeros"))
        return _finish(backbone, num_classes, adapters)


@register_method
class AdapterNoah(Method):
    name = "adapter-noah"
    description = "NOAH's adapter: bottleneck 8, QuickGELU, dropout 0.1, after every MLP (spec §4.4)"
    recipe = NOAH_RECIPE
    options = {
        "bottleneck": Option(8, "bottleneck width d (NOAH: 8)"),
        "dropout": Option(0.1, "dropout inside the adapter, after the activation (NOAH: 0.1)"),
    }

    def build(self, backbone, num_classes, opts):
        d, p = int(opts["bottleneck"]), float(opts["dropout"])
        adapters = insert_adapters(backbone, lambda dim: Adapter(dim, d, QuickGELU(), p, "noah"))
        return _finish(backbone, num_classes, adapters)

