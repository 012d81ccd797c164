"""RepAdapter (Luo et al., arXiv 2302.08106; docs/methods/repadapter.md): a linear, re-parameterisable
adapter before the attention and before the MLP of every block.

One adapter on the layer-normed tokens h (the input of ``attn.qkv`` or of ``mlp.fc1``), hidden width 8,
B grouped in 2 groups, no activation:

    h' = h + s · (W_B · Dropout_0.1(W_A h + a) + b)

W_A (8 x D, a 1x1 Conv1d) xavier-uniform, a = 0; W_B (D x 8 as a grouped 1x1 Conv1d: D x 4 weights, output
channel o reads the inputs of its group o // (D/2)) and b zero, so the model starts as the backbone. The
scale s is per task in the official configs (``scale=auto``). On timm the adapter wraps the Linear it
feeds (:class:`InputAdaptedLinear`: ``base(adapter(h))``), which is the same function since norm1 / norm2
feed nothing else. Parameters per adapter: D·d + d + D·d/g + D; ``placement=both`` (the paper's
RepAdapter, official ``repblock``): 2·L adapters, ViT-B/16 239,808 + 769·C; ``placement=attn``
(``repattn``): 119,904 + 769·C.

Merging (official ``set_RepWeight``): the adapter is the affine map h' = M h + t with
M = I + s·W_B·W_A and t = s·(W_B a + b); folded into the following Linear (W, c): W' = W·M, c' = c + W·t.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from peftbench.layers.merge import plain_vit, replace_wrappers, wrap_module
from peftbench.methods import Method, Option, PerTask, TunedViT, noah_fixed_recipe, register_method

# official configs (luogen1996/RepAdapter configs/{repblock,repattn}/<task>.yaml): scale s
REPBLOCK_TASKS = {
    "cifar100": 0.1, "caltech101": 5.0, "dtd": 1.0, "oxford_flowers102": 0.5, "oxford_iiit_pet": 0.1, "svhn": 10.0,
    "sun397": 0.1, "patch_camelyon": 1.0, "eurosat": 1.0, "resisc45": 5.0, "diabetic_retinopathy": 0.1,
    "clevr_count": 0.5, "clevr_distance": 0.1, "dmlab": 5.0, "kitti_distance": 5.0, "dsprites_location": 5.0,
    "dsprites_orientation": 0.1, "smallnorb_azimuth": 10.0, "smallnorb_elevation": 1.0,
}
REPATTN_TASKS = {
    "cifar100": 0.1, "caltech101": 10.0, "dtd": 0.1, "oxford_flowers102": 0.5, "oxford_iiit_pet": 0.5, "svhn": 10.0,
    "sun397": 0.1, "patch_camelyon": 0.5, "eurosat": 5.0, "resisc45": 0.1, "diabetic_retinopathy": 0.5,
    "clevr_count": 1.0, "clevr_distance": 0.1, "dmlab": 5.0, "kitti_distance": 1.0, "dsprites_location": 10.0,
    "dsprites_orientation": 5.0, "smallnorb_azimuth": 10.0, "smallnorb_elevation": 1.0,
}
FALLBACK_SCALE = 1.0  # tasks without an official config (demo, FGVC): the official default --scale


class RepAdapter(nn.Module):
    """``h + s · (B(dropout(A(h))))`` with A: Conv1d(D, d, 1), B: Conv1d(d, D, 1, groups=g), on (…, N, D) tokens."""

    def __init__(self, dim: int, hidden: int, groups: int, scale: float, dropout: float):
        super().__init__()
        if hidden < 1 or groups < 1 or hidden % groups or dim % groups:
            raise ValueError(f"repadapter: hidden {hidden} and width {dim} must be positive multiples of groups {groups}")
        self.conv_a = nn.Conv1d(dim, hidden, 1, groups=1, bias=True)
        self.conv_b = nn.Conv1d(hidden, dim, 1, groups=groups, bias=True)
        self.dropout = nn.Dropout(dropout)
        self.groups, self.scale = int(groups), float(scale)
        nn.init.xavier_uniform_(self.conv_a.weight)
        nn.init.zeros_(self.conv_a.bias)
        nn.init.zeros_(self.conv_b.weight)
        nn.init.zeros_(self.conv_b.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.transpose(1, 2)  # channels first, as the official Conv1d
        return (self.conv_b(self.dropout(self.conv_a(t))) * self.scale + t).transpose(1, 2)

    def dense_b(self) -> torch.Tensor:
        """W_B as a dense (D x d) matrix: block-diagonal over the groups."""
        w = self.conv_b.weight[:, :, 0]  # (D, d/g)
        dim, per = w.shape
        out_per = dim // self.groups
        dense = w.new_zeros(dim, per * self.groups)
        for g in range(self.groups):
            dense[g * out_per:(g + 1) * out_per, g * per:(g + 1) * per] = w[g * out_per:(g + 1) * out_per]
        return dense

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, t) with adapter(h) = M h + t (eval mode)."""
        wa, a = self.conv_a.weight[:, :, 0], self.conv_a.bias
        wb, b = self.dense_b(), self.conv_b.bias
        eye = torch.eye(wa.shape[1], dtype=wa.dtype, device=wa.device)
        return eye + self.scale * (wb @ wa), self.scale * (wb @ a + b)


