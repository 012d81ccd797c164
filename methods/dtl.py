"""DTL and DTL+ (Fu, Zhu, Wu, "DTL: Disentangled Transfer Learning for Visual Recognition", AAAI 2024;
docs/methods/dtl.md): a compact side network of rank-r branches beside the frozen ViT, from the official code
(heekhero/DTL@bf6c51e models/vision_transformer.py).

Every block i reads its input z_i into a running sum c ← c + B_i A_i z_i (A_i: r × D kaiming-uniform(√5), B_i:
D × r zero; no bias, no scale). After each block from the M-th on (M = 7 of 12 on ViT-B/16: blocks 6..11, 0-based),
Swish_β(c) = c·σ(βc) (β = 100) is added to that block's output: the cumulative sum, so an early branch acts at every
add-back point, and the later blocks read the modified stream. DTL+ passes the patch tokens of Swish_β(c) through one
depthwise k × k convolution (no bias) shared by every add-back point, the prefix (CLS) token unconvolved. The feature
is the pretrained final LayerNorm of the mean of the patch tokens (CLS excluded).

Parameters (head excluded): L·2·D·r (+ D·k² for DTL+): ViT-B/16 36,864 (DTL), 43,776 / 49,152 / 56,064 (k = 3 / 4 / 5).
The frozen blocks before the first add-back record no autograd graph (nothing in them needs a gradient); the blocks
after it do: the gradient reaches the early branches through them, as in the official code.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.methods import Method, Option, PerTask, TunedViT, noah_fixed_recipe, register_method

SETTINGS = Path(__file__).with_name("dtl_settings.csv")  # the official per-task lr, drop-path and DTL+ kernel
SOURCE = "heekhero/DTL@bf6c51e train_scripts/vit/vtab/<task>/train_dtl+.sh:10 (--fusion_size)"
FALLBACK_KERNEL = 3  # a task without an official script: the argparse default --fusion_size 3 (train_vit_vtab.py:78)


def first_add_block(depth: int) -> int:
    """The paper's M for a ViT of ``depth`` blocks: 7 of 12 (train_dtl.sh: --add_after_blocks 6-11, 0-based); other
    depths keep the proportion, ceil(7·depth/12) (a generalisation: the official code only configures ViT-B)."""
    return max(1, math.ceil(7 * depth / 12))


class DTLViT(TunedViT):
    """The frozen ViT, the side network (``down`` A_i, ``up`` B_i, DTL+'s ``fusion`` conv) and the head."""

    def __init__(self, backbone: nn.Module, num_classes: int, rank: int, beta: float, kernel: int, first_add: int):
        super().__init__(backbone, num_classes)
        depth, width = len(backbone.blocks), backbone.embed_dim
        if not 1 <= first_add <= depth:
            raise ValueError(f"dtl: first_add {first_add} must be within the backbone's 1..{depth} blocks")
        self.beta, self.first_add = float(beta), int(first_add)
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        for _ in range(depth):  # the official LoRALinear: A kaiming-uniform(a=√5) (= U(±1/√D)), B zero
            a = nn.Parameter(torch.empty(rank, width))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.down.append(a)
            self.up.append(nn.Parameter(torch.zeros(width, rank)))
        # the official Conv2d(padding="same"), PyTorch's default init U(±1/k); its "same" padding (an even k: 1 before,
        # 2 after) is written out in _added, which spares PyTorch's warning about even kernels
        self.fusion = nn.Conv2d(width, width, kernel, groups=width, bias=False) if kernel else None

    def _added(self, c: torch.Tensor) -> torch.Tensor:
        """Swish_β of the running sum; DTL+: its patch tokens through the shared depthwise conv."""
        h = c * torch.sigmoid(self.beta * c)
        if self.fusion is None:
            return h
        npt = self.backbone.num_prefix_tokens
        gh, gw = self.backbone.patch_embed.grid_size
        patches = h[:, npt:].reshape(h.shape[0], gh, gw, h.shape[-1]).permute(0, 3, 1, 2)
        k = self.fusion.kernel_size[0]
        pre, post = (k - 1) // 2, k - 1 - (k - 1) // 2
        patches = self.fusion(F.pad(patches, (pre, post, pre, post)))
        patches = patches.permute(0, 2, 3, 1).reshape(h.shape[0], gh * gw, h.shape[-1])
        return torch.cat([h[:, :npt], patches], dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        z = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))
        c = torch.zeros((), dtype=z.dtype, device=z.device)
        for i, block in enumerate(bb.blocks):
            c = c + F.linear(F.linear(z, self.down[i]), self.up[i])
            z = block(z)
            if i + 1 >= self.first_add:
                z = z + self._added(c)
        return bb.norm(z[:, bb.num_prefix_tokens:].mean(dim=1))


# The unified protocols train DTL as they train the other NOAH-lineage side modules (AdamW, batch 64, 100 epochs,
# 10 warm-up); the official per-task lr and drop-path are its --protocol paper card (methods/papers/dtl.toml).
# demo lr: the best mean val200 top-1 over the 5 demo tasks (results/demo-hparam-search.csv)
DTL_RECIPE = noah_fixed_recipe(demo_lr=0.04)


@register_method
class DTLMethod(Method):
    name = "dtl"
    description = "DTL: a compact side network of rank-2 branches added back after the later blocks (docs/methods/dtl.md)"
    version = 1
    recipe = DTL_RECIPE
    options = {
        "rank": Option(2, "rank r of every branch (official: 2)", min=1),
        "beta": Option(100.0, "Swish temperature β (official: 100)", min=0.0),
        "first_add": Option("auto", "M: the side network is added after blocks M..L (1-based; auto: 7 of 12, "
                                    "ceil(7·L/12) on other depths)", type=int, min=1, keywords=("auto",)),
    }

    def kernel(self, opts) -> int:
        """The depthwise kernel of the shared convolution: none for DTL."""
        return 0

    def build(self, backbone, num_classes, opts):
        depth = len(backbone.blocks)
        first = first_add_block(depth) if opts["first_add"] == "auto" else int(opts["first_add"])
        model = DTLViT(backbone, num_classes, int(opts["rank"]), float(opts["beta"]), self.kernel(opts), first)
        return model.train_inserted([m for m in (model.fusion,) if m is not None])


@register_method
class DTLPlusMethod(DTLMethod):
    name = "dtl-plus"
    description = ("DTL+: DTL with a shared depthwise k x k convolution on the added patch tokens "
                   "(docs/methods/dtl.md)")
    # demo lr: the best mean val200 top-1 over the 5 demo tasks, the top of its grid (results/demo-hparam-search.csv)
    recipe = noah_fixed_recipe(demo_lr=0.16)
    options = {
        **DTLMethod.options,
        "kernel": Option("auto", "kernel k of the shared depthwise conv (auto: the official per-task value, else 3)",
                         type=int, min=1, per_task=PerTask(SETTINGS, FALLBACK_KERNEL, column="kernel", source=SOURCE,
                                                           fallback_reason="task without an official DTL+ script")),
    }

    def kernel(self, opts) -> int:
        return int(opts["kernel"])
