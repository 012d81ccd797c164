"""Sparse updates of frozen weights: ``W = W0 + scatter(δ)`` at fixed entries (GPS, SPT's unstructured tuning).

:class:`SparseDelta` is a ``torch.nn.utils.parametrize`` parametrization: the module keeps its class and
its frozen tensor (``parametrizations.<name>.original``), and reading ``module.<name>`` gives
W0 + δ scattered at the flat indices ``index``. Only δ (one value per selected entry) is trained, so
its gradient and optimiser state are as small as the selection; the gradient of δ_i is the gradient
of W at entry ``index[i]``. The flat index runs over the tensor in row-major order, so for a Conv2d
weight (out, C, kh, kw) it is the column of the (out, C·kh·kw) matrix view.

:func:`merged_copy` is a copy with every parametrization folded into plain tensors (the merged model).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize


class SparseDelta(nn.Module):
    """δ (n,) added at flat entries ``index`` (n,) of the parametrized tensor (numel entries)."""

    def __init__(self, numel: int, count: int, device=None, dtype=None):
        super().__init__()
        self.numel = int(numel)
        # placeholder entries 0..n-1 until the selection is loaded (e.g. from a run's artifact)
        self.register_buffer("index", torch.arange(int(count), device=device, dtype=torch.long))
        self.delta = nn.Parameter(torch.zeros(int(count), device=device, dtype=dtype))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if self.delta.numel() == 0:
            return original
        flat = original.reshape(-1).index_add(0, self.index, self.delta.to(original.dtype))
        return flat.view_as(original)


def add_sparse_delta(module: nn.Module, name: str, count: int) -> SparseDelta:
    """Parametrize ``module.<name>`` as W0 + δ at ``count`` entries; the delta is trainable, W0 frozen."""
    tensor = getattr(module, name)
    delta = SparseDelta(tensor.numel(), count, device=tensor.device, dtype=tensor.dtype)
    parametrize.register_parametrization(module, name, delta)
    getattr(module.parametrizations, name).original.requires_grad = False
    return delta


@torch.no_grad()
def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every parametrized tensor replaced by its current value (W0 + δ), frozen:
    plain modules of their original classes again. (Not ``parametrize.remove_parametrizations`` on a copy: a
    deep copy shares the parametrized module's generated class with the original, and removing the
    parametrization from it would break the original.)"""
    new = copy.deepcopy(model)
    for m in list(new.modules()):
        if parametrize.is_parametrized(m):
            values = {name: getattr(m, name).detach().clone() for name in m.parametrizations.keys()}
            m.__class__ = m.__class__.__bases__[0]  # the class before register_parametrization
            del m._modules["parametrizations"]
            for name, value in values.items():
                m._parameters[name] = nn.Parameter(value, requires_grad=False)
    return new