class InputAdaptedLinear(nn.Module):
    """``base(adapter(x))``: a timm Linear (``.base``) whose input first goes through a RepAdapter."""

    def __init__(self, base: nn.Linear, adapter: RepAdapter):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(self.adapter(x))

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        m, t = self.adapter.affine()
        w, c = self.base.weight, self.base.bias
        new_bias = c + w @ t
        w.copy_(w @ m)
        c.copy_(new_bias)
        return self.base


class RepAdapterViT(TunedViT):
    def merged(self) -> nn.Module:
        backbone = copy.deepcopy(self.backbone)
        replace_wrappers(backbone, InputAdaptedLinear, lambda m: m.fold())
        return plain_vit(backbone, self.head)


# train.py: AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs, 10 warm-up; no lr search (s per task instead,
# scripts/search_repblock.sh: s in {0.1, 0.5, 1, 5, 10}); base lr 0.004 = 1e-3 at batch 64.
# demo lr: the best mean val200 top-1 over the 5 demo tasks (results/demo-hparam-search.csv)
REPADAPTER_RECIPE = noah_fixed_recipe(demo_lr=0.04)


@register_method
class RepAdapterMethod(Method):
    name = "repadapter"
    fusable = True  # the group-wise adapters stacked per configuration
    description = "RepAdapter: linear grouped adapters before every qkv and fc1, mergeable (docs/methods/repadapter.md)"
    version = 1
    recipe = REPADAPTER_RECIPE
    options = {
        "scale": Option("auto", "scale s (auto: the official per-task value, else 1)", type=float, min=0.0,
                        per_task=PerTask({"both": REPBLOCK_TASKS, "attn": REPATTN_TASKS}, FALLBACK_SCALE, by="placement",
                                         source={p: f"luogen1996/RepAdapter@360992f configs/{f}/<task>.yaml"
                                                 for p, f in (("both", "repblock"), ("attn", "repattn"))},
                                         fallback_reason="task without an official RepAdapter config")),
        "placement": Option("both", "both: before attention and MLP (repblock); attn: attention only (repattn)",
                            choices=("both", "attn")),
        "hidden": Option(8, "hidden width d (official: 8)", min=1),
        "groups": Option(2, "groups of the up-projection B (official: 2)", min=1),
        "dropout": Option(0.1, "dropout between A and B (official: 0.1)", min=0.0, max=1.0),
    }

    def build(self, backbone, num_classes, opts):
        scale = float(opts["scale"])
        targets = ("attn.qkv",) if opts["placement"] == "attn" else ("attn.qkv", "mlp.fc1")
        adapters = []
        for block in backbone.blocks:
            for path in targets:
                adapter = RepAdapter(backbone.embed_dim, int(opts["hidden"]), int(opts["groups"]), scale,
                                     float(opts["dropout"]))
                wrap_module(block, path, lambda base: InputAdaptedLinear(base, adapter))
                adapters.append(adapter)
        return RepAdapterViT(backbone, num_classes).train_inserted(adapters)
