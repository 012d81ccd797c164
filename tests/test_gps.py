"""GPS (docs/methods/gps.md): the contrastive loss and the top-K rule against direct computations, the sparse
training against the official dense masked-gradient Adam, gradients, counts, merging, the staged pipeline."""
from __future__ import annotations

import copy
import json
import math
from collections import Counter

import pytest
import timm
import torch
from helpers import plan_contexts

from peftbench.cli.params import count
from peftbench.layers.merge import is_plain_timm
from peftbench.methods.gps.model import GpsModel, flat_index, parameter_role, top_k_per_row
from peftbench.methods.gps.selection import accumulate_gradients, supcon_loss
from peftbench.train.optim import build_optimizer


def _backbone():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=2, num_heads=3, num_classes=0, global_pool="token")


def test_supcon_loss_equals_the_definition():
    torch.manual_seed(0)
    B, D, tau = 5, 7, 0.07
    f = torch.randn(2 * B, D, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2, 1])
    z = [v / v.norm() for v in f]
    labels = list(y) + list(y)
    total = 0.0
    for a in range(2 * B):
        den = math.log(sum(math.exp(float(z[a] @ z[j]) / tau) for j in range(2 * B) if j != a))
        pos = [p for p in range(2 * B) if p != a and labels[p] == labels[a]]
        total += -sum(float(z[a] @ z[p]) / tau - den for p in pos) / len(pos)
    assert supcon_loss(f, y).item() == pytest.approx(total / (2 * B), rel=1e-6)


def test_top_k_per_row_is_the_official_argsort_rule():
    torch.manual_seed(0)
    g = torch.randn(6, 11)
    for K in (1, 3):
        got = top_k_per_row(g, K)
        want = torch.argsort(g.abs(), dim=1)[:, -K:].sort(dim=1).values  # last K of the ascending |g| order
        assert torch.equal(got, want)
        assert torch.equal(flat_index(got, 11), (torch.arange(6)[:, None] * 11 + got).reshape(-1))
    conv = torch.randn(4, 3, 2, 2)  # a conv weight is selected on its (out, C*kh*kw) view
    assert torch.equal(top_k_per_row(conv, 2), top_k_per_row(conv.reshape(4, 12), 2))


def test_selection_rule_by_parameter_name():
    roles = {n: parameter_role(n, p) for n, p in _backbone().named_parameters()}
    assert roles["patch_embed.proj.weight"] == roles["blocks.0.attn.qkv.weight"] == "select"
    assert roles["blocks.1.mlp.fc2.weight"] == roles["blocks.0.attn.proj.weight"] == "select"
    assert roles["blocks.0.attn.qkv.bias"] == roles["patch_embed.proj.bias"] == roles["blocks.1.mlp.fc1.bias"] == "full"
    assert {roles[n] for n in roles if "norm" in n or n in ("cls_token", "pos_embed")} == {"frozen"}


def _with_selection(model: GpsModel, seed: int = 0) -> GpsModel:
    g = torch.Generator().manual_seed(seed)
    for pname, d in model.deltas.items():
        rows, cols = model.shapes[pname]
        cols_sel = torch.stack([torch.randperm(cols, generator=g)[:model.K].sort().values for _ in range(rows)])
        d.index.copy_(flat_index(cols_sel, cols))
    return model


def _weight(model, pname):
    return model.backbone.get_parameter(pname) if "parametrizations" in pname else model.backbone.get_submodule(
        pname.rsplit(".", 1)[0]).weight


