"""Res-Tuning-Bypass (docs/methods/restuning.md, modelscope/ms-swift@3602360 swift/tuners/restuning.py,
restuning_components.py): the forward equals a direct float64 computation of the ladder (the bypass replacing the final
norm's input); computing the CLS rows only gives the logits of computing every token; the inits; what trains, and that
the backbone records no graph; the counts."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from petl_reference import (
    blocks_in_graph,
    build,
    gelu,
    inputs,
    layer_norm,
    linear,
    randomise,
    reference_features,
    tiny_kwargs,
    weights,
)

from peftbench.cli.params import count


def test_forward_equals_the_bypass_written_out(tiny_backbone):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    model = build("restuning-bypass", tiny_backbone, dim=5).double()
    randomise(model)
    model.eval()
    x = inputs()
    w, p = weights(ref), weights(model)
    outs: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(z):
            outs[i] = z
            return z
        return hook

    reference_features(w, x, {("block", i): keep(i) for i in range(3)}, **tiny_kwargs(ref))
    e = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=8).flatten(2).transpose(1, 2)
    b = torch.cat([w["cls_token"].expand(2, -1, -1), e], dim=1) + w["pos_embed"]

    def adapter(pre, t):
        return t + linear(gelu(linear(t, p[pre + "ln1.weight"], p[pre + "ln1.bias"])), p[pre + "ln2.weight"],
                          p[pre + "ln2.bias"])

    for i in range(3):
        b = adapter(f"lateral.{i}.", outs[i]) + adapter(f"vertical.{i}.", b)
    z = layer_norm(b, w["norm.weight"], w["norm.bias"])[:, 0]
    expect = linear(z, p["head.weight"], p["head.bias"])
    with torch.no_grad():
        got = model(x)
        model.cls_only = False  # every token through the bypass: the same logits
        every = model(x)
    assert torch.allclose(got, expect, rtol=0, atol=1e-12), (got - expect).abs().max()
    assert torch.allclose(every, got, rtol=0, atol=1e-12)


def test_init_what_trains_no_backbone_graph_and_the_counts(tiny_backbone):
    torch.manual_seed(0)
    model = build("restuning-bypass", copy.deepcopy(tiny_backbone), dim=8)
    bound = math.sqrt(6 / (48 + 8))  # Xavier-uniform of a 48 <-> 8 Linear
    for a in [*model.lateral, *model.vertical]:
        for lin in (a.ln1, a.ln2):
            assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.8 * bound
            assert 0 < lin.bias.abs().max() < 1e-5
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"lateral", "vertical", "head"}
    assert blocks_in_graph(model) == [False, False, False]
    model.zero_grad()
    model(inputs().float()).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    zeroed = build("restuning-bypass", copy.deepcopy(tiny_backbone), zero_init_last="true")
    assert not zeroed.lateral[2].ln2.weight.any() and not zeroed.vertical[2].ln2.bias.any()
    assert zeroed.lateral[1].ln2.weight.any()
    D, r = 768, 32
    assert count("restuning-bypass", 100)["trainable_without_head"] == 12 * 2 * (2 * D * r + r + D) == 1_198_848


@pytest.mark.parametrize("dim", [0, -1])
def test_dim_is_bounded(tiny_backbone, dim):
    from peftbench.errors import OptionError

    with pytest.raises(OptionError, match="dim"):
        build("restuning-bypass", tiny_backbone, dim=dim)
