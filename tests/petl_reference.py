"""A timm ViT written out with plain torch ops, with hook points where the PETL methods act
(tests/test_methods_adapter_family.py, tests/test_methods_reparam.py).

``reference_logits(weights, x, hooks, head)`` reads the frozen weights by their plain timm names from
``weights`` (a ``{name: tensor}`` dict, e.g. the named parameters of an untouched copy of the backbone)
and calls ``hooks.get(point, default)`` at each point:

    ("patch",)                       conv output (B, D, h, w)           -> tensor
    ("norm1", i) / ("norm2", i)      LayerNorm output h                 -> tensor
    ("qkv", i) / ("proj", i)         (input, output) of the Linear      -> output
    ("fc1", i) / ("fc2", i)          (input, output) of the Linear      -> output
    ("attn_branch", i)               (stream x, branch input h, branch output f) -> what is added to x
    ("mlp_branch", i)                (stream x1, branch input h2, branch output f2) -> what is added to x1
    ("block", i)                     block output z                     -> tensor
    ("norm",)                        final LayerNorm output             -> tensor
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-6  # timm ViT LayerNorm eps


def _id(*args):
    return args[-1]


def layer_norm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + EPS) * w + b


def linear(x, w, b=None):
    y = x @ w.T
    return y + b if b is not None else y


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def reference_features(p: dict, x: torch.Tensor, hooks: dict | None = None, *, depth: int, heads: int,
                       patch: int) -> torch.Tensor:
    hooks = hooks or {}

    def hook(point, *args):
        return hooks.get(point, _id)(*args)

    t = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=patch)
    t = hook(("patch",), t)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([p["cls_token"].expand(x.shape[0], -1, -1), t], dim=1) + p["pos_embed"]
    b, n, d = t.shape
    hd = d // heads
    for i in range(depth):
        q_ = f"blocks.{i}."
        h = hook(("norm1", i), layer_norm(t, p[q_ + "norm1.weight"], p[q_ + "norm1.bias"]))
        qkv = hook(("qkv", i), h, linear(h, p[q_ + "attn.qkv.weight"], p[q_ + "attn.qkv.bias"]))
        q, k, v = qkv.reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, n, d)
        f = hook(("proj", i), o, linear(o, p[q_ + "attn.proj.weight"], p[q_ + "attn.proj.bias"]))
        t = t + hook(("attn_branch", i), t, h, f)
        h2 = hook(("norm2", i), layer_norm(t, p[q_ + "norm2.weight"], p[q_ + "norm2.bias"]))
        a = hook(("fc1", i), h2, linear(h2, p[q_ + "mlp.fc1.weight"], p[q_ + "mlp.fc1.bias"]))
        g = gelu(a)
        f2 = hook(("fc2", i), g, linear(g, p[q_ + "mlp.fc2.weight"], p[q_ + "mlp.fc2.bias"]))
        t = t + hook(("mlp_branch", i), t, h2, f2)
        t = hook(("block", i), t)
    t = hook(("norm",), layer_norm(t, p["norm.weight"], p["norm.bias"]))
    return t[:, 0]


def tiny_kwargs(vit) -> dict:
    return {"depth": len(vit.blocks), "heads": vit.blocks[0].attn.num_heads, "patch": vit.patch_embed.patch_size[0]}


def weights(module) -> dict:
    return {n: p.detach() for n, p in module.named_parameters()}


def build(name, backbone, task=None, num_classes: int = 5, **opts):
    """Method ``name`` built on ``backbone`` with ``opts`` (strings, as from --set), resolved for ``task``."""
    from peftbench.methods import get_method

    m = get_method(name)
    o, _ = m.resolve_options(m.parse_options({k: str(v) for k, v in opts.items()}), task)
    return m.build(backbone, num_classes, o)


def randomise(model, std=0.2, seed=0):
    """Perturb every trained tensor (zero-initialised ones become non-zero, scales stay near 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def inputs(seed=0):
    return torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def blocks_in_graph(model) -> list[bool]:
    """A training step of ``model`` (float32 inputs, backward of the summed logits): per block of
    ``model.backbone.blocks``, whether its output recorded a graph (``requires_grad``)."""
    seen: list[bool] = []
    hooks = [b.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad)) for b in model.backbone.blocks]
    model.train()
    try:
        model(inputs().float()).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return seen
