"""Adapters, LoRA (through peft), BitFit, Partial-1 and MLP-3 (issue #4; docs/methods/adapter.md-§4.6, §5)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftbench.cli.params import count
from peftbench.methods import HEAD_BIAS_INIT, get_method

NUM_CLASSES = 5


def build(name: str, backbone, **opts):
    method = get_method(name)
    return method.build(backbone, NUM_CLASSES, method.parse_options({k: str(v) for k, v in opts.items()}))


def one_backward(model) -> set[str]:
    torch.manual_seed(0)
    model.train()
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, NUM_CLASSES, (4,))
    F.cross_entropy(model(x), y).backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


# --- docs/methods/README.md §4: parameter counts for ViT-B/16, C = 100 (meta device, no weights) ------------------------

SPEC5 = [
    ("adapter", [], 1_856_740),
    ("adapter", ["reduction=8"], 1_856_740),
    ("adapter", ["adapter.reduction=64"], 307_444),
    ("adapter", ["reduction=256"], 141_448),
    ("adapter-noah", [], 233_668),
    ("lora", [], 371_812),
    ("bitfit", [], 179_812),
    ("bias", [], 179_812),
    ("partial-1", [], 7_166_308),
    ("mlp-3", [], 1_261_156),
]


@pytest.mark.parametrize("method,sets,expected", SPEC5, ids=[f"{m}{''.join(s)}" for m, s, _ in SPEC5])
def test_parameter_counts_equal_the_documented_formulas(method, sets, expected):
    out = count(method, 100, "vit_base_patch16_224", sets)
    assert out["trainable"] == expected
    assert out["tuned"] == expected
    assert out["head"] == 769 * 100
    assert out["trainable_without_head"] == expected - 76_900
    added = 0 if method in ("bitfit", "bias", "partial-1") else out["trainable_without_head"]
    assert out["total"] == 85_798_656 + added + 76_900


def test_documented_formulas_for_other_settings():
    # Adapter (VPT, r): 12·(2·768·768/r + 768/r + 768); LoRA r: 36,864·r
    for r in (8, 16, 32):
        assert count("adapter", 10, sets=[f"reduction={r}"])["trainable_without_head"] == \
            12 * (2 * 768 * 768 // r + 768 // r + 768)
    for r in (4, 16):
        assert count("lora", 10, sets=[f"lora.rank={r}"])["trainable_without_head"] == 36_864 * r


# --- adapters ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", [8, 24])
def test_zero_init_adapter_keeps_backbone_logits_exactly(tiny_backbone, reduction):
    reference = copy.deepcopy(tiny_backbone).eval()
    model = build("adapter", tiny_backbone, reduction=reduction)
    for block in model.backbone.blocks:
        assert all(torch.count_nonzero(p) == 0 for p in block.mlp.adapter.parameters())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref_features = reference.forward_head(reference.forward_features(x), pre_logits=True)
        model.eval()
        assert torch.equal(model.features(x), ref_features)
        assert torch.equal(model(x), model.head(ref_features))
        model.train()  # no dropout anywhere in this adapter: train mode changes nothing either
        assert torch.equal(model(x), model.head(ref_features))


def test_adapter_placement_and_math(tiny_backbone):
    """out = x + h + W_up·GELU(W_down·h + b_d) + b_u with h = MLP(LN2(x)), checked on block 0."""
    model = build("adapter", tiny_backbone, reduction=8)
    block = model.backbone.blocks[0]
    adapter = block.mlp.adapter
    assert adapter.down.out_features == 48 // 8
    torch.manual_seed(1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    x = torch.randn(2, 17, 48)
    with torch.no_grad():
        x1 = x + block.attn(block.norm1(x))
        h = block.mlp.base(block.norm2(x1))
        expected = x1 + h + adapter.up(F.gelu(adapter.down(h)))
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_noah_adapter_init_dropout_and_modes(tiny_backbone):
    model = build("adapter-noah", tiny_backbone)
    adapter = model.backbone.blocks[0].mlp.adapter
    assert adapter.down.out_features == 8 and adapter.up.in_features == 8
    assert adapter.dropout.p == pytest.approx(0.1)
    assert adapter.down.bias.abs().max() < 1e-4 and adapter.up.bias.abs().max() < 1e-4
    bound = math.sqrt(6 / (48 + 8))  # xavier-uniform
    assert adapter.down.weight.abs().max() <= bound and adapter.down.weight.abs().max() > bound / 2
    model.eval()
    x = torch.randn(2, 17, 48)
    with torch.no_grad():
        assert torch.allclose(adapter(x), x + adapter.up(_quick_gelu(adapter.down(x))), atol=1e-6)
    model.train()
    assert adapter.training and adapter.dropout.training
    assert not model.backbone.training and not model.backbone.blocks[0].mlp.base.training
    assert not model.backbone.blocks[0].attn.training
    model.eval()
    assert not adapter.dropout.training


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


# --- LoRA through peft -------------------------------------------------------------------------------


def test_lora_equals_handwritten_update(tiny_backbone):
    model = build("lora", tiny_backbone)
    layer = model.backbone.blocks[0].attn.qkv
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (8, 48) and b.shape == (144, 8)
    assert torch.count_nonzero(b) == 0  # B zero-initialised: the model starts as the backbone
    assert layer.scaling["default"] == 1.0  # lora_alpha = rank: no alpha/r scaling (NOAH)
    assert layer.lora_dropout["default"].p == pytest.approx(0.1)
    torch.manual_seed(2)
    with torch.no_grad():
        a.normal_()
        b.normal_()
    model.eval()
    x = torch.randn(2, 17, 48)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ w.T + bias + x @ a.T @ b.T, atol=1e-4)


def test_lora_rank_alpha_options(tiny_backbone):
    model = build("lora", tiny_backbone, rank=4, alpha=8, dropout=0.0)
    layer = model.backbone.blocks[-1].attn.qkv
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (4, 48) and layer.scaling["default"] == 2.0
    with torch.no_grad():
        a.normal_()
        b.normal_()
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.base_layer(x) + 2.0 * (x @ a.T @ b.T), atol=1e-4)


def test_lora_train_modes(tiny_backbone):
    model = build("lora", tiny_backbone)
    layer = model.backbone.blocks[0].attn.qkv
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    model.train()
    assert layer.lora_dropout["default"].training  # dropout of the LoRA input runs while training
    assert not layer.base_layer.training and not model.backbone.training
    assert not model.backbone.blocks[0].norm1.training
    assert any(m is layer.lora_dropout["default"] for m in model.train_modules)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # dropout active
        model.eval()
        assert not layer.lora_dropout["default"].training
        assert torch.equal(model(x), model(x))


# --- each method trains exactly what the spec names -----------------------------------------------


def _expected(name: str, model) -> set[str]:
    names = [n for n, _ in model.named_parameters()]
    head = {n for n in names if n.startswith("head.")}
    depth = len(model.backbone.blocks)
    rules = {
        "adapter": lambda n: ".mlp.adapter." in n,
        "adapter-noah": lambda n: ".mlp.adapter." in n,
        "lora": lambda n: ".attn.qkv.lora_A." in n or ".attn.qkv.lora_B." in n,
        "bitfit": lambda n: n.startswith("backbone.") and "bias" in n,
        "partial-1": lambda n: n.startswith((f"backbone.blocks.{depth - 1}.", "backbone.norm.")),
        "mlp-3": lambda n: False,
    }
    return head | {n for n in names if rules[name](n)}


@pytest.mark.parametrize("name", ["adapter", "adapter-noah", "lora", "bitfit", "partial-1", "mlp-3"])
def test_gradients_reach_exactly_the_trained_parameters(tiny_backbone, name):
    model = build(name, tiny_backbone)
    expected = _expected(name, model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    got = one_backward(model)
    assert got == expected
    frozen = [n for n, p in model.named_parameters() if n not in expected]
    assert frozen and all(dict(model.named_parameters())[n].grad is None for n in frozen)
    depth = len(model.backbone.blocks)
    sizes = {"adapter": 4 * depth + 2, "adapter-noah": 4 * depth + 2, "lora": 2 * depth + 2,
             "bitfit": 6 * depth + 2 + 2, "mlp-3": 2 * 2 + 2 * 2 + 2}
    if name in sizes:
        assert len(expected) == sizes[name]


def test_bitfit_includes_layernorm_biases(tiny_backbone):
    model = build("bitfit", tiny_backbone)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"backbone.blocks.0.norm1.bias", "backbone.blocks.0.norm2.bias", "backbone.norm.bias",
            "backbone.patch_embed.proj.bias", "backbone.blocks.0.attn.qkv.bias"} <= trained
    assert "backbone.blocks.0.norm1.weight" not in trained
    model.train()
    assert not model.backbone.training  # the backbone stays in eval mode (docs/protocols.md §12)


def test_mlp3_head_layout_init_and_counts(tiny_backbone):
    method = get_method("mlp-3")
    assert method.frozen_features
    model = build("mlp-3", tiny_backbone)
    kinds = [type(m) for m in model.head.projection]
    assert kinds == [nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Dropout] * 2  # VPT code order
    assert all(m.p == pytest.approx(0.1) for m in model.head.projection if isinstance(m, nn.Dropout))
    assert torch.allclose(model.head.last_layer.bias, torch.full((NUM_CLASSES,), HEAD_BIAS_INIT))
    assert model.no_weight_decay() == {"head.last_layer.bias"}
    counts = model.parameter_counts()
    assert counts["head"] == 49 * NUM_CLASSES
    assert counts["trainable_without_head"] == 2 * (48 * 48 + 48 + 2 * 48)
    model.train()
    assert model.head.projection[2].training and not model.backbone.training
    # trained on cached features: the head alone maps features to logits
    feats = model.features(torch.randn(4, 3, 32, 32))
    assert model.head(feats).shape == (4, NUM_CLASSES)


def test_recipes():
    from peftbench.methods import FULL_FT_RECIPE, LINEAR_RECIPE

    for name in ("adapter", "bitfit", "partial-1"):  # the full-FT recipe; only the demo lr is their own
        recipe = get_method(name).recipe
        assert recipe.for_protocol("demo", lr=FULL_FT_RECIPE.protocol_values("demo")["lr"]) == FULL_FT_RECIPE
    assert get_method("mlp-3").recipe.optimizer == LINEAR_RECIPE.optimizer == "sgd"
    assert get_method("mlp-3").recipe.lr_grid == LINEAR_RECIPE.lr_grid
    assert get_method("lora").recipe.optimizer == "adamw"
    assert get_method("adapter-noah").recipe.optimizer == "adamw"
