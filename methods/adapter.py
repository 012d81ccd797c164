"""Bottleneck adapters after every block's MLP (docs/methods/adapter.md), backbone frozen and in eval mode.

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

from torch import nn

from peftbench.layers.adapters import Adapter, QuickGELU, insert_adapters
from peftbench.methods import FULL_FT_RECIPE, NOAH_RECIPE, Method, Option, TunedViT, register_method


def _finish(backbone: nn.Module, num_classes: int, adapters: list[Adapter]) -> TunedViT:
    # (TunedViT freezes the whole backbone, adapters included; their dropout (NOAH) runs in train mode)
    return TunedViT(backbone, num_classes).train_inserted(adapters)


@register_method
class AdapterVpt(Method):
    name = "adapter"
    aliases = ("adapter-vpt", "adapter-pfeiffer")
    description = "adapter of the VPT tables: zero-init bottleneck D/r after every MLP (docs/methods/adapter.md)"
    recipe = FULL_FT_RECIPE.for_protocol("demo", lr=0.32)  # chosen on val200 (results/demo-hparam-search.csv)
    options = {"reduction": Option(8, "reduction factor r: bottleneck D/r (VPT tables: 8, 64, 256)", min=1)}
    fusable = True

    def build(self, backbone, num_classes, opts):
        r = int(opts["reduction"])
        if r < 1 or backbone.embed_dim // r < 1:
            raise ValueError(f"adapter: reduction {r} leaves no bottleneck for width {backbone.embed_dim}")
        adapters = insert_adapters(backbone, lambda d: Adapter(d, d // r, nn.GELU(), 0.0, "zeros"))
        return _finish(backbone, num_classes, adapters)


@register_method
class AdapterNoah(Method):
    name = "adapter-noah"
    description = "NOAH's adapter: bottleneck 8, QuickGELU, dropout 0.1, after every MLP (docs/methods/adapter.md)"
    recipe = NOAH_RECIPE
    fusable = True
    options = {
        "bottleneck": Option(8, "bottleneck width d (NOAH: 8)", min=1),
        "dropout": Option(0.1, "dropout inside the adapter, after the activation (NOAH: 0.1)", min=0.0, max=1.0),
        "init": Option("xavier", "xavier: the adapter module's own init (xavier-uniform, biases N(0, 1e-6)); "
                                 "trunc-normal: what NOAH's ViT.init_weights redraws it to (std 0.02, biases 0)",
                       choices=("xavier", "trunc-normal")),
    }

    def build(self, backbone, num_classes, opts):
        d, p = int(opts["bottleneck"]), float(opts["dropout"])
        init = "noah" if opts.get("init", "xavier") == "xavier" else "trunc-normal"
        adapters = insert_adapters(backbone, lambda dim: Adapter(dim, d, QuickGELU(), p, init))
        return _finish(backbone, num_classes, adapters)

