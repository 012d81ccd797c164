"""Every row of the peft tuner table (methods/peft_tuners.py) builds, trains and counts."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from peftbench.cli.params import count
from peftbench.methods import METHODS, get_method, peft_tuners

ROWS = [cls.name for cls in peft_tuners.REGISTERED]
NUM_CLASSES = 5

# ViT-B/16 adapter parameters (without the 769·C head) with each row's default options, on timm's
# fused qkv (2304 × 768) of 12 blocks. Formulas where the tuner has a simple one.
VITB = {
    "lora": 12 * 8 * (768 + 2304),  # 36,864·r
    "dora": 12 * (8 * (768 + 2304) + 2304),  # LoRA + one magnitude per output
    "loha": 12 * 2 * 8 * (768 + 2304),  # two rank-r products
    "lokr": 21_504,  # factorisation 2304×768 = (48×24) ⊗ rank-8 (48×32): 12·(1152 + 640)
    "vera": 12 * (256 + 2304),  # d (r) and b (out) vectors
    "ia3": 12 * (2304 + 3072),  # qkv outputs + fc2 inputs
    "fourierft": 12 * 1000,  # n_frequency per layer
    "boft": 12 * ((768 // 4) * 4 * 4 + 2304),  # blocks of 4x4 + output scale
    "oft": 12 * 8 * (96 * 95 // 2),  # 8 blocks of 96: skew-symmetric entries
    "hra": 12 * 8 * 768,  # r Householder vectors
    "randlora": 230_400,
    "shira": 12 * 8 * (768 + 2304),  # LoRA-r budget of sparse entries
    "vblora": 256 * 256 + 12 * 4 * (768 + 2304),  # the shared bank + top-k logits: r per 256-long sub-vector and bank
    "gralora": 12 * 8 * (768 + 2304),  # k² blocks of rank r/k: r·(in + out)
    "hira": 12 * 8 * (768 + 2304),  # B·A of rank r
    "delora": 12 * (8 * (768 + 2304) + 1),  # B·A + one lambda per layer
    "road": 12 * 2304,  # road_1: an angle and a scale per pair of outputs
    "miss": 12 * 64 * 2304,  # a shard of r rows of the output width
    "c3a": 12 * 768 * 2304 // 256,  # one kernel of the block size per block
    "adalora": 12 * 12 * (768 + 2304 + 1),  # init_r triplets: a column of P, a row of Q, a singular value
    "glora": 12 * (2 * 8 * (768 + 2304) + 8 * (768 + 1) + 2),  # A, B rank r; C: (in x r)(r x 1); D, E constants
    "waveft": 12 * 2592,  # n_frequency wavelet coefficients per layer
    "lily": 12 * 768 * 32 + 2 * 32 * 2304 + 12 * 32 * 2,  # an A per layer (stride 1), 2 shared B experts, routers
    "psoft": 12 * (32 * 31 // 2 + 2 * 32),  # a skew-symmetric r x r generator and two magnitude vectors
    "pvera": 12 * (2304 + 2 * 256),  # b (out) and d (2r: the probabilistic code's mean and spread) per layer
    "tinylora": 12 * 64,  # one u-long vector per layer
    "unilora": 256,  # one shared vector
    "deft": 12 * 8 * (2304 + 768),  # P (out x r) and R (r x in)
    "beft": 12 * 2304,  # a bias per output
    "frod": 12 * (768 + 7680 * 768 // 1000),  # a scaling vector (in) and 1 % of an in x in matrix (5,898 entries)
    "peanut": 12 * 2 * 32 * 2304,  # A (r x out) and B (out x r) acting on the frozen weight
    "supertuning": 12 * (768 * 2304 // 100),  # 1 % of each weight's entries
}
# options that fit the tests' 48-wide ViT (qkv 48 -> 144) where a row's ViT-B defaults do not divide its widths
TINY_OPTIONS = {"vblora": {"vector_length": "16", "num_vectors": "32"}, "road": {"group_size": "16"},
                "miss": {"rank": "8"}, "c3a": {"block_size": "16"}}


def test_table_has_the_required_tuners():
    for name in ("lora", "dora", "loha", "lokr", "vera", "ia3", "fourierft"):
        assert name in ROWS and name in METHODS
    for name in ROWS:
        m = get_method(name)
        assert isinstance(m, peft_tuners.PeftTunerMethod) and m.description and m.options


@pytest.mark.parametrize("name", ROWS)
def test_tuner_builds_trains_and_freezes_backbone(tiny_backbone, name):
    method = get_method(name)
    model = method.build(tiny_backbone, NUM_CLASSES, method.parse_options(TINY_OPTIONS.get(name, {})))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = {n for n in trainable if not n.startswith("head.")}
    assert adapter, "the tuner trains nothing"
    assert {"head.weight", "head.bias"} <= trainable
    assert not any("modules_to_save" in n for n, _ in model.named_parameters())

    model.train()
    assert not model.backbone.training
    for layer in model.tuner_layers:
        assert layer.training and not layer.get_base_layer().training
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (4, NUM_CLASSES) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.randint(0, NUM_CLASSES, (4,))).backward()
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if p.grad is not None} == trainable
    frozen = [n for n in params if n not in trainable]
    assert any(".base_layer.weight" in n for n in frozen)
    assert all(params[n].grad is None for n in frozen)  # the frozen backbone gets no gradient

    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", ROWS)
def test_tuner_counts_vit_b_on_meta(name):
    out = count(name, 100)
    assert out["head"] == 76_900
    assert out["trainable_without_head"] == VITB[name]
    assert out["trainable"] == VITB[name] + 76_900


def test_tuner_options_reach_peft(tiny_backbone):
    spare = copy.deepcopy(tiny_backbone)
    method = get_method("dora")
    model = method.build(tiny_backbone, NUM_CLASSES,
                         method.parse_options({"rank": "4", "targets": "qkv,fc1", "dropout": "0"}))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone.blocks.0.mlp.fc1.lora_A.default.weight" in names
    assert model.backbone.blocks[0].mlp.fc1.lora_A["default"].weight.shape[0] == 4
    assert any("lora_magnitude_vector" in n for n in names)
    with pytest.raises(ValueError):
        method = get_method("lora")
        method.build(spare, NUM_CLASSES, method.parse_options({"targets": "no_such_layer"}))


def test_a_tuner_row_can_set_its_own_demo_lr():
    from peftbench.methods import NOAH_RECIPE

    own = [n for n, row in peft_tuners.TUNERS.items() if row.demo_lr is not None]
    assert "randlora" in own
    for name, row in peft_tuners.TUNERS.items():
        recipe = get_method(name).recipe
        noah = NOAH_RECIPE.protocol_values("demo")["lr"]
        assert recipe.protocol_values("demo")["lr"] == (row.demo_lr if row.demo_lr is not None else noah), name
        assert recipe.lr_grid == NOAH_RECIPE.lr_grid  # only the demo lr differs
