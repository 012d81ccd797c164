"""SSF, FacT-TT/TK, RepAdapter, DiffFit and LN-tune (docs/methods/{ssf,fact,repadapter,difffit,ln_tune}.md):
the forward equals a hand-written reference (the FacT update as the dense ΔW of the paper's formulas), exactly
the intended parameters train, the official inits, the ViT-B/16 parameter formulas, the per-task options, and
the merged plain timm ViT gives the same logits (float64, 1e-10) with exactly the backbone's parameters + head."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from petl_reference import build, inputs, linear, randomise, reference_features, tiny_kwargs, weights

from peftbench.cli.params import count
from peftbench.layers.merge import is_plain_timm
from peftbench.methods import get_method
from peftbench.tasks import get_task

C = 5
D, L, H = 768, 12, 3072  # ViT-B/16 width, depth, MLP width
HEAD = (D + 1) * 100
MERGEABLE = ["ssf", "fact-tt", "fact-tk", "repadapter", "difffit", "ln-tune"]



def reference_logits(ref, model, x, hooks):
    """Frozen weights from the untouched copy ``ref``; backbone tensors the method trains (biases, LayerNorms)
    from ``model`` wherever it keeps them under their plain timm names."""
    w = weights(ref)
    w.update({n: p.detach() for n, p in model.backbone.named_parameters() if n in w})
    return linear(reference_features(w, x, hooks, **tiny_kwargs(ref)), model.head.weight, model.head.bias)


def backbone_features(ref, x):
    return ref.forward_head(ref.forward_features(x), pre_logits=True)


# --- forward = reference ---------------------------------------------------------------------------


def test_ssf_forward_equals_reference(tiny_backbone):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    model = build("ssf", tiny_backbone).double()
    randomise(model)
    model.eval()
    vit = model.backbone

    def ss(pair, conv=False):  # y·gamma + beta over the output channels
        if conv:
            return lambda y: y * pair.scale.view(1, -1, 1, 1) + pair.shift.view(1, -1, 1, 1)
        return lambda *a: a[-1] * pair.scale + pair.shift

    hooks = {("patch",): ss(vit.patch_embed.proj, conv=True), ("norm",): ss(vit.norm)}
    for i, blk in enumerate(vit.blocks):
        hooks.update({("norm1", i): ss(blk.norm1), ("qkv", i): ss(blk.attn.qkv), ("proj", i): ss(blk.attn.proj),
                      ("norm2", i): ss(blk.norm2), ("fc1", i): ss(blk.mlp.fc1), ("fc2", i): ss(blk.mlp.fc2)})
    assert blk.attn.qkv.scale.shape == (144,) and blk.mlp.fc1.scale.shape == (192,)  # fused qkv; fc1 before GELU
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(ref, model, x, hooks), rtol=0, atol=1e-10)


def fact_dense_updates(model, tucker):
    """ΔW of every adapted Linear from the paper's formulas, written index by index (docs/methods/fact.md §2)."""
    f = model.fact
    U, V, r = f.u.weight, f.v.weight, f.rank
    k = 4  # MLP width / D of the tiny backbone
    out = {}
    for i, blk in enumerate(model.backbone.blocks):
        s = blk.attn.qkv.scale
        if tucker:
            cols = list(range((4 + 2 * k) * i, (4 + 2 * k) * (i + 1)))
            K = torch.einsum("abc,cm->abm", f.core, f.coeff[:, cols])  # (r, r, 4 + 2k)
            Gq, Gk, Gv, Go = (K[:, :, m].T for m in range(4))  # (U x) @ G_m  ->  weight G_m^T
            M = torch.zeros(r, k * r, dtype=U.dtype)
            N = torch.zeros(r, k * r, dtype=U.dtype)
            for b in range(r):
                for m in range(k):
                    M[:, k * b + m] = K[:, b, 4 + m]
                    N[:, k * b + m] = K[:, b, 4 + k + m]
            S1, S2 = M.T, N  # fc1: (U x) @ M; fc2: z @ N^T
        else:
            Gq, Gk, Gv = (c.weight for c in blk.attn.qkv.cores)
            Go, S1, S2 = blk.attn.proj.cores[0].weight, blk.mlp.fc1.cores[0].weight, blk.mlp.fc2.cores[0].weight
        out[("qkv", i)] = s * torch.cat([V @ G @ U for G in (Gq, Gk, Gv)], 0)
        out[("proj", i)] = s * V @ Go @ U
        out[("fc1", i)] = s * torch.cat([V @ S1[c * r:(c + 1) * r] @ U for c in range(k)], 0)
        out[("fc2", i)] = s * torch.cat([V @ S2[:, c * r:(c + 1) * r] @ U for c in range(k)], 1)
    return out


