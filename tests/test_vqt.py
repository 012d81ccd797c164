"""VQT (docs/methods/vqt.md, andytu28/VQT@9bca87e): the logits and gradients equal a direct float64 computation of the
official forward (the queries prepended to every block's input, keys and values sliced to the original tokens, the
query outputs collected and stripped, the normalised concatenation); the backbone's features are untouched; each
layer's queries reach only their slice of the feature; inits, counts, and no graph through the backbone."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from petl_reference import blocks_in_graph, build, gelu, inputs, layer_norm, linear, randomise, weights

from peftbench.cli.params import count


def official_logits(p: dict, x: torch.Tensor, queries: torch.Tensor, head_w, head_b, *, depth, heads, patch):
    """The official forward on plain torch ops: per block, [P_l ; X] through LN1, queries from every row, keys and
    values from the last N rows only, the block's residuals and MLP on every row; the first T rows collected and
    stripped; f = [n(CLS after the final norm), n(vec Z_1), ...]."""
    t = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([p["cls_token"].expand(x.shape[0], -1, -1), t], dim=1) + p["pos_embed"]
    b, n, d = t.shape
    hd, T = d // heads, queries.shape[1]
    outs = []
    for i in range(depth):
        q_ = f"blocks.{i}."
        s = torch.cat([queries[i].expand(b, -1, -1), t], dim=1)  # the queries in front
        h = layer_norm(s, p[q_ + "norm1.weight"], p[q_ + "norm1.bias"])
        qkv = linear(h, p[q_ + "attn.qkv.weight"], p[q_ + "attn.qkv.bias"]).reshape(b, T + n, 3, heads, hd)
        q = qkv[:, :, 0].transpose(1, 2)  # every row queries...
        k = qkv[:, T:, 1].transpose(1, 2)  # ... the original rows only
        v = qkv[:, T:, 2].transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1) @ v
        s = s + linear(a.transpose(1, 2).reshape(b, T + n, d), p[q_ + "attn.proj.weight"], p[q_ + "attn.proj.bias"])
        h2 = layer_norm(s, p[q_ + "norm2.weight"], p[q_ + "norm2.bias"])
        s = s + linear(gelu(linear(h2, p[q_ + "mlp.fc1.weight"], p[q_ + "mlp.fc1.bias"])),
                       p[q_ + "mlp.fc2.weight"], p[q_ + "mlp.fc2.bias"])
        outs.append(s[:, :T])
        t = s[:, T:]  # stripped: the next block sees the original rows only
    c = layer_norm(t, p["norm.weight"], p["norm.bias"])[:, 0]
    f = torch.cat([F.normalize(c, dim=-1)] + [F.normalize(z.flatten(1), dim=-1) for z in outs], dim=-1)
    return linear(f, head_w, head_b)


@pytest.mark.parametrize("tokens", [1, 3])
def test_logits_and_gradients_equal_the_official_forward(tiny_backbone, tokens):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    model = build("vqt", tiny_backbone, tokens=tokens).double()
    randomise(model)
    model.eval()
    x = inputs()
    got = model(x)
    expect = official_logits(weights(ref), x, model.queries, model.head.weight, model.head.bias, depth=3, heads=3,
                             patch=8)
    assert torch.allclose(got, expect, rtol=0, atol=1e-12), (got - expect).abs().max()
    trained = [model.queries, model.head.weight, model.head.bias]
    for a, b in zip(torch.autograd.grad(got.square().sum(), trained), torch.autograd.grad(expect.square().sum(), trained)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_the_backbone_features_are_untouched_and_each_layer_reaches_its_slice(tiny_backbone):
    plain = copy.deepcopy(tiny_backbone).double().eval()
    model = build("vqt", tiny_backbone, tokens=2).double().eval()
    x = inputs(1)
    width = 48
    with torch.no_grad():
        f = model.features(x)
        cls = F.normalize(plain.forward_features(x)[:, 0], dim=-1)
        assert torch.allclose(f[:, :width], cls, atol=1e-13)  # the CLS is the plain backbone's, whatever the queries
        assert f.shape[1] == width * (1 + 3 * 2)
        blocks = [f[:, :width]] + list(f[:, width:].split(2 * width, dim=1))
        assert all(torch.allclose(blk.norm(dim=1), torch.ones(2, dtype=f.dtype)) for blk in blocks)
        model.queries[1].add_(0.3)  # layer 2's queries move only layer 2's slice
        g = model.features(x)
    changed = [not torch.equal(a, b) for a, b in zip(f.split([width] + [2 * width] * 3, dim=1),
                                                      g.split([width] + [2 * width] * 3, dim=1))]
    assert changed == [False, False, True, False]


def test_no_graph_through_the_backbone_and_what_trains(tiny_backbone):
    model = build("vqt", tiny_backbone, tokens=2)
    seen = blocks_in_graph(model)
    assert seen == [False, False, False]  # the backbone's own pass records nothing
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"queries", "head.weight", "head.bias"}
    assert model.queries.grad is not None and model.queries.grad.abs().sum() > 0


def test_inits_and_counts():
    torch.manual_seed(0)
    for t in (1, 10, 20):
        out = count("vqt", 100, sets=[f"tokens={t}"])
        assert out["trainable_without_head"] == 9_216 * t
        assert out["head"] == (768 * (1 + 12 * t) + 1) * 100
    import timm

    bb = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, global_pool="token")
    model = build("vqt", bb, num_classes=5, tokens=2)
    assert model.queries.abs().max() <= 0.0625 and model.queries.abs().max() > 0.06  # U(±√(6/1536))
    assert torch.allclose(model.head.bias, torch.full((5,), -math.log(99)))  # the official special bias
    assert 0.5 < model.head.weight.std() / math.sqrt(2 / 5) < 1.5  # kaiming-normal fan_out
