"""Convpass (Jie & Deng, arXiv 2207.07039; docs/methods/convpass.md): convolutional bypasses parallel to
the attention and the MLP of every block, on the layer-normed tokens.

One adapter on input X (the tokens after ``norm1`` / ``norm2``), hidden width d = 8, QuickGELU q:

    Z = q(W_down X + b_down)                              (N tokens x d)
    patches: 3x3 conv (zero padding 1) over the token grid; CLS: the same conv on a 1x1 image
    out = W_up · Dropout_0.1(q(conv(Z))) + b_up

and the block computes ``x + attn(h1) + s·A_attn(h1)`` with h1 = norm1(x), then
``x + mlp(h2) + s·A_mlp(h2)`` with h2 = norm2(x). On timm this is a wrapper around ``blocks[i].attn`` and
``blocks[i].mlp`` (:class:`ParallelBypass`: ``base(h) + s·adapter(h)``), so timm's own block adds it.
Init: W_down xavier-uniform, b_down 0, W_up = b_up = 0 (the model starts as the backbone); the conv is
the identity (centre tap eye(d), other taps 0) or xavier-uniform (per task), bias 0.

s and the conv init are per task in the official configs (``scale=auto``, ``xavier_init=auto``).
Parameters per adapter: 2·D·d + 9·d² + 2·d + D; ``placement=both`` (Convpass): 2·L adapters,
ViT-B/16 327,552 + 769·C; ``placement=attn`` (Convpass_attn): L adapters, 163,776 + 769·C.
Not mergeable (non-linear, token mixing).
"""
from __future__ import annotations

import torch
from torch import nn

from peftbench.layers.adapters import QuickGELU
from peftbench.methods import Method, Option, PerTask, TunedViT, noah_fixed_recipe, register_method

# official configs (JieShibo/PETL-ViT convpass/vtab/configs/{convpass,convpass_attn}/<task>.yaml): scale, xavier_init
CONVPASS_TASKS = {
    "cifar100": (0.1, False), "caltech101": (1.0, False), "dtd": (0.01, True), "oxford_flowers102": (0.1, True),
    "oxford_iiit_pet": (1.0, True), "svhn": (100.0, True), "sun397": (0.1, False), "patch_camelyon": (10.0, False),
    "eurosat": (10.0, False), "resisc45": (10.0, False), "diabetic_retinopathy": (1.0, False),
    "clevr_count": (1.0, False), "clevr_distance": (0.1, True), "dmlab": (10.0, False), "kitti_distance": (10.0, True),
    "dsprites_location": (100.0, True), "dsprites_orientation": (0.1, True), "smallnorb_azimuth": (100.0, True),
    "smallnorb_elevation": (1.0, True),
}
CONVPASS_ATTN_TASKS = {  # every convpass_attn config has xavier_init True
    "cifar100": 0.1, "caltech101": 100.0, "dtd": 0.1, "oxford_flowers102": 1.0, "oxford_iiit_pet": 1.0,
    "svhn": 100.0, "sun397": 0.1, "patch_camelyon": 10.0, "eurosat": 10.0, "resisc45": 100.0,
    "diabetic_retinopathy": 0.1, "clevr_count": 10.0, "clevr_distance": 1.0, "dmlab": 10.0, "kitti_distance": 10.0,
    "dsprites_location": 10.0, "dsprites_orientation": 1.0, "smallnorb_azimuth": 100.0, "smallnorb_elevation": 1.0,
}
FALLBACK_SCALE, FALLBACK_XAVIER = 1.0, False  # tasks without an official config (demo, FGVC)
# the per-task values by placement (both: Convpass, attn: Convpass_attn), as (scale, xavier_init)
TABLES = {"both": CONVPASS_TASKS, "attn": {t: (s, True) for t, s in CONVPASS_ATTN_TASKS.items()}}
SOURCES = {p: f"JieShibo/PETL-ViT@026e4f1 convpass/vtab/configs/{folder}/<task>.yaml"
           for p, folder in (("both", "convpass"), ("attn", "convpass_attn"))}
NO_CONFIG = "task without an official Convpass config"