@pytest.mark.parametrize("name", ["fact-tt", "fact-tk"])
def test_fact_forward_equals_reference(tiny_backbone, name):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    model = build(name, tiny_backbone, rank=4, scale=2.5).double()
    randomise(model)
    model.eval()  # dropout off: the update is then W x + ΔW x
    deltas = fact_dense_updates(model, tucker=name == "fact-tk")
    hooks = {point: (lambda dw: lambda h, y: y + h @ dw.T)(dw) for point, dw in deltas.items()}
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(ref, model, x, hooks), rtol=0, atol=1e-10)
    assert model.backbone.blocks[0].mlp.fc1.chunks == 4


def repadapter_reference(a, s, groups):
    """h + s·(W_B (W_A h + a) + b), W_B dense and block-diagonal over the groups (built entry by entry)."""
    wa, ba = a.conv_a.weight[:, :, 0], a.conv_a.bias
    wg, bb = a.conv_b.weight[:, :, 0], a.conv_b.bias  # (D, d/g)
    dim, per = wg.shape
    wb = torch.zeros(dim, per * groups, dtype=wg.dtype)
    for o in range(dim):
        g = o // (dim // groups)
        for j in range(per):
            wb[o, g * per + j] = wg[o, j]
    return lambda h: h + s * (linear(linear(h, wa, ba), wb, bb))


@pytest.mark.parametrize("placement", ["both", "attn"])
def test_repadapter_forward_equals_reference(tiny_backbone, placement):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    model = build("repadapter", tiny_backbone, scale=0.7, placement=placement).double()
    randomise(model)
    model.eval()
    hooks = {}
    for i, blk in enumerate(model.backbone.blocks):  # on the normed tokens, before qkv / fc1
        hooks[("norm1", i)] = repadapter_reference(blk.attn.qkv.adapter, 0.7, 2)
        if placement == "both":
            hooks[("norm2", i)] = repadapter_reference(blk.mlp.fc1.adapter, 0.7, 2)
        else:
            assert isinstance(blk.mlp.fc1, torch.nn.Linear)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(ref, model, x, hooks), rtol=0, atol=1e-10)


def test_difffit_forward_equals_reference(tiny_backbone):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    model = build("difffit", tiny_backbone).double()
    randomise(model)  # biases, LayerNorms and the gammas
    model.eval()
    hooks = {}
    for i, blk in enumerate(model.backbone.blocks):  # x + γ1 ⊙ attn(norm1 x), then y + γ2 ⊙ mlp(norm2 y)
        hooks[("attn_branch", i)] = (lambda g: lambda x, h, f: g * f)(blk.ls1.gamma)
        hooks[("mlp_branch", i)] = (lambda g: lambda x, h, f: g * f)(blk.ls2.gamma)
    x = inputs()
    with torch.no_grad():
        got = model(x)
        torch.testing.assert_close(got, reference_logits(ref, model, x, hooks), rtol=0, atol=1e-10)
        stale = linear(reference_features(weights(ref), x, hooks, **tiny_kwargs(ref)), model.head.weight,
                       model.head.bias)
        assert not torch.allclose(got, stale)  # the tuned biases and LayerNorms are used


def test_ln_tune_forward_equals_reference(tiny_backbone):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    model = build("ln-tune", tiny_backbone).double()
    randomise(model)
    model.eval()
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(ref, model, x, {}), rtol=0, atol=1e-10)


