"""SNELL (docs/methods/snell.md, ssfgunner/SNELL@e9d5185): the forward equals a direct float64 computation of the
official maths (two signed distance kernels, the per-matrix quantile competition keeping K·|K|, q/k/v as separate
matrices); the gradient is the official stop-gradient one; s = 0 is the dense KLoRA; counts, inits, what trains,
the merge."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from petl_reference import build, inputs, linear, randomise, reference_features, tiny_kwargs, weights

from peftbench.cli.params import count
from peftbench.tasks import get_task


def exact_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1).sqrt()


def kernel_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """K[i, j] = 0.1·d(a0_i, b0_j) − 0.1·d(a1_i, b1_j) with d torch.cdist's, the official call (its matrix-product path
    for more than 25 rows; test_cdist_is_the_euclidean_distance checks it against the exact distances)."""
    return 0.1 * torch.cdist(a[0], b[0]) - 0.1 * torch.cdist(a[1], b[1])


def test_cdist_is_the_euclidean_distance():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, 16, dtype=torch.float64, generator=g) * 0.3 for n in (40, 60))
    assert torch.allclose(torch.cdist(a, b), exact_distances(a, b), rtol=0, atol=1e-12)


def update_reference(delta, s: float) -> torch.Tensor:
    k = kernel_reference(delta.a.detach(), delta.b.detach())
    if s == 0:
        return k
    tau = float(np.quantile(k.abs().numpy(), s))  # numpy's linear interpolation, as torch.quantile
    return torch.where(k.abs() > tau, k * k.abs(), torch.zeros_like(k))


def layer_hook(layer, s):
    def hook(x, y):
        return y + x @ torch.cat([update_reference(d, s) for d in layer.deltas], dim=1)
    return hook


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9])
def test_forward_equals_the_official_maths(tiny_backbone, sparsity):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    model = build("snell", tiny_backbone, rank=4, sparsity=sparsity).double()
    randomise(model, std=0.5)  # factors far from their init: kernels of size ~0.1
    model.eval()
    hooks = {}
    for i, blk in enumerate(model.backbone.blocks):
        hooks[("qkv", i)] = layer_hook(blk.attn.qkv, sparsity)
        hooks[("proj", i)] = layer_hook(blk.attn.proj, sparsity)
        hooks[("fc1", i)] = layer_hook(blk.mlp.fc1, sparsity)
        hooks[("fc2", i)] = layer_hook(blk.mlp.fc2, sparsity)
    w = weights(ref)
    w["cls_token"] = model.backbone.cls_token.detach()  # trained by SNELL
    x = inputs()
    expect = linear(reference_features(w, x, hooks, **tiny_kwargs(ref)), model.head.weight, model.head.bias)
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got, expect, rtol=0, atol=1e-12), (got - expect).abs().max()
    qkv = model.backbone.blocks[0].attn.qkv
    assert len(qkv.deltas) == 3 and qkv.deltas[0].a.shape == (2, 48, 2)  # q, k, v: own factors (and quantiles)
    if sparsity:
        s0 = qkv.deltas[0].update()
        kept = (s0 != 0).double().mean().item()
        assert abs(kept - (1 - sparsity)) < 0.05  # about (1 − s) of every matrix survives


def test_the_gradient_is_the_official_stop_gradient_one(tiny_backbone):
    model = build("snell", tiny_backbone, rank=4, sparsity=0.5).double()
    d = model.backbone.blocks[0].mlp.fc1.deltas[0]
    g = torch.randn(d.a.shape[1], d.b.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k = d.kernel()
    mag = k.detach().abs()
    mask = mag > torch.quantile(mag.flatten(), 0.5)
    got = torch.autograd.grad((d.update() * g).sum(), (d.a, d.b))
    want = torch.autograd.grad((k * (mag * mask * g)).sum(), (d.a, d.b))  # ∂L/∂K = |K|·M·g: half of d(K|K|)/dK
    assert all(torch.allclose(x, y, rtol=1e-12, atol=0) for x, y in zip(got, want))
    kept = d.update().detach()[mask]
    assert torch.allclose(kept, (k * k.abs()).detach()[mask])  # a kept entry's value is K·|K|


def test_inits_what_trains_and_no_decay_on_the_cls_token(tiny_backbone):
    torch.manual_seed(0)
    model = build("snell", tiny_backbone, rank=4, sparsity=0.9)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone.cls_token" in trained and {"head.weight", "head.bias"} <= trained
    others = trained - {"backbone.cls_token", "head.weight", "head.bias"}
    assert others and all(n.endswith((".a", ".b")) for n in others)
    d = model.backbone.blocks[0].mlp.fc1.deltas[0]  # 48 -> 192: a (2, 48, 2), b (2, 192, 2)
    assert d.a.abs().max() <= 1 / math.sqrt(48 * 2) and d.b.abs().max() <= 1 / math.sqrt(192 * 2)
    assert d.kernel().abs().max() > 0  # not zero at the start (unlike LoRA)
    assert model.no_weight_decay() == {"head.bias", "backbone.cls_token"}
    from peftbench.train.optim import build_optimizer

    opt = build_optimizer("adamw", model, 1e-3, 0.01)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.backbone.cls_token) not in decayed and id(d.a) in decayed


def test_counts_equal_the_formula_and_the_official_print():
    for r in (8, 32):
        out = count("snell", 100, sets=[f"rank={r}"])
        assert out["trainable_without_head"] == 165_888 * r + 768  # + the CLS token
    assert count("snell", 100)["trainable_without_head"] == 5_309_184  # train.py's "parameters:" at r = 32


def test_per_task_sparsity_and_the_dense_fallback():
    from peftbench.methods import get_method

    m = get_method("snell")
    # ssfgunner/SNELL@e9d5185 scripts/vtab/snell32/{vit_dtd,vit_svhn,vit_clevr_dist}_snell.sh:11
    for task, s in {"dtd": 0.995, "svhn": 0.0, "clevr_distance": 0.74}.items():
        opts, sources = m.resolve_options(m.parse_options({}), get_task(task))
        assert opts["sparsity"] == s and "snell32" in sources["sparsity"]
    opts, _ = m.resolve_options(m.parse_options({}), get_task("cub200"))
    assert opts["sparsity"] == 0.0


@pytest.mark.parametrize("sparsity", [0.0, 0.8])
def test_the_merge_equals_the_unmerged_model(tiny_backbone, sparsity):
    from peftbench.layers.merge import is_plain_timm

    model = build("snell", tiny_backbone, rank=4, sparsity=sparsity).double()
    randomise(model, std=0.5)
    model.eval()
    merged = model.merged().double().eval()
    assert is_plain_timm(merged)
    x = inputs(2)
    with torch.no_grad():
        assert torch.allclose(merged(x), model(x), rtol=0, atol=1e-11)
