"""Adapter+ and the Houlsby adapter as in visinf/adapter_plus (Steitz & Roth, CVPR 2024; docs/methods/adapter_plus.md).

One bottleneck module for both (official ``Adapter``, no LayerNorm inside, dropout 0):

    a(u) = scaling ⊙ DropPath_p(W_up · GELU(W_down · u + b_d) + b_u)

W_down, W_up ~ truncated normal (std 0.01, cut at ±0.02), biases 0 ("houlsby" init); DropPath p = 0.1
(the adapter's own stochastic depth, per sample, train mode only).

* ``adapter-plus``: the "post" position with channel-wise scaling (``scaling`` ∈ R^D, init 1): one
  adapter after every block, on the full residual stream z = block(x): ``out = z + a(z)``. Each timm
  block is wrapped in :class:`PostAdapterBlock`. Bottleneck r = 8 (``bottleneck=auto``: the per-task
  r of the official ``adapter_plus_dim1-32`` configs). Parameters L·(2·D·r + r + 2·D); ViT-B/16 r = 8:
  165,984 + 769·C.
* ``adapter-houlsby``: the official "houlsby" config (``conf/experiment/ablations/other_configs/
  houlsby_dim8.yaml``): two adapters per block, on the attention branch output and on the MLP branch
  output, each with its own skip, before the residual adds: ``f + a(f)`` with f = attn(norm1(x)) or
  f = mlp(norm2(x)); fixed scaling 1; **every LayerNorm of the ViT trained** (``train_ln``). timm's
  ``blocks[i].attn`` and ``blocks[i].mlp`` are wrapped in :class:`BranchAdapter`. Parameters
  2·L·(2·D·r + r + D) + LayerNorms (2·D·(2·L + 1)); ViT-B/16 r = 8: 313,536 + 38,400 + 769·C.

Neither can be merged into a plain ViT (GELU inside the adapter).
"""
from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn

from peftbench.methods import Method, Option, PerTask, TunedViT, noah_fixed_recipe, register_method

# conf/experiment/vtab/adapter_plus_dim1-32.yaml (dataset_dim), by peftbench task name; fgvc/adapter_plus_dim1-32.yaml
ADAPTER_PLUS_DIMS = {
    "cifar100": 1, "caltech101": 4, "dtd": 2, "oxford_flowers102": 1, "oxford_iiit_pet": 8, "svhn": 16, "sun397": 1,
    "patch_camelyon": 16, "eurosat": 2, "resisc45": 32, "diabetic_retinopathy": 32, "clevr_count": 4,
    "clevr_distance": 8, "dmlab": 8, "kitti_distance": 8, "dsprites_location": 32, "dsprites_orientation": 4,
    "smallnorb_azimuth": 32, "smallnorb_elevation": 8,
    "cub200": 2, "nabirds": 2, "oxford_flowers": 1, "stanford_dogs": 1, "stanford_cars": 32,
}
DEFAULT_BOTTLENECK = 8  # conf/adapter/base_adapter.yaml


