"""AdaptFormer, Convpass, Adapter+ and the Houlsby adapter (docs/methods/{adaptformer,convpass,adapter_plus}.md):
the forward equals a hand-written reference, exactly the intended parameters train, the official inits,
the ViT-B/16 parameter formulas, the per-task options, train/eval modes, no merged form."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from petl_reference import build, gelu, inputs, linear, randomise, reference_features, tiny_kwargs, weights
from timm.layers import DropPath

from peftbench.cli.params import count
from peftbench.methods import get_method
from peftbench.tasks import get_task

C = 5
D, L, H = 768, 12, 3072  # ViT-B/16 width, depth, MLP width
HEAD = (D + 1) * 100  # the head for C = 100



def reference_logits(ref, model, x, hooks):
    """The hand-written forward: frozen weights from the untouched copy ``ref``, trained backbone tensors (LNs)
    from ``model`` where the model still has them under their plain names."""
    w = weights(ref)
    w.update({n: p.detach() for n, p in model.backbone.named_parameters() if n in w})
    f = reference_features(w, x, hooks, **tiny_kwargs(ref))
    return linear(f, model.head.weight, model.head.bias)


def backbone_features(ref, x):
    return ref.forward_head(ref.forward_features(x), pre_logits=True)


def one_backward(model):
    torch.manual_seed(0)
    model.train()
    x = torch.randn(4, 3, 32, 32)
    F.cross_entropy(model(x), torch.randint(0, C, (4,))).backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


def test_reference_without_hooks_is_the_timm_vit(tiny_backbone):
    vit = tiny_backbone.double().eval()
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(reference_features(weights(vit), x, {}, **tiny_kwargs(vit)),
                                   backbone_features(vit, x), rtol=0, atol=1e-10)


# --- AdaptFormer -----------------------------------------------------------------------------------


def test_adaptformer_forward_equals_reference(tiny_backbone):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    model = build("adaptformer", tiny_backbone, bottleneck=4, scale=0.5).double()
    randomise(model)
    model.eval()
    ads = [blk.adapter for blk in model.backbone.blocks]

    def mlp_branch(a):  # x_out = x1 + mlp(norm2(x1)) + s·(W_up ReLU(W_down x1 + b_d) + b_u), x1 NOT normed
        return lambda x1, h2, f2: f2 + 0.5 * linear(torch.relu(linear(x1, a.down.weight, a.down.bias)),
                                                   a.up.weight, a.up.bias)

    hooks = {("mlp_branch", i): mlp_branch(a) for i, a in enumerate(ads)}
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(ref, model, x, hooks), rtol=0, atol=1e-10)
    assert model.merged() is None and "merged" not in model.inference_variants()


def test_adaptformer_init_starts_as_the_backbone(tiny_backbone):
    ref = copy.deepcopy(tiny_backbone).eval()
    model = build("adaptformer", tiny_backbone).eval()
    a = model.backbone.blocks[0].adapter
    assert a.down.out_features == 8 and a.scale == pytest.approx(0.1) and a.dropout.p == pytest.approx(0.1)
    assert isinstance(a.act, torch.nn.ReLU)
    assert all(torch.count_nonzero(t) == 0 for t in (a.up.weight, a.up.bias, a.down.bias))
    bound = 1 / math.sqrt(48)  # kaiming-uniform(a=√5)
    assert a.down.weight.abs().max() <= bound and a.down.weight.abs().max() > bound / 2
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.features(x), backbone_features(ref, x))


# --- Convpass --------------------------------------------------------------------------------------


def conv3x3(z, w, b):
    """3x3 convolution, zero padding 1, written as a sum over the 9 taps: z (B, c, h, w)."""
    zp = F.pad(z, (1, 1, 1, 1))
    h, wd = z.shape[-2:]
    out = sum(torch.einsum("oi,bihw->bohw", w[:, :, dy, dx], zp[:, :, dy:dy + h, dx:dx + wd])
              for dy in range(3) for dx in range(3))
    return out + b.view(1, -1, 1, 1)


def convpass_reference(a, x):
    """up(q(conv(q(down(x))))): patches on the 4x4 grid (row-major), CLS as a 1x1 image (centre tap only)."""
    def q(t):
        return t * torch.sigmoid(1.702 * t)
    z = q(linear(x, a.down.weight, a.down.bias))
    b, n, c = z.shape
    side = int(math.isqrt(n - 1))
    grid = z[:, 1:].reshape(b, side, side, c).permute(0, 3, 1, 2)
    patches = conv3x3(grid, a.conv.weight, a.conv.bias).permute(0, 2, 3, 1).reshape(b, n - 1, c)
    cls = z[:, :1] @ a.conv.weight[:, :, 1, 1].T + a.conv.bias
    return linear(q(torch.cat([cls, patches], 1)), a.up.weight, a.up.bias)


@pytest.mark.parametrize("placement", ["both", "attn"])
def test_convpass_forward_equals_reference(tiny_backbone, placement):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    model = build("convpass", tiny_backbone, scale=3.0, xavier_init="true", placement=placement).double()
    randomise(model)
    model.eval()
    blocks = model.backbone.blocks
    hooks = {}
    for i, blk in enumerate(blocks):  # x + attn(h1) + s·A(h1), h1 = norm1(x); the same on the MLP side
        hooks[("attn_branch", i)] = (lambda a: lambda x, h, f: f + 3.0 * convpass_reference(a, h))(blk.attn.adapter)
        if placement == "both":
            hooks[("mlp_branch", i)] = (lambda a: lambda x, h, f: f + 3.0 * convpass_reference(a, h))(blk.mlp.adapter)
        else:
            assert not hasattr(blk.mlp, "adapter")
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(ref, model, x, hooks), rtol=0, atol=1e-10)
    assert model.merged() is None and "merged" not in model.inference_variants()


def test_convpass_inits(tiny_backbone):
    ref = copy.deepcopy(tiny_backbone).eval()
    model = build("convpass", copy.deepcopy(tiny_backbone), xavier_init="false").eval()
    a = model.backbone.blocks[1].mlp.adapter
    w = a.conv.weight
    assert torch.equal(w[:, :, 1, 1], torch.eye(8)) and torch.count_nonzero(w) == 8  # the identity map
    assert torch.count_nonzero(a.conv.bias) == 0 and torch.count_nonzero(a.down.bias) == 0
    assert torch.count_nonzero(a.up.weight) == 0 and torch.count_nonzero(a.up.bias) == 0
    bound = math.sqrt(6 / (48 + 8))  # xavier-uniform
    assert a.down.weight.abs().max() <= bound and a.down.weight.abs().max() > bound / 2
    assert a.dropout.p == pytest.approx(0.1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.features(x), backbone_features(ref, x))
    xav = build("convpass", tiny_backbone, xavier_init="true").backbone.blocks[0].attn.adapter.conv.weight
    bound = math.sqrt(6 / (2 * 8 * 9))
    assert xav.abs().max() <= bound and torch.count_nonzero(xav) == xav.numel()


def test_convpass_per_task_options():
    m = get_method("convpass")
    o, src = m.resolve_options(m.parse_options({}), get_task("dtd"))
    assert (o["scale"], o["xavier_init"]) == (0.01, True) and "convpass/<task>.yaml [dtd]" in src["scale"]
    o, _ = m.resolve_options(m.parse_options({}), get_task("sun397"))
    assert (o["scale"], o["xavier_init"]) == (0.1, False)
    o, src = m.resolve_options(m.parse_options({"placement": "attn"}), get_task("caltech101"))
    assert (o["scale"], o["xavier_init"]) == (100.0, True) and "convpass_attn" in src["scale"]
    o, src = m.resolve_options(m.parse_options({"scale": "2"}), get_task("demo_digits"))
    assert o["scale"] == 2.0 and o["xavier_init"] is False and "scale" not in src and "default" in src["xavier_init"]


# --- Adapter+ and Houlsby -----------------------------------------------------------------------------


def bottleneck_reference(a, u):
    y = linear(gelu(linear(u, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
    return y * a.scaling if a.scaling is not None else y


def test_adapter_plus_forward_equals_reference(tiny_backbone):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    model = build("adapter-plus", tiny_backbone, bottleneck=4).double()
    randomise(model)
    model.eval()  # DropPath off
    ads = [blk.adapter for blk in model.backbone.blocks]
    assert all(a.scaling is not None and a.scaling.shape == (48,) for a in ads)
    hooks = {("block", i): (lambda a: lambda z: z + bottleneck_reference(a, z))(a) for i, a in enumerate(ads)}
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(ref, model, x, hooks), rtol=0, atol=1e-10)
    assert model.merged() is None and "merged" not in model.inference_variants()


def test_houlsby_forward_equals_reference(tiny_backbone):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    model = build("adapter-houlsby", tiny_backbone, bottleneck=4).double()
    randomise(model)  # the LayerNorms too: they are trained
    model.eval()
    hooks = {}
    for i, blk in enumerate(model.backbone.blocks):  # f + a(f) on each branch output, before the residual add
        assert blk.attn.adapter.scaling is None  # fixed scaling 1
        hooks[("attn_branch", i)] = (lambda a: lambda x, h, f: f + bottleneck_reference(a, f))(blk.attn.adapter)
        hooks[("mlp_branch", i)] = (lambda a: lambda x, h, f: f + bottleneck_reference(a, f))(blk.mlp.adapter)
    x = inputs()
    with torch.no_grad():
        got = model(x)
        torch.testing.assert_close(got, reference_logits(ref, model, x, hooks), rtol=0, atol=1e-10)
        # the trained LayerNorms matter: with the untouched ones the reference differs
        w = weights(ref)
        stale = linear(reference_features(w, x, hooks, **tiny_kwargs(ref)), model.head.weight, model.head.bias)
        assert not torch.allclose(got, stale)
    assert model.merged() is None and "merged" not in model.inference_variants()


@pytest.mark.parametrize("name", ["adapter-plus", "adapter-houlsby"])
def test_houlsby_init_and_drop_path(tiny_backbone, name):
    model = build(name, tiny_backbone)
    adapters = [m for m in model.train_modules if m is not model.head]
    assert len(adapters) == (3 if name == "adapter-plus" else 6)
    for a in adapters:
        assert a.down.out_features == 8
        for lin in (a.down, a.up):  # truncated normal std 0.01, cut at ±0.02; zero biases
            assert lin.weight.abs().max() <= 0.02 and 0.005 < lin.weight.std() < 0.015
            assert torch.count_nonzero(lin.bias) == 0
        assert isinstance(a.act, torch.nn.GELU) and a.act.approximate == "none"
        assert isinstance(a.drop_path, DropPath) and a.drop_path.drop_prob == pytest.approx(0.1)
        if name == "adapter-plus":
            assert torch.equal(a.scaling, torch.ones(48))
    model.train()
    assert all(a.training and a.drop_path.training for a in adapters)
    wrapped = model.backbone.blocks[0].base if name == "adapter-plus" else model.backbone.blocks[0].attn.base
    assert not wrapped.training
    assert not any(m.training for n, m in model.backbone.named_modules() if n.endswith("norm1"))


def test_adapter_plus_per_task_bottleneck():
    m = get_method("adapter-plus")
    assert m.parse_options({})["bottleneck"] == 8
    for task, r in (("resisc45", 32), ("cifar100", 1), ("oxford_iiit_pet", 8), ("stanford_cars", 32)):
        o, src = m.resolve_options(m.parse_options({"bottleneck": "auto"}), get_task(task))
        assert o["bottleneck"] == r and "adapter_plus_dim1-32" in src["bottleneck"]
    o, src = m.resolve_options(m.parse_options({"bottleneck": "auto"}), get_task("demo_digits"))
    assert o["bottleneck"] == 8 and "default" in src["bottleneck"]


# --- what trains, modes ----------------------------------------------------------------------------


def _expected(name, model):
    names = [n for n, _ in model.named_parameters()]
    rules = {
        "adaptformer": lambda n: ".adapter." in n,
        "convpass": lambda n: ".attn.adapter." in n or ".mlp.adapter." in n,
        "adapter-plus": lambda n: ".adapter." in n,
        "adapter-houlsby": lambda n: ".adapter." in n or ".norm" in n or n.startswith("backbone.norm."),
    }
    return {n for n in names if n.startswith("head.") or rules[name](n)}


@pytest.mark.parametrize("name,per_block,extra", [("adaptformer", 4, 0), ("convpass", 12, 0), ("adapter-plus", 5, 0),
                                                  ("adapter-houlsby", 8 + 4, 2)])
def test_gradients_reach_exactly_the_trained_parameters(tiny_backbone, name, per_block, extra):
    model = build(name, tiny_backbone)
    expected = _expected(name, model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert one_backward(model) == expected
    frozen = [p for n, p in model.named_parameters() if n not in expected]
    assert frozen and all(p.grad is None for p in frozen)
    assert len(expected) == per_block * len(model.backbone.blocks) + extra + 2


@pytest.mark.parametrize("name", ["adaptformer", "convpass"])
def test_dropout_runs_in_train_mode_only_the_backbone_stays_in_eval(tiny_backbone, name):
    model = build(name, tiny_backbone)
    randomise(model)
    model.train()
    assert not model.backbone.training
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert dropouts and all(d.training for d in dropouts)
    frozen = [m for n, m in model.backbone.named_modules() if ".adapter" not in n and n]
    assert not any(m.training for m in frozen)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


# --- ViT-B/16 parameter counts (docs/methods/*.md §4) --------------------------------------------------


def _adapter(d_in, r, bias_out=True):  # Linear(d_in, r) + Linear(r, d_in), with biases
    return d_in * r + r + r * d_in + (d_in if bias_out else 0)


@pytest.mark.parametrize("name,sets,formula", [
    ("adaptformer", [], L * _adapter(D, 8)),  # 156,768
    ("adaptformer", ["bottleneck=64"], L * _adapter(D, 64)),  # 1,189,632
    ("convpass", [], 2 * L * (_adapter(D, 8) + 9 * 8 * 8 + 8)),  # 327,552
    ("convpass", ["placement=attn"], L * (_adapter(D, 8) + 9 * 8 * 8 + 8)),  # 163,776
    ("adapter-plus", [], L * (_adapter(D, 8) + D)),  # 165,984 (+ D: the channel scaling)
    ("adapter-plus", ["bottleneck=1"], L * (_adapter(D, 1) + D)),
    ("adapter-houlsby", [], 2 * L * _adapter(D, 8) + 2 * D * (2 * L + 1)),  # 313,536 + 38,400
    ("adapter-houlsby", ["train_ln=false", "bottleneck=4"], 2 * L * _adapter(D, 4)),
])
def test_vit_b16_parameter_counts(name, sets, formula):
    out = count(name, 100, "vit_base_patch16_224", sets)
    assert out["trainable_without_head"] == formula
    assert out["head"] == HEAD and out["trainable"] == out["tuned"] == formula + HEAD
    lns = 2 * D * (2 * L + 1) if name == "adapter-houlsby" and "train_ln=false" not in sets else 0
    assert out["total"] == count("linear", 100)["total"] + formula - lns


def test_vit_b16_numbers_in_the_docs():
    assert L * _adapter(D, 8) == 156_768 and 2 * L * (_adapter(D, 8) + 9 * 64 + 8) == 327_552
    assert L * (_adapter(D, 8) + D) == 165_984 and 2 * L * _adapter(D, 8) + 2 * D * (2 * L + 1) == 351_936
    assert H == 4 * D


def test_recipes():
    for name in ("adaptformer", "convpass", "adapter-plus", "adapter-houlsby"):
        r = get_method(name).recipe
        assert (r.optimizer, r.batch_size, r.epochs, r.warmup_epochs) == ("adamw", 64, 100, 10)
        assert r.lr_grid == (0.004,) and r.wd_grid == (1e-4,)  # lr 1e-3 at batch 64, wd 1e-4: no search
        assert r.protocol_values("demo")["lr"] > 0
