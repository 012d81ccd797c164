"""AdaptFormer (Chen et al., NeurIPS 2022; docs/methods/adaptformer.md): a scaled bottleneck parallel to every MLP.

Official image configuration (``main_image.py`` tuning_config: ``ffn_option="parallel"``, layernorm
option ``"none"``, init ``"lora"``, scalar ``"0.1"``; the Block passes dropout 0.1). In every block, with
x1 = x + attn(norm1(x)) the stream after the attention residual (**not** layer-normed):

    out = x1 + mlp(norm2(x1)) + s · (W_up · Dropout_0.1(ReLU(W_down · x1 + b_d)) + b_u)

(the up bias is scaled with the rest). W_down kaiming-uniform(a=√5), W_up, b_d, b_u zero, so the model
starts as the backbone. Bottleneck d: 8 in the VTAB-1k tables (Jie & Deng's AdaptFormer row, 0.16M),
64 in the official image code. Parameters: L·(2·D·d + d + D) + head; ViT-B/16 d = 8: 156,768 + 769·C.

Each timm block is wrapped in :class:`ParallelAdapterBlock`, which calls the block's own modules
(norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2) and adds the adapter branch; the adapter
needs x1, which timm's ``Block.forward`` keeps internal. Not mergeable (ReLU between the two maps).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from peftbench.methods import Method, Option, TunedViT, noah_fixed_recipe, register_method


class AdaptFormerAdapter(nn.Module):
    """``s · (up(dropout(relu(down(x)))))``, no residual inside (official ``Adapter`` with add_residual=False)."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"adaptformer: bottleneck must be at least 1, got {bottleneck}")
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = float(scale)
        with torch.no_grad():  # official init_option "lora"
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x)))) * self.scale


class ParallelAdapterBlock(nn.Module):
    """A timm ``Block`` (``.base``, unchanged) with an adapter on the post-attention stream added after the MLP."""

    def __init__(self, base: nn.Module, adapter: nn.Module):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        b = self.base
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x), **kwargs)))
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))) + self.adapter(x)


# Jie & Deng's VTAB-1k AdaptFormer baseline (Convpass tech report, Table 1) trained with the NOAH/Convpass
# protocol: AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs, 10 warm-up (base lr 0.004 = 1e-3 at batch 64).
# demo lr: the best mean val200 top-1 over the 5 demo tasks (results/demo-hparam-search.csv)
ADAPTFORMER_RECIPE = noah_fixed_recipe(demo_lr=0.16)


@register_method
class AdaptFormer(Method):
    name = "adaptformer"
    fusable = True  # the parallel adapters stacked per configuration
    description = "AdaptFormer: scaled ReLU bottleneck parallel to every MLP, un-normed input (docs/methods/adaptformer.md)"
    version = 1
    recipe = ADAPTFORMER_RECIPE
    options = {
        "bottleneck": Option(8, "bottleneck width d (VTAB tables: 8; official image code: 64)", min=1),
        "scale": Option(0.1, "fixed scale s of the adapter output (official: 0.1)", min=0.0),
        "dropout": Option(0.1, "dropout after the ReLU (official: 0.1)", min=0.0, max=1.0),
    }

    def build(self, backbone, num_classes, opts):
        d, s, p = int(opts["bottleneck"]), float(opts["scale"]), float(opts["dropout"])
        adapters = []
        for i, block in enumerate(backbone.blocks):
            adapter = AdaptFormerAdapter(backbone.embed_dim, d, s, p)
            backbone.blocks[i] = ParallelAdapterBlock(block, adapter)
            adapters.append(adapter)
        # (TunedViT freezes everything, the adapters included; their dropout runs in train mode)
        return TunedViT(backbone, num_classes).train_inserted(adapters)
