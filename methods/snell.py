"""SNELL (Shen et al., "Expanding Sparse Tuning for Low Memory Usage", NeurIPS 2024; docs/methods/snell.md): sparse
tuning with a kernelised low-rank update, from the official code (ssfgunner/SNELL@e9d5185
model/vision_transformer_timm.py: ``SNELL``, ``KLoRA``, ``BlockSNELLParallel``).

For every adapted matrix (q, k, v, proj, fc1, fc2 of every block: q, k, v each its own matrix, as the official
model's separate Linear layers; timm's fused qkv holds them stacked) with factors A^h (d_in × r/2) and B^h
(d_out × r/2), h = 0, 1:

    K[i, j] = 0.1·‖A⁰_i − B⁰_j‖₂ − 0.1·‖A¹_i − B¹_j‖₂                  (d_in × d_out)
    S       = K ⊙ sg(|K| ⊙ 1[|K| > quantile(|K|, s)])                   (s > 0: the competition, every forward)
    S       = K                                                          (s = 0: the official KLoRA, dense)
    y       = W0 x + b0 + DropPath_0.1( Dropout_0.1(x) · S )             (proj: no input dropout; q, k, v share it)

sg = stop-gradient: a kept entry's value is K·|K| and its gradient |K|·∂L/∂S. The factors are kaiming-uniform(√5)
on the 3-d tensors (U(±1/√(d·r/2))), not zero. Trained: the factors, the head and the CLS token. ViT-B/16:
165,888·r (5,308,416 at r = 32) + 768 (CLS) + 769·C. Merging: W' = W0 + Sᵀ.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.layers.merge import plain_vit, replace_wrappers, wrap_module
from peftbench.methods import Method, Option, PerTask, TunedViT, noah_fixed_recipe, register_method

SETTINGS = Path(__file__).with_name("snell_settings.csv")  # the official SNELL-32 VTAB scripts' per-task values
SOURCE = "ssfgunner/SNELL@e9d5185 scripts/vtab/snell32/<task>.sh:11 (--init_thres)"
FALLBACK_SPARSITY = 0.0  # a task without an official script: train.py's --init_thres default 0 (KLoRA, dense)
COEFFICIENTS = (0.1, -0.1)  # shared_coeff_fc: SCALE_FACTOR_fc with alternating signs, a constant


class KernelDelta(nn.Module):
    """One matrix's factors and its sparsified kernel update S (d_in × d_out)."""

    def __init__(self, d_in: int, d_out: int, rank: int, sparsity: float):
        super().__init__()
        if rank < 2 or rank % 2:
            raise ValueError(f"snell: rank {rank} must be even (two kernels of rank / 2 dimensions)")
        self.a = nn.Parameter(torch.empty(len(COEFFICIENTS), d_in, rank // 2))   # In_Qs
        self.b = nn.Parameter(torch.empty(len(COEFFICIENTS), d_out, rank // 2))  # Out_Qs
        for t in (self.a, self.b):  # on the 3-d tensors: fan_in = d·r/2, U(±1/√(d·r/2))
            nn.init.kaiming_uniform_(t, a=math.sqrt(5))
        self.sparsity = float(sparsity)

    def kernel(self) -> torch.Tensor:
        # (the constant coefficients made in the factors' dtype: 0.1 exactly in float64, not a float32 0.1 cast up)
        coeff = torch.tensor(COEFFICIENTS, dtype=self.a.dtype, device=self.a.device).view(-1, 1, 1)
        return (coeff * torch.cdist(self.a, self.b, p=2)).sum(dim=0)

    def update(self) -> torch.Tensor:
        """S (d_in × d_out): the kept entries K·|K| with the |K| factor stop-gradient, or K when s = 0."""
        k = self.kernel()
        if self.sparsity <= 0:
            return k
        mag = k.detach().abs()
        tau = torch.quantile(mag.flatten(), self.sparsity)
        return k * F.threshold(mag, float(tau), 0.0)


class SnellLinear(nn.Module):
    """A frozen timm Linear (``.base``) with SNELL's branch; ``parts`` > 1 splits a fused output (qkv) into that many
    matrices, each with its own factors and quantile, sharing one input-dropout draw."""

    Delta = KernelDelta  # (SNELLA's matrices are a subclass: methods/snella.py)

    def __init__(self, base: nn.Linear, rank: int, sparsity: float, parts: int, dropout: float, drop_path: float,
                 **delta_options):
        super().__init__()
        from timm.layers import DropPath

        if base.out_features % parts:
            raise ValueError(f"snell: {base.out_features} outputs do not split into {parts} matrices")
        self.base = base
        d_out = base.out_features // parts
        self.deltas = nn.ModuleList(self.Delta(base.in_features, d_out, rank, sparsity, **delta_options)
                                    for _ in range(parts))
        self.dropout = nn.Dropout(dropout)
        self.drop_paths = nn.ModuleList(DropPath(drop_path) if drop_path > 0 else nn.Identity() for _ in range(parts))

    def weight_update(self) -> torch.Tensor:
        """ΔW (out × in) = [S_1ᵀ; S_2ᵀ; ...]."""
        return torch.cat([d.update().T for d in self.deltas], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd = self.dropout(x)
        branch = torch.cat([dp(xd @ d.update()) for d, dp in zip(self.deltas, self.drop_paths)], dim=-1)
        return self.base(x) + branch

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        self.base.weight.add_(self.weight_update().to(self.base.weight.dtype))
        return self.base


class SnellViT(TunedViT):
    def no_weight_decay(self) -> set[str]:
        return {"head.bias", "backbone.cls_token"}  # the official groups: no decay on cls_token (no_weight_decay())

    def merged(self) -> nn.Module:
        backbone = copy.deepcopy(self.backbone)
        replace_wrappers(backbone, SnellLinear, lambda m: m.fold())
        return plain_vit(backbone, self.head)


# (layer, matrices it holds, input dropout): BlockSNELLParallel (vision_transformer_timm.py:429-463,504-521)
TARGETS = (("attn.qkv", 3, True), ("attn.proj", 1, False), ("mlp.fc1", 1, True), ("mlp.fc2", 1, True))
# The unified protocols train SNELL as the NOAH-lineage adapters (AdamW, batch 64, 100 epochs, 10 warm-up).
# demo lr: the best mean val200 top-1 over the 5 demo tasks (results/demo-hparam-search.csv)
SNELL_RECIPE = noah_fixed_recipe(demo_lr=0.01)


@register_method
class Snell(Method):
    name = "snell"
    description = ("SNELL: kernelised low-rank updates of every qkv, proj, fc1 and fc2, sparsified by magnitude "
                   "competition at every step (docs/methods/snell.md)")
    version = 1
    recipe = SNELL_RECIPE
    options = {
        "rank": Option(32, "rank r of the factors, split into two kernels of r/2 (official VTAB: 32)", min=2),
        "sparsity": Option("auto", "s, the share of each matrix's update zeroed (auto: the official per-task value, "
                                   "else 0: the dense KLoRA)", type=float, min=0.0, max=0.999999,
                           per_task=PerTask(SETTINGS, FALLBACK_SPARSITY, column="sparsity", source=SOURCE,
                                            fallback_reason="task without an official SNELL-32 script")),
        "dropout": Option(0.1, "dropout on the branch inputs (official 0.1; none on proj's)", min=0.0, max=1.0),
        "branch_drop_path": Option(0.1, "stochastic depth on each branch's output (official 0.1)", min=0.0, max=1.0),
    }

    def build(self, backbone, num_classes, opts):
        rank, s = int(opts["rank"]), float(opts["sparsity"])
        wrapped = []
        for block in backbone.blocks:
            for path, parts, drops in TARGETS:
                wrapped.append(wrap_module(block, path, lambda base: SnellLinear(
                    base, rank, s, parts, float(opts["dropout"]) if drops else 0.0, float(opts["branch_drop_path"]))))
        model = SnellViT(backbone, num_classes)
        backbone.cls_token.requires_grad = True  # trained by the official freeze_stages (no weight decay)
        model.train_inserted([m for layer in wrapped for m in (*layer.deltas, layer.dropout, *layer.drop_paths)])
        return model
