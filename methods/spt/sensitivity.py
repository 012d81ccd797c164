"""SPT's sensitivity and budget allocation as pure functions (docs/methods/spt.md §2).

SPT works on a ViT with separate q, k, v projections. On timm's fused ``attn.qkv`` (rows q | k | v) its
tensors are row blocks: ``blocks.i.attn.q.weight`` is rows 0..D−1 of ``blocks.i.attn.qkv.weight``, ``k``
rows D..2D−1, ``v`` rows 2D..3D−1 (flat offsets s·D·D), the same for the biases. :func:`spt_tensors`
lists SPT's candidate tensors in its model's parameter order with where each lives in timm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

OPS = ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2")  # tuned_matrices columns
QKV = {"attn.q": 0, "attn.k": 1, "attn.v": 2}
TARGET_BUDGETS = (1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05)  # M parameters (ViT-B/16), as the official sweep saves
SWEEP = range(1, 80)  # p_j = 0.02·j M


@dataclass(frozen=True)
class SptTensor:
    """One of SPT's candidate tensors: its name in SPT's model, the timm parameter it is part of, the flat offset
    there, its shape and kind (``matrix``: a Linear weight; ``vector``: a bias or LayerNorm tensor)."""

    name: str
    param: str
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def kind(self) -> str:
        # official keyword lists: vectors 'norm', 'bias' (checked first), matrices '.q.', '.k.', '.v.', 'proj', 'fc'
        return "vector" if ("norm" in self.name or "bias" in self.name) else "matrix"

    @property
    def linear(self) -> bool:
        """Part of a Linear (its entries can be tuned); LayerNorm entries are counted but not tuned (official)."""
        return "norm" not in self.name

    @property
    def op(self) -> str:
        """``blocks.i.<op>`` of a matrix, e.g. ``blocks.3.attn.v``."""
        return self.name.rsplit(".", 1)[0]


def spt_tensors(backbone: nn.Module) -> list[SptTensor]:
    """SPT's candidates (everything but head, cls_token, patch_embed, pos_embed) of a timm ViT, in the order of
    SPT's own model (per block: norm1, q, k, v, proj, norm2, fc1, fc2; then the final norm)."""
    params = dict(backbone.named_parameters())
    out = []
    for i, block in enumerate(backbone.blocks):
        b = f"blocks.{i}"
        D = block.attn.qkv.in_features

        def plain(name):
            if name in params:
                out.append(SptTensor(name, name, 0, tuple(params[name].shape)))

        plain(f"{b}.norm1.weight")
        plain(f"{b}.norm1.bias")
        for op, s in QKV.items():
            out.append(SptTensor(f"{b}.{op}.weight", f"{b}.attn.qkv.weight", s * D * D, (D, D)))
            if f"{b}.attn.qkv.bias" in params:
                out.append(SptTensor(f"{b}.{op}.bias", f"{b}.attn.qkv.bias", s * D, (D,)))
        for name in ("attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
                     "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"):
            plain(f"{b}.{name}")
    for name in ("norm.weight", "norm.bias"):
        if name in params:
            out.append(SptTensor(name, name, 0, tuple(params[name].shape)))
    return out


def structured_cost(kind: str, shape: tuple[int, int], rank: int) -> int:
    """Parameters of the structured module on an (out, in) matrix: LoRA r·(in + out); adapter (on the output,
    width out, biases) 2·r·out + r + out (official ``get_structured_param_num``)."""
    out_dim, in_dim = shape
    if kind == "lora":
        return rank * in_dim + rank * out_dim
    if kind == "adapter":
        return 2 * rank * out_dim + rank + out_dim
    raise ValueError(f"unknown structured type {kind!r}")


def sweep_taus(scale: float = 1.0) -> list[int]:
    """τ_j = ⌈p_j · 10^6 · scale⌉ with p_j = j · 0.02 in floating point (as the official ``math.ceil(param_num * 1e6)``,
    which gives 700001 for j = 35 etc.); ``scale`` < 1 for backbones smaller than ViT-B/16."""
    return [math.ceil(j * 0.02 * 1e6 * scale) for j in SWEEP]