# --- merged: a plain timm ViT with the same logits ---------------------------------------------------------


@pytest.mark.parametrize("name", MERGEABLE)
def test_merged_plain_vit_gives_the_same_logits(tiny_backbone, name):
    plain = {n: p.shape for n, p in tiny_backbone.named_parameters()}
    model = build(name, tiny_backbone).double()
    randomise(model)
    model.eval()
    x = inputs(1)
    with torch.no_grad():
        before = model(x)
        merged = model.merged()
        assert isinstance(merged, timm.models.vision_transformer.VisionTransformer) and is_plain_timm(merged)
        assert "merged" in model.inference_variants()
        torch.testing.assert_close(merged(x), before, rtol=0, atol=1e-10)
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # merging leaves the model as it was
    names = {n: p.shape for n, p in merged.named_parameters()}
    assert names == {**plain, "head.weight": torch.Size([C, 48]), "head.bias": torch.Size([C])}
    assert not merged.training and not any(p.requires_grad for p in merged.parameters())
    assert all(p.dtype == torch.float64 for p in merged.parameters())


# --- inits -------------------------------------------------------------------------------------------


def test_ssf_init(tiny_backbone):
    model = build("ssf", tiny_backbone)
    scales = torch.cat([p for n, p in model.named_parameters() if n.endswith(".scale")])
    shifts = torch.cat([p for n, p in model.named_parameters() if n.endswith(".shift")])
    assert scales.numel() == shifts.numel() == 2 * 48 + 3 * (48 * 4 + 144 + 192)
    assert abs(scales.mean() - 1) < 0.005 and 0.015 < scales.std() < 0.025  # N(1, 0.02)
    assert abs(shifts.mean()) < 0.005 and 0.015 < shifts.std() < 0.025  # N(0, 0.02)


@pytest.mark.parametrize("name", ["fact-tt", "fact-tk", "repadapter", "difffit", "ln-tune"])
def test_starts_as_the_backbone(tiny_backbone, name):
    ref = copy.deepcopy(tiny_backbone).eval()
    model = build(name, tiny_backbone).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.features(x), backbone_features(ref, x))


def test_fact_inits(tiny_backbone):
    tt = build("fact-tt", copy.deepcopy(tiny_backbone), rank=8)
    f = tt.fact
    assert f.u.weight.shape == (8, 48) and f.v.weight.shape == (48, 8) and torch.count_nonzero(f.v.weight) == 0
    assert f.u.weight.abs().max() <= 1 / math.sqrt(48)  # nn.Linear default: kaiming-uniform(a=√5)
    qkv, fc2 = tt.backbone.blocks[0].attn.qkv, tt.backbone.blocks[0].mlp.fc2
    assert [c.weight.shape for c in qkv.cores] == [(8, 8)] * 3 and fc2.cores[0].weight.shape == (8, 32)
    assert fc2.cores[0].weight.abs().max() <= 1 / math.sqrt(32) and qkv.dropout.p == pytest.approx(0.1)
    tk = build("fact-tk", tiny_backbone, rank=8)
    f = tk.fact
    assert f.core.shape == (8, 8, 8) and f.coeff.shape == (8, 12 * 3)  # (4 + 2·4) columns per block
    assert f.core.abs().max() <= math.sqrt(3) / 8 and f.coeff.abs().max() <= math.sqrt(6 / (36 + 8))  # xavier
    assert not hasattr(tk.backbone.blocks[0].attn.qkv, "cores")


def test_repadapter_init(tiny_backbone):
    model = build("repadapter", tiny_backbone)
    a = model.backbone.blocks[0].mlp.fc1.adapter
    assert a.conv_a.weight.shape == (8, 48, 1) and a.conv_b.weight.shape == (48, 4, 1) and a.conv_b.groups == 2
    assert a.conv_a.weight.abs().max() <= math.sqrt(6 / (48 + 8))  # xavier-uniform
    assert all(torch.count_nonzero(t) == 0 for t in (a.conv_a.bias, a.conv_b.weight, a.conv_b.bias))
    assert a.dropout.p == pytest.approx(0.1)


