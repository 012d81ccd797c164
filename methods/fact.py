"""FacT: factor-tuning (Jie & Deng, AAAI 2023; docs/methods/fact.md): ``fact-tt`` and ``fact-tk``.

The update of every weight W of the blocks (q, k, v of the fused ``attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2``) is a low-rank tensor factorisation with factors U (r x D, kaiming-uniform)
and V (D x r, zero-initialised) shared by all layers, and a small r x r core per weight:

    y = W x + b + s · V · Dropout_0.1(core(U x))

applied to the activations (the official forward), so the dropout acts on the r-dim core output.
fc1 has k = H/D output chunks (4 for ViT-B) and fc2 k input chunks, each through U / V separately.

* ``fact-tt`` (tensor-train): per block trained cores S_q, S_k, S_v, S_o (r x r), S_1 (k·r x r),
  S_2 (r x k·r), PyTorch Linear init. Parameters 2·D·r + L·(4 + 2k)·r²; ViT-B/16: 1536·r + 144·r².
* ``fact-tk`` (Tucker): the cores come from a shared core tensor C (r x r x r) and coefficients
  P (r x (4 + 2k)·L), both xavier-uniform: block i's attention uses columns (4+2k)·i + 0..3 of P, its MLP
  the next 2k. Parameters 2·D·r + r³ + (4 + 2k)·L·r; ViT-B/16: 1680·r + r³.

Rank and scale are per task in the official configs (``rank=auto``, ``scale=auto``). On timm every
adapted Linear is wrapped in :class:`FacTLinear` (the original moves to ``.base``); U, V (and C, P)
live in the model's ``fact`` module. The update is linear in x, so :meth:`FacTViT.merged` adds the dense
ΔW to each weight (biases unchanged) and returns a plain timm ViT.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.layers.merge import plain_vit, replace_wrappers, wrap_module
from peftbench.methods import Method, Option, PerTask, TunedViT, noah_fixed_recipe, register_method

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")

# official configs (JieShibo/PETL-ViT FacT/configs/{tt,tk}/<task>.yaml): (rank, scale)
FACT_TT_TASKS = {
    "cifar100": (8, 1.0), "caltech101": (16, 10.0), "dtd": (8, 0.01), "oxford_flowers102": (16, 1.0),
    "oxford_iiit_pet": (8, 1.0), "svhn": (16, 100.0), "sun397": (8, 1.0), "patch_camelyon": (8, 10.0),
    "eurosat": (8, 100.0), "resisc45": (8, 0.1), "diabetic_retinopathy": (8, 1.0), "clevr_count": (16, 1.0),
    "clevr_distance": (4, 10.0), "dmlab": (16, 10.0), "kitti_distance": (16, 10.0), "dsprites_location": (16, 100.0),
    "dsprites_orientation": (16, 1.0), "smallnorb_azimuth": (16, 100.0), "smallnorb_elevation": (8, 10.0),
}
FACT_TK_TASKS = {
    "cifar100": (32, 0.1), "caltech101": (32, 10.0), "dtd": (16, 0.01), "oxford_flowers102": (32, 1.0),
    "oxford_iiit_pet": (16, 10.0), "svhn": (32, 100.0), "sun397": (16, 1.0), "patch_camelyon": (32, 10.0),
    "eurosat": (32, 100.0), "resisc45": (32, 10.0), "diabetic_retinopathy": (16, 1.0), "clevr_count": (32, 10.0),
    "clevr_distance": (16, 10.0), "dmlab": (32, 10.0), "kitti_distance": (32, 10.0), "dsprites_location": (32, 100.0),
    "dsprites_orientation": (32, 1.0), "smallnorb_azimuth": (32, 100.0), "smallnorb_elevation": (16, 10.0),
}
# tasks without an official config (demo, FGVC): the most frequent official value of each
FALLBACK = {"fact-tt": (16, 1.0), "fact-tk": (32, 10.0)}


class FacTShared(nn.Module):
    """The factors every layer shares: U (``u``: D → r), V (``v``: r → D, zeros); Tucker: C (``core``), P (``coeff``)."""

    def __init__(self, dim: int, rank: int, columns: int, tucker: bool):
        super().__init__()
        if rank < 1:
            raise ValueError(f"fact: rank must be at least 1, got {rank}")
        self.rank, self.tucker = int(rank), bool(tucker)
        self.u = nn.Linear(dim, rank, bias=False)  # PyTorch default init: kaiming-uniform(a=√5)
        self.v = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.v.weight)
        if tucker:
            self.core = nn.Parameter(torch.empty(rank, rank, rank))
            self.coeff = nn.Parameter(torch.empty(rank, columns))
            nn.init.xavier_uniform_(self.core)
            nn.init.xavier_uniform_(self.coeff)


class FacTLinear(nn.Module):
    """A timm Linear (``.base``) plus its FacT update ``s · V · dropout(core(U x))`` (``kind``: qkv, proj, fc1, fc2)."""

    def __init__(self, base: nn.Linear, kind: str, shared: FacTShared, block: int, chunks: int, scale: float,
                 dropout: float):
        super().__init__()
        self.base = base
        self.kind = kind
        self._shared = (shared,)  # a reference, not a submodule: U and V are registered once, in the model
        self.block, self.chunks, self.scale = int(block), int(chunks), float(scale)
        self.dropout = nn.Dropout(dropout)
        r, k = shared.rank, self.chunks
        if not shared.tucker:  # tensor-train: this layer's own cores, nn.Linear(in, out) with default init
            shapes = {"qkv": [(r, r)] * 3, "proj": [(r, r)], "fc1": [(r, k * r)], "fc2": [(k * r, r)]}[kind]
            self.cores = nn.ModuleList(nn.Linear(i, o, bias=False) for i, o in shapes)

    @property
    def shared(self) -> FacTShared:
        return self._shared[0]

    def core_weights(self) -> list[torch.Tensor]:
        """The cores as Linear weights (out x in): [q, k, v] for qkv, [o] for proj, [S_1] (k·r x r), [S_2] (r x k·r)."""
        s = self.shared
        if not s.tucker:
            return [c.weight for c in self.cores]
        r, k = s.rank, self.chunks
        first = (4 + 2 * k) * self.block  # this block's columns of P: attention 4, then MLP 2k
        if self.kind in ("qkv", "proj"):
            cores = s.core @ s.coeff[:, first:first + 4]  # (r, r, 4): [a, b, m] = sum_c C[a, b, c] P[c, m]
            slices = (0, 1, 2) if self.kind == "qkv" else (3,)
            return [cores[:, :, m].t() for m in slices]  # official: (U x) @ G_m, i.e. weight G_m^T
        cores = s.core @ s.coeff[:, first + 4:first + 4 + 2 * k]  # (r, r, 2k)
        if self.kind == "fc1":  # official: (U x) @ M with M[a, k·b + m] = cores[a, b, m], m < k
            return [cores[:, :, :k].reshape(r, k * r).t()]
        return [cores[:, :, k:].reshape(r, k * r)]  # official: z @ N^T, N[a, k·b + m] = cores[a, b, k + m]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shared
        u, v, w = s.u, s.v, self.core_weights()
        r, k = s.rank, self.chunks
        lead = x.shape[:-1]
        if self.kind == "qkv":
            ux = u(x)
            delta = torch.cat([v(self.dropout(F.linear(ux, c))) for c in w], dim=-1)
        elif self.kind == "proj":
            delta = v(self.dropout(F.linear(u(x), w[0])))
        elif self.kind == "fc1":
            z = self.dropout(F.linear(u(x), w[0]))  # (…, k·r), chunk-major
            delta = v(z.reshape(*lead, k, r)).reshape(*lead, -1)
        else:
            z = u(x.reshape(*lead, k, -1)).reshape(*lead, k * r)  # U on every input chunk
            delta = v(self.dropout(F.linear(z, w[0])))
        return self.base(x) + delta * self.scale

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The dense update ΔW (out x in) of the base weight, scale included."""
        s = self.shared
        U, V, w = s.u.weight, s.v.weight, self.core_weights()
        r, k = s.rank, self.chunks
        if self.kind == "qkv":
            d = torch.cat([V @ c @ U for c in w], dim=0)
        elif self.kind == "proj":
            d = V @ w[0] @ U
        elif self.kind == "fc1":
            d = torch.cat([V @ w[0][c * r:(c + 1) * r] @ U for c in range(k)], dim=0)
        else:
            d = torch.cat([V @ w[0][:, c * r:(c + 1) * r] @ U for c in range(k)], dim=1)
        return d * self.scale

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
        return self.base


