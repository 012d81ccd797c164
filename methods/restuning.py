"""Res-Tuning-Bypass (Jiang et al., "Res-Tuning: A Flexible and Efficient Tuning Paradigm via Unbinding Tuner from
Backbone", NeurIPS 2023; docs/methods/restuning.md) as the authors' group implements it in ms-swift
(modelscope/ms-swift@3602360 swift/tuners/restuning.py, restuning_components.py): a ladder of Res-Adapters beside the
frozen ViT, fed with the detached outputs of its blocks, whose last state replaces the input of the ViT's final norm.

With h_0 the input of block 0, h_l the output of block l-1 (l = 1..L), sg a stop-gradient and A(x) = x + W2 GELU(W1 x +
b1) + b2 (a Res-Adapter: the residual is inside the tuner):

    b_0 = sg(h_0);   b_l = A^lat_l(sg(h_l)) + A^ver_l(b_{l-1});   logits = head(pool(norm(b_L)))

W1 (r × D), W2 (D × r) Xavier-uniform, biases N(0, 1e-6²); no gate, no scale between the two branches (a plain sum:
restuning.py:322). Parameters (head excluded): L·2·(2Dr + r + D); ViT-B/16 at ms-swift's default r = 32: 1,198,848.
Every operation after the blocks is per token: with CLS pooling only the CLS rows are computed (the same logits).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.layers.timm_parts import vit_stem
from peftbench.methods import Method, Option, TunedViT, noah_fixed_recipe, register_method

BIAS_STD = 1e-6  # restuning_components.py:123-126 (normal_(std=1e-6) on both biases)


class ResAdapter(nn.Module):
    """x + ln2(GELU(ln1(x))) (restuning_components.py:69-153, ``adapter_length`` r); ``zero``: ln2 all zeros
    (``zero_init_last`` on the last bypass block, restuning_components.py:105-116)."""

    def __init__(self, width: int, dim: int, zero: bool = False):
        super().__init__()
        self.ln1, self.ln2 = nn.Linear(width, dim), nn.Linear(dim, width)
        for lin in (self.ln1, self.ln2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.normal_(lin.bias, std=BIAS_STD)
        if zero:
            nn.init.zeros_(self.ln2.weight)
            nn.init.zeros_(self.ln2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ln2(F.gelu(self.ln1(x)))


class ResTuningBypassViT(TunedViT):
    """The frozen ViT, the bypass (``lateral``, ``vertical``: one Res-Adapter each per block) and the head."""

    def __init__(self, backbone: nn.Module, num_classes: int, dim: int, zero_init_last: bool):
        super().__init__(backbone, num_classes)
        depth, width = len(backbone.blocks), backbone.embed_dim
        last = depth - 1
        self.lateral = nn.ModuleList(ResAdapter(width, dim, zero_init_last and i == last) for i in range(depth))
        self.vertical = nn.ModuleList(ResAdapter(width, dim, zero_init_last and i == last) for i in range(depth))
        # CLS pooling reads one row, and every bypass operation acts per token: the bypass runs on the CLS rows only
        self.cls_only = backbone.global_pool == "token"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        rows = slice(0, 1) if self.cls_only else slice(None)
        with torch.no_grad():  # the probes are detached (restuning_components.py:326-352): no graph in the backbone
            z = vit_stem(bb, x)  # h_0: the input of blocks.0 (the root probe, a forward-pre-hook)
            b = z[:, rows]
            stems = []
            for block in bb.blocks:  # h_1..h_L: the blocks' outputs (the stem probes)
                z = block(z)
                stems.append(z[:, rows])
        for lat, ver, h in zip(self.lateral, self.vertical, stems):
            b = lat(h) + ver(b)
        # the bypass replaces the input of the final norm (target_modules "norm", hook "input"); the rest is timm's head
        return bb.forward_head(bb.norm(b), pre_logits=True)


# demo lr: the best mean val200 top-1 over the 5 demo tasks (results/demo-hparam-search.csv)
RESTUNING_RECIPE = noah_fixed_recipe(demo_lr=0.04)


@register_method
class ResTuningBypass(Method):
    name = "restuning-bypass"
    description = ("Res-Tuning-Bypass (ms-swift): a ladder of Res-Adapters on the detached block outputs replaces the "
                   "final norm's input, no backward through the backbone (docs/methods/restuning.md)")
    version = 1
    recipe = RESTUNING_RECIPE
    options = {
        "dim": Option(32, "r: the bottleneck of every Res-Adapter (ms-swift's adapter_length default 32)", min=1),
        "zero_init_last": Option(False, "zero the last bypass block's up-projections (ms-swift zero_init_last)"),
    }

    def build(self, backbone, num_classes, opts):
        model = ResTuningBypassViT(backbone, num_classes, int(opts["dim"]), bool(opts["zero_init_last"]))
        return model.train_inserted([model.lateral, model.vertical])