def test_difffit_gammas(tiny_backbone):
    model = build("difffit", tiny_backbone)
    for blk in model.backbone.blocks:
        assert torch.equal(blk.ls1.gamma, torch.ones(48)) and torch.equal(blk.ls2.gamma, torch.ones(48))
        assert isinstance(blk.ls1.base, torch.nn.Identity)


# --- what trains, modes ----------------------------------------------------------------------------


def _expected(name, model):
    names = [n for n, _ in model.named_parameters()]
    rules = {
        "ssf": lambda n: n.endswith((".scale", ".shift")),
        "fact-tt": lambda n: n.startswith("fact.") or ".cores." in n,
        "fact-tk": lambda n: n.startswith("fact."),
        "repadapter": lambda n: ".adapter." in n,
        "difffit": lambda n: n.endswith(("bias", ".gamma")) or ".norm" in n,
        "ln-tune": lambda n: ".norm" in n,
    }
    return {n for n in names if n.startswith("head.") or rules[name](n)}


@pytest.mark.parametrize("name,per_block,extra", [("ssf", 12, 4), ("fact-tt", 6, 2), ("fact-tk", 0, 4),
                                                  ("repadapter", 8, 0), ("difffit", 10, 3), ("ln-tune", 4, 2)])
def test_gradients_reach_exactly_the_trained_parameters(tiny_backbone, name, per_block, extra):
    model = build(name, tiny_backbone)
    expected = _expected(name, model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    torch.manual_seed(0)
    model.train()
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, C, (4,))).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == expected
    assert all(p.grad is None for n, p in model.named_parameters() if n not in expected)
    assert len(expected) == per_block * len(model.backbone.blocks) + extra + 2
    assert not model.backbone.training and not any(
        m.training for n, m in model.backbone.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)))


@pytest.mark.parametrize("name", ["fact-tt", "fact-tk", "repadapter"])
def test_dropout_in_train_mode_only(tiny_backbone, name):
    model = build(name, tiny_backbone)
    randomise(model)
    model.train()
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert drops and all(d.training and d.p == pytest.approx(0.1) for d in drops)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


def test_ln_tune_without_the_final_norm(tiny_backbone):
    model = build("ln-tune", tiny_backbone, final_norm="false")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone.norm.weight" not in trained and "backbone.blocks.2.norm2.bias" in trained


# --- per-task options --------------------------------------------------------------------------------


def test_per_task_rank_and_scale():
    def resolved(name, task, **raw):
        m = get_method(name)
        return m.resolve_options(m.parse_options(raw), get_task(task) if task else None)

    o, src = resolved("fact-tt", "cifar100")
    assert (o["rank"], o["scale"]) == (8, 1.0) and "FacT/configs/tt/<task>.yaml [cifar100]" in src["rank"]
    o, _ = resolved("fact-tt", "clevr_distance")
    assert (o["rank"], o["scale"]) == (4, 10.0)
    o, src = resolved("fact-tk", "svhn")
    assert (o["rank"], o["scale"]) == (32, 100.0) and "configs/tk" in src["scale"]
    o, src = resolved("fact-tk", "dtd", rank="8")
    assert (o["rank"], o["scale"]) == (8, 0.01) and "rank" not in src
    o, src = resolved("fact-tk", None)
    assert (o["rank"], o["scale"]) == (32, 10.0) and "default" in src["rank"]
    o, src = resolved("repadapter", "caltech101")
    assert o["scale"] == 5.0 and "configs/repblock/<task>.yaml" in src["scale"]
    o, src = resolved("repadapter", "caltech101", placement="attn")
    assert o["scale"] == 10.0 and "repattn" in src["scale"]
    o, src = resolved("repadapter", "demo_digits")
    assert o["scale"] == 1.0 and "default" in src["scale"]


# --- ViT-B/16 parameter counts ------------------------------------------------------------------------

