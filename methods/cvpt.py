"""CVPT (Huang et al., "CVPT: Cross Visual Prompt Tuning", ICCV 2025; docs/methods/cvpt.md), from the official code
(Lingyun0419/CVPT@2fc9877 ``CVPT.py``: ``CvptBlock``, ``CrossAttention``, ``CVPT``; ``train.py``).

Per block, P learnable prompt tokens that the image tokens read through cross-attention, instead of prompts appended
to the sequence: the sequence keeps its length, so the cost grows with P only linearly. The cross-attention's
weights are the block's own pretrained attention weights (the official ``_load_weights`` copies query, key, value
and out into ``CrossAttn``, which nothing trains), so peftbench uses the block's ``attn.qkv`` and ``attn.proj``
directly. With the released default ``insert`` = 3 (``train.py --insert``), block i computes

    x ← x + DP(Attn(LN1(x)))
    x ← x + CrossAttn(q = x, k = v = Dropout(P_i))           (no LayerNorm, no drop path)
    x ← x + DP(MLP(LN2(x)))

(``CvptBlock.forward``, CVPT.py:232-251; the other insert positions are options). Trained: the prompts (depth × P × D)
and the head. Prompts: xavier-uniform on the (depth, P, D) tensor, bound sqrt(6 / ((P + depth) · D)) (CVPT.py:318-319).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.layers.timm_parts import vit_stem
from peftbench.methods import Method, Option, PerTask, Recipe, TunedViT, register_method

SETTINGS = Path(__file__).with_name("cvpt_settings.csv")  # the released per-task configs (configs/<task>.yaml)
# train.py: AdamW lr 1e-3 (configs' lr per task), wd 0.05, batch 32, 100 epochs, cosine with 10 warm-up epochs
# (timm CosineLRScheduler, lr_min 1e-5, warmup from 1e-6), absolute rates: base lr = 1e-3 · 256 / 32 = 0.008.
# demo lr: the AdamW methods' 0.04, not searched for cvpt (results/demo-hparam-search.csv has no cvpt row)
CVPT_RECIPE = Recipe(optimizer="adamw", batch_size=32, epochs=100, warmup_epochs=10, lr_grid=(0.008,),
                     wd_grid=(0.05,)).for_protocol("demo", lr=0.04, wd=0.0001, batch_size=64)
INSERTS = (1, 2, 3, 4, 5)


def cross_attention(attn: nn.Module, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """``CrossAttention.forward`` with the block's attention weights: queries from ``x`` (B, N, D), keys and values
    from ``prompts`` (B, P, D), the heads of ``attn``, then ``attn.proj``."""
    b, n, d = x.shape
    w, bias = attn.qkv.weight, attn.qkv.bias
    h = attn.num_heads

    def lin(t, i):
        return F.linear(t, w[i * d:(i + 1) * d], None if bias is None else bias[i * d:(i + 1) * d])

    q = lin(x, 0).view(b, n, h, d // h).transpose(1, 2)
    k = lin(prompts, 1).view(b, -1, h, d // h).transpose(1, 2)
    v = lin(prompts, 2).view(b, -1, h, d // h).transpose(1, 2)
    att = ((q @ k.transpose(-2, -1)) * (d // h) ** -0.5).softmax(dim=-1)
    return attn.proj((att @ v).transpose(1, 2).reshape(b, n, d))


class CVPTBlock(nn.Module):
    """A frozen timm ViT block (``.block``) that also reads its layer's prompts by cross-attention at position
    ``insert``. ``drop_path1`` / ``drop_path2`` are the block's own (a recipe's stochastic depth sets them by name)."""

    def __init__(self, block: nn.Module, insert: int):
        super().__init__()
        if insert not in INSERTS:
            raise ValueError(f"cvpt: insert must be one of {INSERTS}, got {insert}")
        self.block = block
        self.drop_path1, self.drop_path2 = block.drop_path1, block.drop_path2
        self.insert = insert

    def forward(self, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        b, i = self.block, self.insert
        attn = lambda: b.ls1(b.attn(b.norm1(x)))  # noqa: E731
        cross = lambda: cross_attention(b.attn, x, prompts)  # noqa: E731
        if i == 1:
            x = x + cross()
            x = x + self.drop_path1(attn())
        elif i == 2:
            x = x + self.drop_path1(attn() + cross())
        else:
            x = x + self.drop_path1(attn())
            if i == 3:
                x = x + cross()
        if i == 4:
            return x + self.drop_path2(b.ls2(b.mlp(b.norm2(x) + cross())))
        x = x + self.drop_path2(b.ls2(b.mlp(b.norm2(x))))
        return x + cross() if i == 5 else x


class CVPTModel(TunedViT):
    def __init__(self, backbone: nn.Module, num_classes: int, tokens: int, insert: int, dropout: float):
        super().__init__(backbone, num_classes)
        depth, dim = len(backbone.blocks), backbone.embed_dim
        if tokens < 1:
            raise ValueError(f"cvpt: prompt_tokens must be at least 1, got {tokens}")
        for i, blk in enumerate(list(backbone.blocks)):
            backbone.blocks[i] = CVPTBlock(blk, insert)
        bound = math.sqrt(6.0 / ((tokens + depth) * dim))  # xavier-uniform on (depth, P, D)
        self.prompts = nn.Parameter(torch.empty(depth, tokens, dim).uniform_(-bound, bound))
        self.prompt_dropout = nn.Dropout(dropout)
        self.train_modules.append(self.prompt_dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.backbone
        x = vit_stem(vit, x)
        for i, blk in enumerate(vit.blocks):
            x = blk(x, self.prompt_dropout(self.prompts[i].unsqueeze(0).expand(x.shape[0], -1, -1)).to(x.dtype))
        x = vit.norm(x)
        return vit.forward_head(x, pre_logits=True)


@register_method
class Cvpt(Method):
    name = "cvpt"
    description = ("CVPT: per-block prompts read by cross-attention with the block's frozen attention weights "
                   "(docs/methods/cvpt.md)")
    recipe = CVPT_RECIPE
    fusable = True
    options = {
        "prompt_tokens": Option("auto", "prompts per block (auto: the released per-task num; else 10, train.py's "
                                        "default)", type=int, min=1,
                                per_task=PerTask(SETTINGS, 10, column="prompt_tokens")),
        "insert": Option(3, "where the cross-attention enters the block (1-5, CvptBlock.forward; released: 3)",
                         min=1, max=5),
        "dropout": Option(0.1, "dropout on the prompts (train.py --prompt_drop)", min=0.0, max=1.0),
    }

    def build(self, backbone, num_classes, opts):
        return CVPTModel(backbone, num_classes, int(opts["prompt_tokens"]), int(opts["insert"]),
                         float(opts["dropout"]))