class ConvpassAdapter(nn.Module):
    """The Convpass bypass (no scale, no residual): ``up(dropout(q(conv(q(down(x))))))``."""

    def __init__(self, dim: int, hidden: int, grid: tuple[int, int], xavier_init: bool, dropout: float):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"convpass: hidden width must be at least 1, got {hidden}")
        self.grid = tuple(int(g) for g in grid)
        self.down = nn.Linear(dim, hidden)
        self.conv = nn.Conv2d(hidden, hidden, 3, 1, 1)
        self.up = nn.Linear(hidden, dim)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            if xavier_init:
                nn.init.xavier_uniform_(self.conv.weight)
            else:  # identity: centre tap eye(hidden), the other taps 0
                nn.init.zeros_(self.conv.weight)
                self.conv.weight[:, :, 1, 1] = torch.eye(hidden)
            nn.init.zeros_(self.conv.bias)
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, w = self.grid
        if n != 1 + h * w:
            raise ValueError(f"convpass expects 1 CLS + {h}x{w} patch tokens, got {n} tokens")
        z = self.act(self.down(x))
        c = z.shape[-1]
        patches = self.conv(z[:, 1:].reshape(b, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, h * w, c)
        cls = self.conv(z[:, :1].reshape(b, 1, 1, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, 1, c)
        return self.up(self.dropout(self.act(torch.cat([cls, patches], dim=1))))


class ParallelBypass(nn.Module):
    """``base(h) + scale · adapter(h)``: a timm ``attn`` or ``mlp`` (``.base``) with a bypass on the same input."""

    def __init__(self, base: nn.Module, adapter: nn.Module, scale: float):
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.scale = float(scale)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.base(x, **kwargs) + self.adapter(x) * self.scale


# Convpass App. B Table 8 / convpass/vtab/train.py: AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs, 10 warm-up,
# no search (base lr 0.004 = 1e-3 at batch 64).
# demo lr: the best mean val200 top-1 over the 5 demo tasks (results/demo-hparam-search.csv) (scale 1)
CONVPASS_RECIPE = noah_fixed_recipe(demo_lr=0.04)


@register_method
class Convpass(Method):
    name = "convpass"
    fusable = True  # the convolutional bypasses stacked per configuration
    description = "Convpass: 3x3-conv bypasses parallel to every attention and MLP (docs/methods/convpass.md)"
    version = 1
    recipe = CONVPASS_RECIPE
    options = {
        "scale": Option("auto", "scale s of the bypass output (auto: the official per-task value, else 1)",
                        type=float, min=0.0, per_task=PerTask(TABLES, FALLBACK_SCALE, column=0, by="placement",
                                                              source=SOURCES, fallback_reason=NO_CONFIG)),
        "xavier_init": Option("auto", "conv init: true = xavier-uniform, false = identity (auto: per task, else false)",
                              type=bool, per_task=PerTask(TABLES, FALLBACK_XAVIER, column=1, by="placement",
                                                          source=SOURCES, fallback_reason=NO_CONFIG)),
        "placement": Option("both", "both: attention and MLP (Convpass); attn: attention only (Convpass_attn)",
                            choices=("both", "attn")),
        "hidden": Option(8, "hidden width d of the bypass (official: 8)", min=1),
        "dropout": Option(0.1, "dropout before the up-projection (official: 0.1)", min=0.0, max=1.0),
    }

    def build(self, backbone, num_classes, opts):
        scale, xavier = float(opts["scale"]), bool(opts["xavier_init"])
        if backbone.num_prefix_tokens != 1:
            raise ValueError(f"convpass needs exactly one prefix (CLS) token, the backbone has {backbone.num_prefix_tokens}")
        grid = backbone.patch_embed.grid_size
        targets = ("attn",) if opts["placement"] == "attn" else ("attn", "mlp")

        def make():
            return ConvpassAdapter(backbone.embed_dim, int(opts["hidden"]), grid, xavier, float(opts["dropout"]))

        adapters = []
        for block in backbone.blocks:
            for t in targets:
                adapter = make()
                setattr(block, t, ParallelBypass(getattr(block, t), adapter, scale))
                adapters.append(adapter)
        return TunedViT(backbone, num_classes).train_inserted(adapters)