class FacTViT(TunedViT):
    def __init__(self, backbone: nn.Module, num_classes: int, fact: FacTShared):
        super().__init__(backbone, num_classes)
        self.fact = fact

    def merged(self) -> nn.Module:
        backbone = copy.deepcopy(self.backbone)
        replace_wrappers(backbone, FacTLinear, lambda m: m.fold())
        return plain_vit(backbone, self.head)


# FacT/fact_{tt,tk}.py: AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs, 10 warm-up, no lr search (rank and scale
# per task instead); base lr 0.004 = 1e-3 at batch 64. demo lr: the best mean val200 top-1 over the 5 demo tasks
# (results/demo-hparam-search.csv): fact-tt 0.04, fact-tk 0.01 (the fallback rank/scale).
FACT_RECIPE = noah_fixed_recipe(demo_lr=0.04)
FACT_TK_RECIPE = FACT_RECIPE.for_protocol("demo", lr=0.01)


class _FacT(Method):
    tucker: bool = False
    version = 1
    fusable = True  # the shared factors and cores stacked per configuration
    recipe = FACT_RECIPE

    def build(self, backbone, num_classes, opts):
        rank, scale = int(opts["rank"]), float(opts["scale"])
        dim, blocks = backbone.embed_dim, backbone.blocks
        hidden = blocks[0].mlp.fc1.out_features
        if hidden % dim:
            raise ValueError(f"fact: the MLP width {hidden} is not a multiple of the width {dim}")
        chunks = hidden // dim
        shared = FacTShared(dim, rank, (4 + 2 * chunks) * len(blocks), self.tucker)
        wrappers = []
        for i, block in enumerate(blocks):
            for path in TARGETS:
                wrappers.append(wrap_module(block, path, lambda base: FacTLinear(
                    base, path.rpartition(".")[2], shared, i, chunks, scale, float(opts["dropout"]))))
        model = FacTViT(backbone, num_classes, shared)  # freezes the backbone (the TT cores included)
        shared.requires_grad_(True)
        for w in wrappers:
            if not self.tucker:
                w.cores.requires_grad_(True)
            model.train_modules.append(w.dropout)  # dropout in train mode; the wrapped Linear stays in eval
        return model


