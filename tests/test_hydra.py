"""Hydra (docs/methods/hydra.md, extremebird/Hydra@4138457 vtab1k/hydra.py): the forward equals a direct reference
computation of the official maths in float64, exactly the branches and the head train, the official inits and
per-task values, the count equals the formula and the official print, and the merge (written from the maths: the
official one crashes) equals the unmerged model."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from petl_reference import build, inputs, linear, randomise, reference_features, tiny_kwargs, weights

from peftbench.cli.params import count
from peftbench.layers.merge import is_plain_timm
from peftbench.tasks import get_task


def branch_reference(br, s):
    """s·(U (D z + d) + u), read from the branch's tensors (eval: no dropout)."""
    return lambda z: s * linear(linear(z, br.down.weight, br.down.bias), br.up.weight, br.up.bias)


def hydra_hook(layer, s):
    par, seq = branch_reference(layer.parallel, s), branch_reference(layer.sequential, s)
    return lambda h, y: y + par(h) + seq(y)  # the layer's output: W0 h + b0 + L_par(h) + L_seq(W0 h + b0)


@pytest.mark.parametrize("rank,scale", [(2, 0.7), (3, 4.5)])
def test_forward_equals_the_official_maths(tiny_backbone, rank, scale):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    model = build("hydra", tiny_backbone, rank=rank, scale=scale, dropout=0.2).double()
    randomise(model)
    model.eval()
    hooks = {}
    for i, blk in enumerate(model.backbone.blocks):
        hooks[("proj", i)] = hydra_hook(blk.attn.proj, scale)
        hooks[("fc2", i)] = hydra_hook(blk.mlp.fc2, scale)
    x = inputs()
    expect = linear(reference_features(weights(ref), x, hooks, **tiny_kwargs(ref)), model.head.weight, model.head.bias)
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got, expect, rtol=0, atol=1e-12), (got - expect).abs().max()
    assert not torch.allclose(got, linear(ref.forward_head(ref.forward_features(x), pre_logits=True),
                                          model.head.weight, model.head.bias))  # the branches did something


def test_inits_and_what_trains(tiny_backbone):
    torch.manual_seed(0)
    model = build("hydra", tiny_backbone, rank=2, scale=0.1, dropout=0.2)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    branches = {n for n in trained if ".parallel." in n or ".sequential." in n}
    assert trained - branches == {"head.weight", "head.bias"}
    depth = len(model.backbone.blocks)
    assert len(branches) == depth * 2 * 2 * 4  # 2 layers x 2 branches x (D, d, U, u)
    layer = model.backbone.blocks[0].mlp.fc2
    d_in, width = layer.base.in_features, layer.base.out_features
    bound = math.sqrt(6 / (d_in + 2))  # xavier-uniform, gain 1
    assert layer.parallel.down.weight.abs().max() <= bound and layer.parallel.down.weight.abs().max() > bound / 2
    for br in (layer.parallel, layer.sequential):
        assert not br.down.bias.any() and not br.up.weight.any() and not br.up.bias.any()
        assert br.dropout.p == 0.2 and br.scale == 0.1
    assert layer.sequential.down.in_features == width and layer.parallel.down.in_features == d_in
    x = inputs().float()
    with torch.no_grad():  # zero up-projections: the model starts as the backbone
        assert torch.equal(model.eval()(x), model.head(tiny_backbone.forward_head(
            tiny_backbone.forward_features(x), pre_logits=True)))
    model.train()
    assert not model.backbone.training and layer.parallel.training and layer.parallel.dropout.training


def test_counts_equal_the_formula_and_the_official_print():
    for r in (1, 2, 8):
        out = count("hydra", 100, sets=[f"rank={r}"])
        assert out["trainable_without_head"] == 12 * (11 * 768 * r + 4 * r + 4 * 768) == 101_424 * r + 36_864
    # vtab1k/train.py:111 prints the trainable count with the CIFAR-100 head: 316.61K at r = 2
    assert count("hydra", 100)["trainable"] == 316_612


def test_per_task_values_are_the_official_configs():
    from peftbench.methods import get_method

    m = get_method("hydra")
    # extremebird/Hydra@4138457 vtab1k/configs/hydra_both/{cifar,svhn,smallnorb_azi}.yaml:5-6 (scale, dropout)
    for task, (s, p) in {"cifar100": (0.1, 0.2), "svhn": (3.0, 0.0), "smallnorb_azimuth": (3.0, 0.2),
                         "caltech101": (4.0, 0.1)}.items():
        opts, sources = m.resolve_options(m.parse_options({}), get_task(task))
        assert (opts["scale"], opts["dropout"], opts["rank"]) == (s, p, 2)
        assert "hydra_both" in sources["scale"]
    opts, sources = m.resolve_options(m.parse_options({}), get_task("cub200"))  # no official config: the defaults
    assert (opts["scale"], opts["dropout"]) == (1.0, 0.0) and sources["scale"].startswith("default 1.0")


def test_the_merge_equals_the_unmerged_model(tiny_backbone):
    model = build("hydra", tiny_backbone, rank=2, scale=1.5, dropout=0.0).double()
    randomise(model)
    model.eval()
    merged = model.merged().double().eval()
    assert is_plain_timm(merged)
    x = inputs(1)
    with torch.no_grad():
        assert torch.allclose(merged(x), model(x), rtol=0, atol=1e-11)
    # the official attention merge starts from the merged fc2 weight (vtab1k/hydra.py:118): wrong shape on ViT-B;
    # pointed at proj but with its transposes it puts U_s D_s on the wrong side of W0 (not the maths): a check
    # that the fold is W' = (I + s U_s D_s) W0 + s U_p D_p and not W0 (I + s U_s D_s) + s U_p D_p
    layer = copy.deepcopy(model.backbone.blocks[0].attn.proj)
    a_s, _ = layer.sequential.affine()
    a_p, _ = layer.parallel.affine()
    w0 = layer.base.weight.detach().clone()
    folded = layer.fold().weight
    assert torch.allclose(folded, w0 + a_s @ w0 + a_p, atol=1e-12)
    assert not torch.allclose(folded, w0 + w0 @ a_s + a_p, atol=1e-3)


def test_gradients_reach_exactly_the_branches_and_the_head(tiny_backbone):
    model = build("hydra", tiny_backbone, rank=2, scale=1.0, dropout=0.1)
    randomise(model)
    model.train()
    F.cross_entropy(model(inputs().float()), torch.tensor([0, 1])).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {n for n, p in model.named_parameters() if p.requires_grad}
