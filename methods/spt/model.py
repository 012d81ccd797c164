"""The SPT model (docs/methods/spt.md §3): a frozen timm ViT with, from a selection,

* **structured** tuning of the chosen weight matrices: LoRA in parallel (``spt-lora``) or a bottleneck adapter
  (``spt-adapter``), each with dropout on its input and stochastic depth on its output (train mode);
* **fully tuned vectors** (LayerNorm weights/biases, Linear biases);
* **unstructured** tuning of the remaining sensitive entries of Linear weights and biases: W0 + scatter(δ)
  (:class:`peftbench.layers.sparse_delta.SparseDelta`); sensitive LayerNorm entries are counted, not tuned
  (as the official code);
* the cls token and a new head.

A selection is a dict ``{"structured": ["blocks.i.attn.v", ...], "vectors": [SPT tensor names],
"unstructured": {SPT tensor name: count}}``; the entries themselves are buffers filled from the
sensitivity stage's artifact (``extras["init_state"]``), placeholders until then.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.layers.merge import plain_vit
from peftbench.layers.sparse_delta import SparseDelta, add_sparse_delta, merged_copy
from peftbench.layers.timm_parts import add_drop_path, timm_head
from peftbench.layers.tuned_vit import TunedViT

from .sensitivity import QKV, SptTensor, spt_tensors, structured_cost

STRUCTURED_INITS = ("official", "zero")


class Branch(nn.Module):
    """One structured module: LoRA (x A^T B^T, no bias, no scaling) or adapter (Up(GELU(Down x)), biases), then
    stochastic depth. ``init``: ``official`` — every Linear trunc_normal(0.02), biases 0 (the official model
    re-initialises them with timm's ``_init_vit_weights`` after building); ``zero`` — LoRA A kaiming-uniform,
    B = 0, adapter Down kaiming-uniform, Up = 0 (the modules' own init, a no-op start)."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, rank: int, drop_path: float, init: str = "official"):
        super().__init__()
        self.kind = kind
        bias = kind == "adapter"
        self.down = nn.Linear(in_dim, rank, bias=bias)
        self.up = nn.Linear(rank, out_dim, bias=bias)
        for lin in (self.down, self.up):
            if init == "official":
                nn.init.trunc_normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if init == "zero":
            nn.init.zeros_(self.up.weight)
        elif init != "official":
            raise ValueError(f"unknown structured init {init!r} (known: {', '.join(STRUCTURED_INITS)})")
        from timm.layers import DropPath

        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        h = self.down(x)
        if self.kind == "adapter":
            h = F.gelu(h)
        return self.drop_path(self.up(h))

    def delta_weight(self) -> torch.Tensor:
        """LoRA's update as a matrix: B A (out, in)."""
        return self.up.weight @ self.down.weight


class SptLinear(nn.Module):
    """A frozen Linear (``base``, possibly with sparse deltas) with structured branches on row slices of its output.

    Each branch reads the Linear's input (``source="input"``: LoRA; SPT-Adapter's proj) or its output slice
    (``source="output"``: SPT-Adapter on q/k/v/fc1/fc2), through dropout when ``dropout``; input branches with
    dropout share one mask (official: ``x_drop`` once for q, k and v)."""

    def __init__(self, base: nn.Linear, branches: dict[str, tuple[slice, str, bool, Branch]], p: float = 0.1):
        super().__init__()
        self.base = base
        self.branches = nn.ModuleDict({k: b for k, (_, _, _, b) in branches.items()})
        self.routes = {k: (sl, src, drop) for k, (sl, src, drop, _) in branches.items()}
        self.dropout = nn.Dropout(p)

    def forward(self, x):
        y = self.base(x)
        x_drop = None
        deltas = []
        for k, branch in self.branches.items():
            sl, src, drop = self.routes[k]
            if src == "input":
                if drop and x_drop is None:
                    x_drop = self.dropout(x)
                inp = x_drop if drop else x
            else:
                inp = y[..., sl]
                inp = self.dropout(inp) if drop else inp
            deltas.append((sl, branch(inp)))
        for sl, d in deltas:
            pad = (sl.start, y.shape[-1] - sl.stop)
            y = y + (F.pad(d, pad) if pad != (0, 0) else d)
        return y


def delta_layout(tensors: dict[str, SptTensor], selection: dict, params: dict[str, torch.Tensor]
                 ) -> dict[str, list[tuple[SptTensor, int, bool]]]:
    """timm parameter → the SPT tensors tuned through its sparse delta, in SPT order: (tensor, entries, full).
    A fully tuned vector that is a slice of a timm tensor (a q/k/v bias) is a full-range delta; unstructured
    entries of Linear tensors are deltas; LayerNorm entries are not tuned (official)."""
    parts: dict[str, list[tuple[SptTensor, int, bool]]] = {}
    vectors = set(selection["vectors"])
    for t in tensors.values():
        if t.name in vectors:
            if not (t.offset == 0 and t.numel == params[t.param].numel()):
                parts.setdefault(t.param, []).append((t, t.numel, True))
        elif t.name in selection["unstructured"] and t.linear:
            parts.setdefault(t.param, []).append((t, int(selection["unstructured"][t.name]), False))
    return parts


def structured_linear(op: str) -> str:
    """The timm Linear a structured op acts on (q, k and v: the fused ``attn.qkv``)."""
    block, name = op.split(".", 2)[1], op.split(".", 2)[2]
    return f"blocks.{block}.attn.qkv" if name in QKV else op


def index_buffer_key(pname: str, selection: dict) -> str:
    """The state-dict key of the entry indices of timm parameter ``pname``'s sparse delta in the
    :class:`SptModel` built from ``selection``: a Linear that also gets structured modules is wrapped
    (:class:`SptLinear`), so its parametrization lives under ``.base``. The sensitivity stage names its
    artifact's tensors with this, before any such model exists."""
    mname, tname = pname.rsplit(".", 1)
    if mname in {structured_linear(op) for op in selection["structured"]}:
        mname += ".base"
    return f"backbone.{mname}.parametrizations.{tname}.0.index"


def _routes(kind: str, op: str) -> tuple[str, bool]:
    """(source, dropout) of the structured module on ``op`` (docs/methods/spt.md §3)."""
    if kind == "lora":
        return "input", op != "attn.proj"
    return ("input", False) if op == "attn.proj" else ("output", True)


class SptModel(TunedViT):
    """Frozen timm ViT + SPT's structured modules, fully tuned vectors, sparse deltas, cls token and head."""

    def __init__(self, backbone: nn.Module, num_classes: int, kind: str, selection: dict | None, rank: int = 8,
                 drop_path: float = 0.1, structured_dropout: float = 0.1, structured_drop_path: float = 0.1,
                 init: str = "official"):
        super().__init__(backbone, num_classes, head=timm_head(backbone.num_features, num_classes))
        selection = selection or {"structured": [], "vectors": [], "unstructured": {}}
        self.kind, self.rank = kind, int(rank)
        self.selection = selection
        self.tensors = {t.name: t for t in spt_tensors(backbone)}
        unknown = [n for n in [*selection["vectors"], *selection["unstructured"]] if n not in self.tensors]
        unknown += [op for op in selection["structured"] if f"{op}.weight" not in self.tensors]
        if unknown:
            raise ValueError(f"the selection names tensors this backbone does not have: {unknown[:5]} (the released "
                             f"selections are ViT-B/16's: --set selection=none on another backbone)")
        backbone.cls_token.requires_grad = True
        params = dict(backbone.named_parameters())
        modules = dict(backbone.named_modules())
        vectors = set(selection["vectors"])
        for t in self.tensors.values():
            if t.name in vectors and t.offset == 0 and t.numel == params[t.param].numel():
                params[t.param].requires_grad = True
        parts = delta_layout(self.tensors, selection, params)
        self.deltas: dict[str, SparseDelta] = {}
        self.delta_parts = {p: [(t.name, n, full) for t, n, full in v] for p, v in parts.items()}
        for pname, plist in parts.items():
            mname, tname = pname.rsplit(".", 1)
            total = sum(n for _, n, _ in plist)
            d = add_sparse_delta(modules[mname], tname, total)
            d.index.copy_(torch.cat([t.offset + torch.arange(n) for t, n, _ in plist]))  # placeholders / full ranges
            self.deltas[pname] = d
        # structured modules, grouped by the timm Linear they act on
        groups: dict[str, dict[str, tuple]] = {}
        for op in selection["structured"]:
            t = self.tensors[f"{op}.weight"]
            name = op.split(".", 2)[2]
            linear = structured_linear(op)
            out_dim, in_dim = t.shape
            src, drop = _routes(kind, name)
            width = (in_dim, out_dim) if src == "input" else (out_dim, out_dim)
            start = t.offset // in_dim if name in QKV else 0
            branch = Branch(kind, width[0], width[1], self.rank, structured_drop_path, init)
            groups.setdefault(linear, {})[name.split(".")[1]] = (slice(start, start + out_dim), src, drop, branch)
        self.structured_modules: list[SptLinear] = []
        for linear, branches in groups.items():
            parent, attr = linear.rsplit(".", 1)
            wrapped = SptLinear(modules[linear], branches, structured_dropout)
            setattr(modules[parent], attr, wrapped)
            self.structured_modules.append(wrapped)
            self.train_modules.append(wrapped)  # its dropout and the branches' stochastic depth
        self.train_modules.extend(add_drop_path(backbone, float(drop_path)))

    def index_buffer_names(self) -> dict[str, str]:
        """timm parameter → the state-dict key of its delta's entry indices (where the module really is)."""
        where = {id(m.index): name for name, m in self.named_modules() if isinstance(m, SparseDelta)}
        return {pname: f"{where[id(d.index)]}.index" for pname, d in self.deltas.items()}

    # -- counts ------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        sel = self.selection
        structured = sum(structured_cost(self.kind, self.tensors[f"{op}.weight"].shape, self.rank)
                         for op in sel["structured"])
        vectors = sum(self.tensors[n].numel for n in sel["vectors"])
        unstructured = sum(int(c) for c in sel["unstructured"].values())
        norm_entries = sum(int(c) for n, c in sel["unstructured"].items() if not self.tensors[n].linear)
        cls = self.backbone.cls_token.numel()
        counts["selected_weight_entries"] = sum(d.delta.numel() for d in self.deltas.values())
        counts["total"] -= counts["selected_weight_entries"]  # in-place updates: counted once
        counts["structured_matrices"] = len(sel["structured"])
        counts["structured_params"] = structured
        counts["unstructured_entries"] = unstructured
        counts["untrained_norm_entries"] = norm_entries
        # SPT's budget: unstructured (LayerNorm entries included) + structured + vectors + cls token; + the head
        counts["tuned"] = unstructured + structured + vectors + cls + counts["head"]
        counts["spt_budget"] = counts["tuned"] - counts["head"]
        return counts

    # -- merging -----------------------------------------------------------------------------
    def merged(self) -> nn.Module | None:
        """SPT-LoRA: a plain timm ViT with W0 + S + B A in every weight (eval mode: dropout and stochastic depth
        are identities); SPT-Adapter's GELU bottlenecks do not fold (None)."""
        if self.kind != "lora":
            return None
        backbone = merged_copy(self.backbone)
        with torch.no_grad():
            for parent in list(backbone.modules()):
                for attr, child in list(parent.named_children()):
                    if isinstance(child, SptLinear):
                        base = child.base
                        for k, branch in child.branches.items():
                            sl = child.routes[k][0]
                            base.weight[sl] += branch.delta_weight()
                        setattr(parent, attr, base)
        return plain_vit(backbone, self.head)
