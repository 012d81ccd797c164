"""Hydra (Kim et al., "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning", Neural Networks
2024; docs/methods/hydra.md): a parallel and a sequential low-rank branch on the two output projections of every
block, from the official code (extremebird/Hydra@4138457 vtab1k/hydra.py).

On ``attn.proj`` and ``mlp.fc2`` (W0, b0), with the layer's input h and L(z) = s·(U·Dropout_p(D z + d) + u):

    f(h) = W0 h + b0 + L_par(h) + L_seq(W0 h + b0)

(the parallel branch reads the layer's input, the sequential one its output after the bias; their sum goes through
the block's dropout, LayerScale and drop-path as the layer's output did). D xavier-uniform, d, U, u zero: the model
starts as the backbone. Rank r = 2 for every VTAB task, s and p per task (``methods/hydra_settings.csv``).
Parameters per block 11·D·r + 4r + 4D: ViT-B/16 12·(8452 r + 3072) = 239,712 at r = 2, + 769·C with the head.

Merging (the maths, not the official ``set_hydraWeight``, whose attention half starts from the merged ``fc2``
weight and crashes): W' = (I + s·U_s D_s) W0 + s·U_p D_p, b' = (I + s·U_s D_s) b0 + s·(U_p d_p + u_p) + s·(U_s d_s + u_s).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from peftbench.layers.merge import plain_vit, replace_wrappers, wrap_module
from peftbench.methods import Method, Option, PerTask, TunedViT, noah_fixed_recipe, register_method

SETTINGS = Path(__file__).with_name("hydra_settings.csv")  # the official per-task configs (lr, wd, s, p, batch)
SOURCE = "extremebird/Hydra@4138457 vtab1k/configs/hydra_both/<task>.yaml"
# a task without an official config (demo, FGVC): Hydra_layer's own defaults (vtab1k/hydra.py:46: scale 1, do 0.0)
FALLBACK_SCALE, FALLBACK_DROPOUT = 1.0, 0.0
TARGETS = ("attn.proj", "mlp.fc2")  # the official order per block is fc2's branches, then proj's (hydra.py:81-84)


class HydraBranch(nn.Module):
    """``s · (U · Dropout_p(D z + d) + u)``: D (r × in) xavier-uniform, d, U (out × r), u zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, dropout: float):
        super().__init__()
        self.down = nn.Linear(in_features, rank)
        self.up = nn.Linear(rank, out_features)
        self.dropout = nn.Dropout(dropout)
        self.scale = float(scale)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.down(z))) * self.scale

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, c) with branch(z) = A z + c (eval mode)."""
        return self.scale * (self.up.weight @ self.down.weight), self.scale * (self.up.weight @ self.down.bias
                                                                                + self.up.bias)


class HydraLinear(nn.Module):
    """A frozen timm Linear (``.base``) with Hydra's parallel and sequential branches."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float):
        super().__init__()
        self.base = base
        self.parallel = HydraBranch(base.in_features, base.out_features, rank, scale, dropout)
        self.sequential = HydraBranch(base.out_features, base.out_features, rank, scale, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.base(h)
        return y + self.parallel(h) + self.sequential(y)

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """The base Linear with both branches folded in: W' = (I + A_s) W0 + A_p, b' = (I + A_s) b0 + c_p + c_s."""
        a_p, c_p = self.parallel.affine()
        a_s, c_s = self.sequential.affine()
        w, b = self.base.weight, self.base.bias
        m = torch.eye(a_s.shape[0], dtype=w.dtype, device=w.device) + a_s
        new_w, new_b = m @ w + a_p, m @ b + c_p + c_s
        w.copy_(new_w)
        b.copy_(new_b)
        return self.base


class HydraViT(TunedViT):
    def merged(self) -> nn.Module:
        backbone = copy.deepcopy(self.backbone)
        replace_wrappers(backbone, HydraLinear, lambda m: m.fold())
        return plain_vit(backbone, self.head)


# The unified protocols train Hydra as they train the other NOAH-lineage adapters (AdamW, batch 64, 100 epochs,
# 10 warm-up); the official per-task lr, wd and batch are its --protocol paper card (methods/papers/hydra.toml).
# demo lr: the best mean val200 top-1 over the 5 demo tasks (results/demo-hparam-search.csv)
HYDRA_RECIPE = noah_fixed_recipe(demo_lr=0.04)


@register_method
class HydraMethod(Method):
    name = "hydra"
    fusable = True  # the branches are plain Linear layers: stacked per configuration
    description = ("Hydra: parallel + sequential low-rank branches on attn.proj and mlp.fc2, mergeable "
                   "(docs/methods/hydra.md)")
    version = 1
    recipe = HYDRA_RECIPE
    options = {
        "rank": Option(2, "rank r of every branch (official VTAB: 2, vtab1k/scripts/train_hydra.sh:5)", min=1),
        "scale": Option("auto", "scale s of every branch (auto: the official per-task value, else 1)", type=float,
                        min=0.0, per_task=PerTask(SETTINGS, FALLBACK_SCALE, column="scale", source=SOURCE,
                                                  fallback_reason="task without an official Hydra config")),
        "dropout": Option("auto", "dropout on each branch's rank-r bottleneck (auto: the official per-task value, "
                                  "else 0)", type=float, min=0.0, max=1.0,
                          per_task=PerTask(SETTINGS, FALLBACK_DROPOUT, column="dropout", source=SOURCE,
                                           fallback_reason="task without an official Hydra config")),
    }

    def build(self, backbone, num_classes, opts):
        rank, scale, dropout = int(opts["rank"]), float(opts["scale"]), float(opts["dropout"])
        branches = []
        for block in backbone.blocks:
            for path in reversed(TARGETS):  # fc2's branches first, as the official code draws them
                wrapped = wrap_module(block, path, lambda base: HydraLinear(base, rank, scale, dropout))
                branches += [wrapped.parallel, wrapped.sequential]
        return HydraViT(backbone, num_classes).train_inserted(branches)