def _options(rank_help: str, table: dict, folder: str, fallback: tuple[int, float]) -> dict[str, Option]:
    def per_task(column: int) -> PerTask:
        return PerTask(table, fallback[column], column=column,
                       source=f"JieShibo/PETL-ViT@026e4f1 FacT/configs/{folder}/<task>.yaml",
                       fallback_reason="the most frequent official value; task without an official FacT config")

    return {
        "rank": Option("auto", rank_help, type=int, min=1, per_task=per_task(0)),
        "scale": Option("auto", "scale s of the update (auto: the official per-task value)", type=float, min=0.0,
                        per_task=per_task(1)),
        "dropout": Option(0.1, "dropout on the core output (official: 0.1)", min=0.0, max=1.0),
    }


@register_method
class FacTTT(_FacT):
    name = "fact-tt"
    description = "FacT-TT: tensor-train factor tuning of every qkv/proj/fc1/fc2 weight (docs/methods/fact.md)"
    tucker = False
    options = _options("rank r (auto: the official per-task value in {4, 8, 16}, else 16)", FACT_TT_TASKS, "tt",
                       FALLBACK["fact-tt"])


@register_method
class FacTTK(_FacT):
    name = "fact-tk"
    recipe = FACT_TK_RECIPE
    aliases = ("fact",)
    description = "FacT-TK: Tucker factor tuning of every qkv/proj/fc1/fc2 weight (docs/methods/fact.md)"
    tucker = True
    options = _options("rank r (auto: the official per-task value in {16, 32}, else 32)", FACT_TK_TASKS, "tk",
                       FALLBACK["fact-tk"])
