"""SSF: scaling and shifting the features of a frozen ViT (Lian et al., NeurIPS 2022; docs/methods/ssf.md).

Every SSF pair (gamma, beta) sits right after the output of one linear operation of the backbone:
``y = gamma * f(x) + beta`` over the output channels. On a timm ViT the official positions are the
outputs of, in every block, ``norm1``, ``attn.qkv`` (the fused 3·D output), ``attn.proj``, ``norm2``,
``mlp.fc1`` (before the GELU) and ``mlp.fc2``, plus ``patch_embed.proj`` and the final ``norm``. Each of
those timm modules is wrapped in :class:`ScaleShift` (the original module moves to ``.base``); nothing
of timm is forked. gamma ~ N(1, 0.02), beta ~ N(0, 0.02). Trained: the SSF pairs and the head.

Parameters: 2·(L·(7·D + H) + 2·D) + head (L blocks, width D, MLP width H); ViT-B/16: 205,824 + 769·C.

Every pair follows an affine map, so :meth:`SsfViT.merged` folds it into that map (W' = diag(gamma)·W,
b' = gamma·b + beta) and returns a plain timm ViT.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from peftbench.layers.merge import plain_vit, replace_wrappers, scale_shift_linear, wrap_module
from peftbench.methods import Method, Recipe, TunedViT, register_method

# the timm modules of a block whose output SSF scales and shifts (official order)
BLOCK_TARGETS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


class ScaleShift(nn.Module):
    """``base(x) * scale + shift``, per output channel (the last dimension, or dimension 1 for a conv)."""

    def __init__(self, base: nn.Module, dim: int, channel_dim: int = -1):
        super().__init__()
        self.base = base
        self.channel_dim = channel_dim
        self.scale = nn.Parameter(torch.empty(dim))
        self.shift = nn.Parameter(torch.empty(dim))
        nn.init.normal_(self.scale, mean=1.0, std=0.02)  # official init_ssf_scale_shift
        nn.init.normal_(self.shift, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        if self.channel_dim == 1:  # NCHW conv output: the same per-channel affine as after flattening
            return y * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        return y * self.scale + self.shift

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """The base module with this pair folded into its weights (in place); returns it."""
        base, g, b = self.base, self.scale.detach(), self.shift.detach()
        if isinstance(base, nn.Linear):
            scale_shift_linear(base, g, b)
        elif isinstance(base, nn.LayerNorm):  # gamma·(w·n + c) + beta
            base.weight.mul_(g)
            base.bias.copy_(g * base.bias + b)
        elif isinstance(base, nn.Conv2d):
            base.weight.mul_(g.view(-1, 1, 1, 1))
            base.bias.copy_(g * base.bias + b)
        else:
            raise TypeError(f"SSF cannot fold into {type(base).__name__}")
        return base


def _out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    raise TypeError(f"SSF wraps Linear, LayerNorm or Conv2d modules, not {type(module).__name__}")


def _wrap(root: nn.Module, path: str, channel_dim: int = -1) -> ScaleShift:
    return wrap_module(root, path, lambda base: ScaleShift(base, _out_features(base), channel_dim))


class SsfViT(TunedViT):
    def merged(self) -> nn.Module:
        backbone = copy.deepcopy(self.backbone)
        replace_wrappers(backbone, ScaleShift, lambda m: m.fold())
        return plain_vit(backbone, self.head)


# Official per-task values (train_scripts/vit/vtab/<task>/train_ssf.sh): absolute lr at batch 64 (32 x 2 GPUs)
# in {1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 5e-2}, wd in {5e-5, 5e-2}. The grid below is that set as base rates
# (x 256/64: the engine multiplies by batch/256). FGVC scripts: lr {2e-4, 2.5e-4, 1e-2, 2e-2}, wd 5e-2.
SSF_RECIPE = Recipe(
    optimizer="adamw", batch_size=64, epochs=100, warmup_epochs=10,
    lr_grid=(0.02, 0.004, 0.008, 0.012, 0.04, 0.08, 0.2), wd_grid=(5e-5, 5e-2),
).for_suite(
    "fgvc", "SSF train_scripts/vit/fgvc/*/train_ssf.sh (absolute lr 2e-4, 2.5e-4, 1e-2, 2e-2 at batch 64, wd 0.05)",
    lr_grid=(0.04, 0.0008, 0.001, 0.08), wd_grid=(0.05,),
# demo lr: the best mean val200 top-1 over the 5 demo tasks (results/demo-hparam-search.csv)
).for_protocol("demo", lr=0.04, wd=0.0001, batch_size=64)


@register_method
class Ssf(Method):
    name = "ssf"
    fusable = True  # the scales and shifts stacked per configuration
    description = "SSF: learned scale and shift after every linear op and LayerNorm of the ViT (docs/methods/ssf.md)"
    version = 1
    recipe = SSF_RECIPE

    def build(self, backbone, num_classes, opts):
        pairs = [_wrap(backbone, "patch_embed.proj", channel_dim=1)]
        for i in range(len(backbone.blocks)):
            pairs += [_wrap(backbone, f"blocks.{i}.{t}") for t in BLOCK_TARGETS]
        pairs.append(_wrap(backbone, "norm"))
        model = SsfViT(backbone, num_classes)  # freezes the backbone, the new pairs included
        for pair in pairs:
            pair.scale.requires_grad = True
            pair.shift.requires_grad = True
        return model
