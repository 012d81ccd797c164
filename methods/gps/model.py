"""The GPS model: a timm ViT whose weight matrices are tuned at K selected entries per output neuron, every
Linear/patch-embedding bias in full, a new head (docs/methods/gps.md §1-§3).

The official code trains the whole dense model and zeroes the gradients of unselected entries after every
backward (Adam, weight decay 0, so they never move). peftbench trains only the selected entries:
``W = W0 + scatter(δ)`` (:class:`peftbench.layers.sparse_delta.SparseDelta`), δ of shape (rows·K,), the
same trajectory entry by entry (Adam is element-wise). The selection (which K columns of every row) is a
buffer filled from the gradient stage's artifact (``extras["init_state"]``); built without one (e.g.
``peftbench params``), the model has the right shapes with placeholder entries.
"""
from __future__ import annotations

import torch
from torch import nn

from peftbench.layers.merge import plain_vit
from peftbench.layers.sparse_delta import SparseDelta, add_sparse_delta, merged_copy
from peftbench.layers.timm_parts import add_drop_path, timm_head
from peftbench.layers.tuned_vit import TunedViT

FROZEN_NAMES = ("norm", "pos_embed", "cls_token", "reg_token")  # LayerNorms, embeddings: frozen
FULL_NAMES = ("bias", "gamma")  # biases (and LayerScale): tuned in full


def parameter_role(name: str, tensor: torch.Tensor) -> str:
    """The official selection rule by parameter name: ``frozen`` | ``full`` | ``select`` (matrices)."""
    if any(s in name for s in FROZEN_NAMES):
        return "frozen"
    if any(s in name for s in FULL_NAMES):
        return "full"
    return "select" if tensor.dim() >= 2 else "frozen"


def selected_tensors(backbone: nn.Module) -> list[tuple[str, nn.Module, str, int, int]]:
    """(parameter name, module, tensor name, rows, columns) of every weight GPS selects entries of; a
    Conv2d weight (out, C, kh, kw) counts as its (out, C·kh·kw) matrix view."""
    modules = dict(backbone.named_modules())
    out = []
    for name, p in backbone.named_parameters():
        if parameter_role(name, p) == "select":
            mname, tname = name.rsplit(".", 1)
            out.append((name, modules[mname], tname, p.shape[0], p.numel() // p.shape[0]))
    return out


class GpsModel(TunedViT):
    """Frozen timm ViT + sparse deltas at K entries per row of every weight matrix + all biases + head."""

    def __init__(self, backbone: nn.Module, num_classes: int, K: int, drop_path: float = 0.0):
        super().__init__(backbone, num_classes, head=timm_head(backbone.num_features, num_classes))
        self.K = int(K)
        self.deltas: dict[str, SparseDelta] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        for name, module, tname, rows, cols in selected_tensors(backbone):
            if self.K > cols:
                raise ValueError(f"K={self.K} is more than the {cols} columns of {name}")
            self.deltas[name] = add_sparse_delta(module, tname, rows * self.K)
            self.shapes[name] = (rows, cols)
            self.deltas[name].index.copy_((torch.arange(rows)[:, None] * cols + torch.arange(self.K)).reshape(-1))
        for name, p in backbone.named_parameters():
            if parameter_role(name, p) == "full":
                p.requires_grad = True
        self.drop_paths = add_drop_path(backbone, float(drop_path))
        self.train_modules.extend(self.drop_paths)

    def index_buffer_names(self) -> dict[str, str]:
        """parameter name (backbone's) → the model's buffer holding its selected entries (the selection
        artifact's keys, loaded with ``init_state``)."""
        out = {}
        for pname in self.deltas:
            mname, tname = pname.rsplit(".", 1)
            out[pname] = f"backbone.{mname}.parametrizations.{tname}.0.index"
        return out

    def merged(self) -> nn.Module:
        """A plain timm ViT: W0 + δ folded into every selected weight, the tuned biases and head copied."""
        return plain_vit(merged_copy(self.backbone), self.head)

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        counts["selected_weight_entries"] = sum(d.delta.numel() for d in self.deltas.values())
        # a delta updates an existing entry in place: counted once in the total (as BitFit's biases)
        counts["total"] -= counts["selected_weight_entries"]
        counts["tuned_biases"] = sum(p.numel() for n, p in self.backbone.named_parameters()
                                     if p.requires_grad and parameter_role(n, p) == "full")
        # the official code computes dense gradients of every selected matrix and zeroes the unselected entries
        counts["official_dense_gradient"] = (sum(r * c for r, c in self.shapes.values()) + counts["tuned_biases"]
                                             + counts["head"])
        return counts


def top_k_per_row(grad: torch.Tensor, K: int) -> torch.Tensor:
    """(rows, K) column indices, ascending, of the K largest |grad| entries of every row of the matrix view."""
    g = grad.reshape(grad.shape[0], -1).abs()
    return torch.topk(g, K, dim=1).indices.sort(dim=1).values


def flat_index(columns: torch.Tensor, cols: int) -> torch.Tensor:
    """(rows, K) column indices → flat row-major indices r·cols + c, shape (rows·K,)."""
    rows = torch.arange(columns.shape[0], device=columns.device)[:, None]
    return (rows * cols + columns).reshape(-1)
