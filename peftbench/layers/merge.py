"""Folding a trained update into a plain timm ViT (for ``TunedViT.merged``)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def is_plain_timm(module: nn.Module) -> bool:
    """Whether every sub-module is one of timm's or torch's own classes (no method module injected)."""
    return all(type(m).__module__.split(".")[0] in ("timm", "torch") for m in module.modules())


def wrap_module(root: nn.Module, path: str, make):
    """Replace the module at dotted ``path`` under ``root`` by ``make(module)``, in place; returns the new module (a
    method's wrapper layer injected around a timm layer)."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    new = make(getattr(parent, child))
    setattr(parent, child, new)
    return new


def replace_wrappers(root: nn.Module, kind: type, unwrap) -> None:
    """Replace every ``kind`` module under ``root`` by ``unwrap(module)``, in place (a method's wrapper layers by the
    plain layers their update was folded into)."""
    for name, module in list(root.named_modules()):
        if isinstance(module, kind):
            wrap_module(root, name, unwrap)


def plain_vit(backbone: nn.Module, head: nn.Linear) -> nn.Module:
    """A plain timm classifier: a deep copy of ``backbone`` (a ``num_classes=0`` timm ViT or Swin whose
    modules are the originals, weights already updated by the caller) with ``head`` as its classifier
    (timm's ``get_classifier()``: ViT's ``head``, Swin's ``head.fc``)."""
    model = copy.deepcopy(backbone)
    model.reset_classifier(head.out_features)
    fc = model.get_classifier()
    with torch.no_grad():
        fc.weight.copy_(head.weight)
        fc.bias.copy_(head.bias)
    for p in model.parameters():
        p.requires_grad = False
    return model.eval()


@torch.no_grad()
def scale_shift_linear(layer: nn.Linear, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    """``gamma * (W x + b) + beta`` as one Linear: W' = diag(gamma) W, b' = gamma b + beta (in place)."""
    layer.weight.mul_(gamma[:, None].to(layer.weight.dtype))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(gamma)
    new_bias = gamma * bias + beta
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=False)
    else:
        layer.bias.copy_(new_bias)
