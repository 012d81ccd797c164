"""MoSA (docs/methods/mosa.md, Theia-4869/MoSA@286cc0fd): the eval forward (the mean expert) and the training forward
(the drawn expert's quarter) equal the official maths written out in float64; the partition is pruner.py's rank rule;
the draws are vit_mosa.py's two randint per block; the step's extra loss is losses.py's symmetric KL of a second
forward; a step's gradient reaches only the drawn expert's quarter and bias; the draw state survives a checkpoint;
the counts."""
from __future__ import annotations

import copy
import math
import random

import torch
import torch.nn.functional as F
from petl_reference import build, gelu, inputs, linear, randomise, reference_features, tiny_kwargs, weights

from peftbench.cli.params import count


def adapter_ref(p, i, h, expert=None, experts=4, scale=0.1):
    pre = f"backbone.blocks.{i}.adapter."
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    a = gelu(linear((h - mu) / torch.sqrt(var + 1e-6) * p[pre + "norm.weight"] + p[pre + "norm.bias"],
                    p[pre + "down.weight"], p[pre + "down.bias"]))
    w, b = p[pre + "up_weight"], p[pre + "up_bias"]
    if expert is None:
        return scale * linear(a, w / experts, b.mean(0))
    part = p[pre + "partition"]
    return scale * linear(a, torch.where(part == expert, w, torch.zeros_like(w)), b[expert])


def run_reference(model, ref, x, experts_of=None):
    p = {**weights(model), **{n: b for n, b in model.named_buffers()}}

    def branch(i):
        return lambda x1, h2, f2: f2 + adapter_ref(p, i, x1, None if experts_of is None else experts_of[i])

    feats = reference_features(weights(ref), x, {("mlp_branch", i): branch(i) for i in range(3)}, **tiny_kwargs(ref))
    return linear(feats, model.head.weight, model.head.bias)


def test_eval_and_training_forwards_equal_the_official_maths(tiny_backbone):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    model = build("mosa", tiny_backbone, rank=4, dropout=0).double()
    randomise(model)
    x = inputs()
    model.eval()
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got, run_reference(model, ref, x), rtol=0, atol=1e-12)
    model.train()
    model._rng = random.Random(11)
    with torch.no_grad():
        got = model(x)
    drawn = [a.expert for a in model.adapters]
    assert torch.allclose(got, run_reference(model, ref, x, drawn), rtol=0, atol=1e-12)
    rng = random.Random(11)
    want = []
    for _ in range(3):  # per block A (unused), then B
        rng.randint(0, 3)
        want.append(rng.randint(0, 3))
    assert drawn == want


def test_the_partition_is_pruners_rank_rule():
    from peftbench.methods.mosa import partition

    torch.manual_seed(4)
    part = partition(10, 6, 4)
    torch.manual_seed(4)
    score = torch.rand(60)
    n = 60
    for i in range(4):  # pruner.py:59-66: expert i keeps the entries of rank in (floor(0.25 i n), floor(0.25 (i+1) n)]
        lo = torch.kthvalue(score, math.floor(0.25 * i * n)).values if i else -math.inf
        hi = torch.kthvalue(score, math.floor(0.25 * (i + 1) * n)).values
        assert torch.equal((part.flatten() == i), (score > lo) & (score <= hi))
    assert sorted((part == i).sum().item() for i in range(4)) == [15, 15, 15, 15]


def test_the_step_loss_is_the_symmetric_kl_of_a_second_forward_and_the_gradient_stays_in_the_quarter(tiny_backbone):
    model = build("mosa", copy.deepcopy(tiny_backbone), rank=4, dropout=0).double()
    randomise(model)
    model.train()
    x, y = inputs(), torch.tensor([1, 3])
    model._rng = random.Random(2)
    first = model(x)
    state = model._rng.getstate()
    extra = model.step_loss(y)
    model._rng.setstate(state)
    with torch.no_grad():
        second = model(x)
    p1, p2 = F.softmax(first.detach(), -1), F.softmax(second, -1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum() / 2  # KL(p ‖ q), batchmean over 2 images  # noqa: E731
    assert torch.allclose(extra.detach(), 0.5 * (kl(p2, p1) + kl(p1, p2)), rtol=1e-12, atol=0)

    model.zero_grad()
    model._rng = random.Random(5)
    F.cross_entropy(model(x), y).backward()
    for a in model.adapters:
        g = a.up_weight.grad
        assert not g[a.partition != a.expert].any() and g[a.partition == a.expert].any()
        others = [e for e in range(4) if e != a.expert]
        assert not a.up_bias.grad[others].any() and a.up_bias.grad[a.expert].any()


def test_the_draw_state_survives_a_checkpoint(tiny_backbone):
    model = build("mosa", copy.deepcopy(tiny_backbone))
    model._rng = random.Random(9)
    model._rng.random()
    saved = model.step_state()
    expect = [model._rng.randint(0, 3) for _ in range(5)]
    other = build("mosa", copy.deepcopy(tiny_backbone))
    other.load_step_state(saved, "test")
    assert [other._rng.randint(0, 3) for _ in range(5)] == expect


def test_init_what_trains_and_the_counts(tiny_backbone):
    model = build("mosa", copy.deepcopy(tiny_backbone))
    a = model.adapters[0]
    assert not a.up_weight.any() and not a.up_bias.any() and not a.down.bias.any()
    assert a.down.weight.abs().max() <= 1 / math.sqrt(48)  # kaiming-uniform(a = √5) = U(±1/√fan_in)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"backbone.blocks.{i}.adapter.{t}" for i in range(3) for t in
                       ("norm.weight", "norm.bias", "down.weight", "down.bias", "up_weight", "up_bias")} | \
        {"head.weight", "head.bias"}
    D, r, E = 768, 16, 4
    assert count("mosa", 100)["trainable_without_head"] == 12 * (2 * D + D * r + r + D * r + E * D) == 350_400