class BottleneckAdapter(nn.Module):
    """``scaling ⊙ drop_path(up(gelu(down(u))))`` (official ``Adapter`` with norm_layer None, dropout 0)."""

    def __init__(self, dim: int, bottleneck: int, drop_path: float, channel_scaling: bool):
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"adapter: bottleneck must be at least 1, got {bottleneck}")
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.scaling = nn.Parameter(torch.ones(dim)) if channel_scaling else None  # "channel"; else fixed 1.0
        std = 0.01  # "houlsby" init: truncated normal, std 0.01, cut at ±2·std
        for lin in (self.down, self.up):
            nn.init.trunc_normal_(lin.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(lin.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        y = self.drop_path(self.up(self.act(self.down(u))))
        return y * self.scaling if self.scaling is not None else y


class PostAdapterBlock(nn.Module):
    """A timm ``Block`` (``.base``, unchanged) followed by an adapter on its output: ``z + a(z)``."""

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        z = self.base(x, **kwargs)
        return z + self.adapter(z)


class BranchAdapter(nn.Module):
    """A timm ``attn`` or ``mlp`` (``.base``) followed by an adapter with its own skip: ``f + a(f)``."""

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        f = self.base(x, **kwargs)
        return f + self.adapter(f)


# conf/train/default.yaml + optimizer/adamw.yaml: AdamW lr 1e-3, wd 1e-4 (none on 1-d tensors, biases and the
# scaling), batch 64, 100 epochs, 10 warm-up, no search; base lr 0.004 = 1e-3 at batch 64.
# demo lr: the best mean val200 top-1 over the 5 demo tasks (results/demo-hparam-search.csv)
ADAPTER_PLUS_RECIPE = noah_fixed_recipe(demo_lr=0.04)
# the same training configuration (conf/train/default.yaml); the same demo lr (searched for both)
HOULSBY_RECIPE = ADAPTER_PLUS_RECIPE

DROP_PATH = Option(0.1, "DropPath rate on the adapter output (official: 0.1, every block)", min=0.0, max=1.0)


def _finish(backbone: nn.Module, num_classes: int, adapters: list[nn.Module], train_ln: bool) -> TunedViT:
    model = TunedViT(backbone, num_classes).train_inserted(adapters)  # their DropPath runs in train mode
    if train_ln:  # official train.train_ln: every nn.LayerNorm of the ViT
        for m in backbone.modules():
            if isinstance(m, nn.LayerNorm):
                m.requires_grad_(True)
    return model


@register_method
class AdapterPlus(Method):
    name = "adapter-plus"
    fusable = True  # the adapters stacked per configuration
    description = "Adapter+: channel-scaled bottleneck after every block, DropPath 0.1 (docs/methods/adapter_plus.md)"
    version = 1
    recipe = ADAPTER_PLUS_RECIPE
    options = {
        "bottleneck": Option(DEFAULT_BOTTLENECK, "bottleneck width r (auto: the per-task r of adapter_plus_dim1-32)",
                             type=int, min=1,
                             per_task=PerTask(ADAPTER_PLUS_DIMS, DEFAULT_BOTTLENECK, fallback_reason="task without a "
                                              "per-task Adapter+ dim", source="visinf/adapter_plus@191c4ab "
                                              "conf/experiment/*/adapter_plus_dim1-32.yaml")),
        "drop_path": DROP_PATH,
    }

    def build(self, backbone, num_classes, opts):
        r = int(opts["bottleneck"])
        adapters = []
        for i, block in enumerate(backbone.blocks):
            adapter = BottleneckAdapter(backbone.embed_dim, r, float(opts["drop_path"]), channel_scaling=True)
            backbone.blocks[i] = PostAdapterBlock(block, adapter)
            adapters.append(adapter)
        return _finish(backbone, num_classes, adapters, train_ln=False)


@register_method
class AdapterHoulsby(Method):
    name = "adapter-houlsby"
    fusable = True  # the adapters stacked per configuration
    aliases = ("houlsby",)
    description = "Houlsby adapter (Adapter+ code): after attention and MLP, LayerNorms trained (docs/methods/adapter_plus.md)"
    version = 1
    recipe = HOULSBY_RECIPE
    options = {
        "bottleneck": Option(8, "bottleneck width r of both adapters (official configs: 4, 8)", min=1),
        "drop_path": DROP_PATH,
        "train_ln": Option(True, "also train every LayerNorm of the ViT (official Houlsby config: true)"),
    }

    def build(self, backbone, num_classes, opts):
        r, p = int(opts["bottleneck"]), float(opts["drop_path"])
        adapters = []
        for block in backbone.blocks:
            for t in ("attn", "mlp"):
                adapter = BottleneckAdapter(backbone.embed_dim, r, p, channel_scaling=False)
                setattr(block, t, BranchAdapter(getattr(block, t), adapter))
                adapters.append(adapter)
        return _finish(backbone, num_classes, adapters, train_ln=bool(opts["train_ln"]))