K = H // D  # MLP chunks (4)
SSF_FORMULA = 2 * (L * (D + 3 * D + D + D + H + D) + 2 * D)  # norm1, qkv, proj, norm2, fc1, fc2; patch, norm
BIASES = D + L * (3 * D + D + H + D)  # patch_embed.proj, qkv, proj, fc1, fc2
LNS = 2 * D * (2 * L + 1)  # 25 LayerNorms


def fact_tt(r):
    return 2 * D * r + L * (4 * r * r + 2 * K * r * r)


def fact_tk(r):
    return 2 * D * r + r ** 3 + r * (4 + 2 * K) * L


def repadapter(adapters, d=8, g=2):
    return adapters * (D * d + d + D * d // g + D)


@pytest.mark.parametrize("name,sets,formula,added", [
    ("ssf", [], SSF_FORMULA, SSF_FORMULA),  # 205,824
    ("fact-tt", ["rank=8"], fact_tt(8), fact_tt(8)),  # 21,504
    ("fact-tt", ["rank=16"], fact_tt(16), fact_tt(16)),  # 61,440
    ("fact-tk", ["rank=32"], fact_tk(32), fact_tk(32)),  # 86,528
    ("fact-tk", ["rank=16"], fact_tk(16), fact_tk(16)),  # 30,976
    ("repadapter", [], repadapter(2 * L), repadapter(2 * L)),  # 239,808
    ("repadapter", ["placement=attn"], repadapter(L), repadapter(L)),  # 119,904
    ("difffit", [], BIASES + LNS + 2 * L * D, 2 * L * D),  # 140,544
    ("ln-tune", [], LNS, 0),  # 38,400
    ("ln-tune", ["final_norm=false"], LNS - 2 * D, 0),
])
def test_vit_b16_parameter_counts(name, sets, formula, added):
    out = count(name, 100, "vit_base_patch16_224", sets)
    assert out["trainable_without_head"] == formula
    assert out["head"] == HEAD and out["trainable"] == out["tuned"] == formula + HEAD
    assert out["total"] == count("linear", 100)["total"] + added


def test_vit_b16_numbers_in_the_docs():
    assert SSF_FORMULA == 205_824 and fact_tt(8) == 21_504 and fact_tt(16) == 61_440
    assert fact_tk(32) == 86_528 and fact_tk(16) == 30_976 and repadapter(24) == 239_808
    assert BIASES + LNS + 2 * L * D == 140_544 and LNS == 38_400
    assert BIASES + LNS // 2 == 102_912  # every bias, LayerNorm biases included: the BitFit count
    # FacT task averages over the 19 VTAB tasks with the official per-task ranks (the paper's 0.040M / 0.069M)
    from peftbench.methods.fact import FACT_TK_TASKS, FACT_TT_TASKS
    assert round(sum(fact_tt(r) for r, _ in FACT_TT_TASKS.values()) / 19) == 39_734
    assert round(sum(fact_tk(r) for r, _ in FACT_TK_TASKS.values()) / 19) == 68_985


def test_recipes():
    ssf = get_method("ssf").recipe
    assert ssf.optimizer == "adamw" and ssf.batch_size == 64 and ssf.wd_grid == (5e-5, 5e-2)
    assert sorted(round(lr * 64 / 256, 6) for lr in ssf.lr_grid) == [1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 5e-2]
    fgvc = ssf.suite_override("fgvc")
    assert sorted(round(lr / 4, 6) for lr in fgvc.values["lr_grid"]) == [2e-4, 2.5e-4, 1e-2, 2e-2]
    for name in ("fact-tt", "fact-tk", "repadapter"):
        r = get_method(name).recipe
        assert (r.optimizer, r.lr_grid, r.wd_grid, r.epochs, r.warmup_epochs) == ("adamw", (0.004,), (1e-4,), 100, 10)
    for name in ("difffit", "ln-tune"):
        r = get_method(name).recipe
        assert r.lr_grid == (0.004, 0.04) and r.wd_grid == (1e-4, 1e-3) and r.batch_size == 64