def test_sparse_training_equals_the_official_dense_masked_adam():
    """Official: every tensor trainable, gradients of unselected entries zeroed after backward, Adam, no weight
    decay. peftbench: only δ at the selected entries. Same weights after several steps (float64)."""
    torch.manual_seed(0)
    backbone = _backbone().double()
    ours = _with_selection(GpsModel(copy.deepcopy(backbone), 4, K=2).double())
    dense = copy.deepcopy(backbone)
    head = copy.deepcopy(ours.head)
    masks = {}
    for pname, d in ours.deltas.items():
        W = dense.get_parameter(pname)
        m = torch.zeros(W.numel(), dtype=torch.bool)
        m[d.index] = True
        masks[pname] = m.view_as(W)
    trainable = [p for n, p in dense.named_parameters() if parameter_role(n, p) != "frozen"] + list(head.parameters())
    for n, p in dense.named_parameters():
        p.requires_grad = parameter_role(n, p) != "frozen"
    opt_dense = torch.optim.Adam(trainable, lr=1e-2)
    opt_ours = build_optimizer("adamw", ours, 1e-2, 0.0)
    dense.eval(), ours.train()
    for step in range(3):
        x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
        y = torch.tensor([0, 1, 2, 3])
        loss = torch.nn.functional.cross_entropy(head(dense.forward_head(dense.forward_features(x), pre_logits=True)), y)
        opt_dense.zero_grad()
        loss.backward()
        for pname, m in masks.items():
            dense.get_parameter(pname).grad.mul_(m)  # NativeScaler.maks_gradient
        opt_dense.step()
        opt_ours.zero_grad()
        torch.nn.functional.cross_entropy(ours(x), y).backward()
        opt_ours.step()
    with torch.no_grad():
        for pname, m in masks.items():
            got, want = _weight(ours, pname), dense.get_parameter(pname)
            assert torch.allclose(got, want, atol=1e-12, rtol=0), pname
            assert torch.equal(got[~m], backbone.get_parameter(pname)[~m])  # unselected entries exactly pretrained
            assert (got[m] != backbone.get_parameter(pname)[m]).all()
        for n, p in dense.named_parameters():
            if parameter_role(n, p) == "full":
                assert torch.allclose(ours.backbone.get_parameter(n), p, atol=1e-12)
        assert torch.allclose(ours.head.weight, head.weight, atol=1e-12)


def test_only_deltas_biases_and_head_get_gradients():
    model = GpsModel(_backbone(), 3, K=1, drop_path=0.1)
    model.train()
    assert model.drop_paths and all(m.training for m in model.drop_paths) and not model.backbone.blocks[0].attn.training
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2])).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    want = {n for n, p in model.named_parameters() if n.startswith("head.") or n.endswith(".delta")
            or (n.endswith("bias") and "norm" not in n)}
    assert got == want
    assert not any("original" in n or "norm" in n or n.endswith(("cls_token", "pos_embed")) for n in got)


def test_gradient_stage_sums_the_batch_gradients():
    torch.manual_seed(0)
    model = GpsModel(_backbone().double(), 3, K=1).double()
    pname = "blocks.0.attn.qkv.weight"
    W = model.backbone.blocks[0].attn.qkv.parametrizations.weight.original
    data = [(torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 0, 2])) for _ in range(3)]
    views = iter([d[0] * s for d in data for s in (1.0, 0.5)])  # deterministic "augmentations"
    model.eval()
    grads, stats = accumulate_gradients(model, {pname: W}, data, lambda x: next(views), lambda v: v)
    assert stats["num_batches"] == 3 and not W.requires_grad and W.grad is None
    ref_model = copy.deepcopy(model.backbone)  # the direct computation on the dense weight
    want = torch.zeros_like(W)
    for x, y in data:
        w = ref_model.blocks[0].attn.qkv.parametrizations.weight.original
        w.requires_grad_(True)
        f = ref_model.forward_head(ref_model.forward_features(torch.cat([x, 0.5 * x])), pre_logits=True)
        want += torch.autograd.grad(supcon_loss(f, y), w)[0]
    assert torch.allclose(grads[pname], want, atol=1e-12)