@dataclass
class Allocation:
    budget: float  # (unstructured + structured + cls) / 1e6 / scale
    structured: list[str]  # ops (blocks.i.<op>)
    vectors: list[str]  # SPT tensor names tuned in full
    unstructured: dict[str, int]  # SPT tensor name -> number of its sensitive entries tuned (norm entries included)
    tau: int
    unstructured_params: int
    structured_params: int


def allocate(tensors: list[SptTensor], counts: list[int], tau: int, kind: str, rank: int, alpha: float, beta: float,
             cls_params: int, scale: float = 1.0) -> Allocation:
    """The official per-tensor decision for one τ, given each tensor's number of top-τ entries ``counts``:
    a vector with ≥ len/β sensitive entries is tuned in full, a matrix with ≥ cost/α becomes structured, every
    other tensor tunes its sensitive entries (unstructured)."""
    structured, vectors, unstructured = [], [], {}
    u_params = s_params = 0
    for t, n in zip(tensors, counts):
        if t.kind == "vector":
            if len(t.shape) == 1 and n >= t.shape[0] / beta:
                vectors.append(t.name)
                s_params += t.shape[0]
                continue
        else:
            cost = structured_cost(kind, t.shape, rank)
            if n >= cost / alpha:
                structured.append(t.op)
                s_params += cost
                continue
        if n:
            unstructured[t.name] = int(n)
        u_params += int(n)
    budget = (u_params + s_params + cls_params) / 1e6 / scale
    return Allocation(budget, structured, vectors, unstructured, tau, u_params, s_params)


def sweep(scores: list[torch.Tensor], tensors: list[SptTensor], kind: str, rank: int = 8, alpha: float = 10.0,
          beta: float = 5.0, cls_params: int = 768, scale: float = 1.0,
          targets: tuple[float, ...] = TARGET_BUDGETS) -> tuple[dict[float, Allocation], torch.Tensor, torch.Tensor]:
    """For every target budget the allocation of the sweep closest to it (ties → the later τ; a target no budget
    comes within k of is left out, as the official sweep saves no file for it), and the global
    ranking it comes from: (allocations, the top-τ_max entries as tensor ids, their flat positions in the tensor).

    ``scores[i]`` are the sensitivities of ``tensors[i]`` (any shape, ``numel`` entries)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    sizes = torch.tensor([t.numel for t in tensors])
    offsets = torch.cumsum(sizes, 0) - sizes
    taus = [min(t, flat.numel()) for t in sweep_taus(scale)]
    top = torch.topk(flat, max(taus)).indices  # descending: the top-τ set of every τ is a prefix
    tensor_id = torch.bucketize(top, torch.cumsum(sizes, 0), right=True)
    position = top - offsets[tensor_id]
    best: dict[float, Allocation] = {}
    for tau in taus:
        counts = torch.bincount(tensor_id[:tau], minlength=len(tensors)).tolist()
        a = allocate(tensors, counts, tau, kind, rank, alpha, beta, cls_params, scale)
        for k in targets:
            # official: the saved value starts at 0, so a target is only met by a budget within k of it
            if abs(a.budget - k) <= abs((best[k].budget if k in best else 0.0) - k):
                best[k] = a
    return best, tensor_id, position


def unstructured_indices(allocation: Allocation, tensors: list[SptTensor], tensor_id: torch.Tensor,
                         position: torch.Tensor) -> dict[str, torch.Tensor]:
    """SPT tensor name → ascending flat indices (within the tensor) of its unstructured entries."""
    ids = {t.name: i for i, t in enumerate(tensors)}
    tid, pos = tensor_id[:allocation.tau], position[:allocation.tau]
    return {name: pos[tid == ids[name]].sort().values for name in allocation.unstructured}
