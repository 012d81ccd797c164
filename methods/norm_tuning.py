"""LayerNorm tuning (``ln-tune``) and DiffFit (``difffit``) on a frozen ViT (docs/methods/ln_tune.md, difffit.md).

* ``ln-tune``: the affine weight and bias of every LayerNorm (``blocks[i].norm1``, ``blocks[i].norm2``,
  the final ``norm``) + the head (PETL_Vision ``ln``; V-PETL Bench ``lntune``: names containing "norm").
  Parameters 2·D·(2·L + 1) + head; ViT-B/16: 38,400 + 769·C. The trained model is a plain ViT.
* ``difffit`` (Xie et al., ICCV 2023, as PETL_Vision applies it to a ViT classifier): every bias of the
  backbone, every LayerNorm, and per block two learnable vectors γ1, γ2 ∈ R^D (init 1) scaling the
  attention and the MLP branch before the residual add:

      y = x + γ1 ⊙ attn(norm1(x)),   out = y + γ2 ⊙ mlp(norm2(y))

  On timm γ sits in the LayerScale slots: ``blocks[i].ls1`` / ``ls2`` (Identity for this backbone) are
  wrapped in :class:`BranchScale`. Parameters: biases + LayerNorms + 2·L·D; ViT-B/16:
  83,712 + 38,400 + 18,432 = 140,544 + 769·C. Merged: γ1 folds into ``attn.proj`` and γ2 into ``mlp.fc2``
  (W' = diag(γ)·W, b' = γ ⊙ b).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from peftbench.layers.merge import plain_vit
from peftbench.methods import Method, Option, Recipe, TunedViT, register_method


def _layernorms(backbone: nn.Module, final_norm: bool = True) -> list[nn.LayerNorm]:
    return [m for n, m in backbone.named_modules() if isinstance(m, nn.LayerNorm) and (final_norm or n != "norm")]


class BranchScale(nn.Module):
    """``gamma ⊙ base(x)``: a learnable per-channel scale after a block's LayerScale slot (``.base``)."""

    def __init__(self, base: nn.Module, dim: int):
        super().__init__()
        self.base = base
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) * self.gamma


class DiffFitViT(TunedViT):
    @torch.no_grad()
    def merged(self) -> nn.Module:
        backbone = copy.deepcopy(self.backbone)
        for block in backbone.blocks:
            # attn branch: gamma1 ⊙ ls1(proj(o)) with ls1 elementwise, so gamma1 folds into attn.proj; same for fc2
            for slot, layer in (("ls1", block.attn.proj), ("ls2", block.mlp.fc2)):
                scale = getattr(block, slot)
                gamma = scale.gamma.to(layer.weight.dtype)
                layer.weight.mul_(gamma[:, None])
                layer.bias.mul_(gamma)
                setattr(block, slot, scale.base)
        return plain_vit(backbone, self.head)


# PETL_Vision (experiment/config: lr {1e-3, 1e-2} x wd {1e-4, 1e-3}, AdamW, batch 64, 100 epochs, 10 warm-up,
# selection on val200 by the last epoch): base lrs 0.004 / 0.04 at batch 64.
LN_TUNE_RECIPE = Recipe(optimizer="adamw", batch_size=64, epochs=100, warmup_epochs=10,
                        lr_grid=(0.004, 0.04), wd_grid=(1e-4, 1e-3)).for_protocol(
    "demo", lr=0.08, wd=0.0001, batch_size=64)  # demo lr: best mean val200 top-1 (results/demo-hparam-search.csv)
DIFFFIT_RECIPE = Recipe(optimizer="adamw", batch_size=64, epochs=100, warmup_epochs=10,
                        lr_grid=(0.004, 0.04), wd_grid=(1e-4, 1e-3)).for_protocol(
    "demo", lr=0.08, wd=0.0001, batch_size=64)  # demo lr: best mean val200 top-1 (results/demo-hparam-search.csv)


@register_method
class LnTune(Method):
    name = "ln-tune"
    fusable = True  # the LayerNorm affines stacked per configuration
    aliases = ("ln",)
    description = "LN-tune: every LayerNorm weight and bias of the ViT + head (docs/methods/ln_tune.md)"
    version = 1
    recipe = LN_TUNE_RECIPE
    options = {"final_norm": Option(True, "also train the final LayerNorm (PETL_Vision, V-PETL Bench: true)")}

    def build(self, backbone, num_classes, opts):
        model = TunedViT(backbone, num_classes)  # merged(): TunedViT's own plain copy (nothing to fold)
        for m in _layernorms(backbone, bool(opts["final_norm"])):
            m.requires_grad_(True)
        return model


@register_method
class DiffFit(Method):
    name = "difffit"
    fusable = True  # the biases, norms and scales stacked per configuration
    description = "DiffFit: biases, LayerNorms and a learned scale on every attention/MLP branch (docs/methods/difffit.md)"
    version = 1
    recipe = DIFFFIT_RECIPE

    def build(self, backbone, num_classes, opts):
        dim, scales = backbone.embed_dim, []
        for block in backbone.blocks:
            block.ls1 = BranchScale(block.ls1, dim)
            block.ls2 = BranchScale(block.ls2, dim)
            scales += [block.ls1.gamma, block.ls2.gamma]
        model = DiffFitViT(backbone, num_classes)  # freezes everything, the scales included
        for n, p in backbone.named_parameters():
            if n.endswith("bias"):  # PETL_Vision: every name containing "bias"
                p.requires_grad = True
        for m in _layernorms(backbone):
            m.requires_grad_(True)
        for gamma in scales:
            gamma.requires_grad = True
        return model