def test_merged_model_is_a_plain_vit_with_the_same_logits():
    torch.manual_seed(0)
    model = _with_selection(GpsModel(_backbone(), 5, K=2, drop_path=0.2)).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    merged = model.inference_variants()["merged"]
    assert is_plain_timm(merged)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(merged(x), model(x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("K,weights", [(1, 83_712), (2, 167_424), (20, 1_674_240)])
def test_vit_b16_counts(K, weights):
    c = count("gps", 100, sets=[f"K={K}"])
    assert c["selected_weight_entries"] == weights  # K x (768 + 12 x (2304 + 768 + 3072 + 768)) output rows
    assert c["tuned_biases"] == 83_712
    assert c["trainable"] == c["tuned"] == weights + 83_712 + 769 * 100
    assert c["total"] == 85_798_656 + 769 * 100  # in-place updates: counted once
    # everything but the 25 LayerNorms, cls_token and pos_embed
    assert c["official_dense_gradient"] == 85_798_656 - 25 * 1_536 - 768 - 197 * 768 + 769 * 100


def test_dry_run_stages():
    from peftbench.sweep.drive import count_runs

    specs = count_runs(plan_contexts("gps", "caltech101"))
    assert Counter(s.stage for s in specs) == {"gradients": 2, "search": 8, "final": 5}
    grads = {s.train_split: s for s in specs if s.stage == "gradients"}
    assert set(grads) == {"train800", "train800val200"} and all(s.job == "gradients" for s in grads.values())
    for s in specs:
        if s.stage != "gradients":
            assert s.extras["init_state"] == f"{grads[s.train_split].key}.selection.safetensors"
            assert s.hparams["batch_size"] == 16 and s.hparams["lr_scaling"] is False  # released caltech101 script
            assert s.hparams["optimizer"] == "adamw" and s.hparams["wd"] == 0.0
    assert grads["train800"].options == {"K": 1, "drop_path": 0.0}
    specs = count_runs(plan_contexts("gps", "nabirds"))
    assert {s.options["K"] for s in specs} == {20}
    specs = count_runs(plan_contexts("gps", "demo_digits", "demo"))
    assert Counter(s.stage for s in specs) == {"gradients": 1, "final": 1}


def test_pipeline_end_to_end(tmp_path, demo_root):
    from helpers import tiny_backbone_2x32
    from safetensors.torch import load_file

    from peftbench.api.schema import Sweep
    from peftbench.executors.local import LocalExecutor
    from peftbench.store import RunStore
    from peftbench.sweep.drive import drive
    from peftbench.sweep.plan import plan
    from peftbench.train.engine import Env

    name = tiny_backbone_2x32()
    settings = Sweep(methods=["gps"], suite="demo", tasks=["demo_digits"], backbone=name,
                             data_root=str(demo_root), **{"epochs": 1, "batch_size": 250,
                                                                  "lr": (0.01, 0.001)})
    (out,) = drive(plan(settings), LocalExecutor(Env(device="cpu", quiet=True)), RunStore(tmp_path / "runs"))
    assert out.error is None
    folder = tmp_path / "runs" / "gps" / "demo_digits"
    recs = [json.loads(p.read_text()) for p in folder.glob("*.json") if p.stem.count(".") == 0]
    assert Counter(r["spec"]["stage"] for r in recs) == {"gradients": 2, "search": 2, "final": 1}
    assert all(r["status"] == "ok" for r in recs)
    (final,) = [r for r in recs if r["spec"]["stage"] == "final"]
    sel = load_file(str(folder / final["spec"]["extras"]["init_state"]))
    key = "backbone.blocks.1.mlp.fc1.parametrizations.weight.0.index"
    assert sel[key].shape == (128,)  # 128 output rows x K = 1
    cols = sel[key] % 32
    assert torch.equal(sel[key] // 32, torch.arange(128)) and cols.unique().numel() > 1  # one entry per row
    assert final["params"]["selected_weight_entries"] == final["params"]["trainable_without_head"] - final[
        "params"]["tuned_biases"]
