"""SPT (docs/methods/spt.md): q/k/v on timm's fused qkv, the budget sweep against a direct re-implementation of the
official loop, the structured modules against explicit formulas, gradients, the released masks' parameter counts,
merging, the staged pipeline."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import plan_contexts

from peftbench.cli.params import count
from peftbench.layers.merge import is_plain_timm
from peftbench.methods.spt.method import RELEASED
from peftbench.methods.spt.model import SptLinear, SptModel
from peftbench.methods.spt.sensitivity import allocate, spt_tensors, structured_cost, sweep, unstructured_indices


def _backbone(depth=2):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=depth, num_heads=3, num_classes=0, global_pool="token")


def test_spt_tensors_are_row_blocks_of_the_fused_qkv():
    bb = _backbone()
    ts = {t.name: t for t in spt_tensors(bb)}
    assert len(ts) == 2 * 16 + 2 and "patch_embed.proj.weight" not in ts and "cls_token" not in ts
    W, b = bb.blocks[1].attn.qkv.weight, bb.blocks[1].attn.qkv.bias
    for s, op in enumerate("qkv"):
        t = ts[f"blocks.1.attn.{op}.weight"]
        assert torch.equal(W.reshape(-1)[t.offset:t.offset + t.numel].view(t.shape), W[48 * s:48 * (s + 1)])
        tb = ts[f"blocks.1.attn.{op}.bias"]
        assert torch.equal(b[tb.offset:tb.offset + tb.numel], b[48 * s:48 * (s + 1)])
    assert ts["blocks.0.norm1.weight"].kind == "vector" and not ts["blocks.0.norm1.weight"].linear
    assert ts["blocks.0.attn.proj.bias"].kind == "vector" and ts["blocks.0.mlp.fc1.weight"].kind == "matrix"


def test_structured_costs_on_vit_b16():
    assert structured_cost("lora", (768, 768), 8) == 12_288 and structured_cost("lora", (3072, 768), 8) == 30_720
    assert structured_cost("adapter", (768, 768), 8) == 13_064 and structured_cost("adapter", (3072, 768), 8) == 52_232
    assert structured_cost("adapter", (768, 3072), 8) == 13_064


def _official_sweep(scores, tensors, kind, rank, alpha, beta, cls, scale, targets):
    """The official loop, written out: for each j a fresh topk of ceil(0.02 j 1e6 scale) entries, per-tensor sums,
    the structured / vector / unstructured rules, and the closest budget per target (ties -> later j)."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    sizes = [t.numel for t in tensors]
    best = {k: (0.0, None) for k in targets}
    for j in range(1, 80):
        tau = min(math.ceil(j * 0.02 * 1e6 * scale), flat.numel())
        mask = torch.zeros_like(flat)
        mask[flat.topk(tau).indices] = 1.0
        parts = mask.split(sizes)
        u = s_ = 0
        structured, vectors, unstructured = [], [], {}
        for t, m in zip(tensors, parts):
            n = int(m.sum())
            if "norm" in t.name or "bias" in t.name:
                if len(t.shape) == 1 and n >= t.shape[0] / beta:
                    vectors.append(t.name)
                    s_ += t.shape[0]
                    continue
            else:
                out_dim, in_dim = t.shape
                c = rank * (in_dim + out_dim) if kind == "lora" else 2 * rank * out_dim + rank + out_dim
                if n >= c / alpha:
                    structured.append(t.name.rsplit(".", 1)[0])
                    s_ += c
                    continue
            if n:
                unstructured[t.name] = torch.nonzero(m).squeeze(1)
            u += n
        total = (u + s_ + cls) / 1e6 / scale
        for k in targets:
            if abs(total - k) <= abs(best[k][0] - k):
                best[k] = (total, (structured, vectors, unstructured))
    return best


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_budget_sweep_equals_the_official_loop(kind):
    torch.manual_seed(0)
    tensors = spt_tensors(_backbone(depth=3))
    # heavy-tailed scores (like squared gradients) with a few hot tensors, so all three decisions happen
    hot = {"blocks.1.norm2.weight": 1e6, "blocks.2.attn.proj.bias": 1e6, "blocks.0.attn.v.weight": 1e3,
           "blocks.2.mlp.fc1.weight": 30.0}
    scores = [torch.rand(t.shape).pow(8) * hot.get(t.name, 1.0) for t in tensors]
    scale = sum(t.numel for t in tensors) / 85_056_000
    targets = (1.0, 0.4, 0.2, 0.05)
    got, tid, pos = sweep(scores, tensors, kind, rank=4, alpha=10, beta=5, cls_params=48, scale=scale, targets=targets)
    want = _official_sweep(scores, tensors, kind, 4, 10, 5, 48, scale, targets)
    seen = [False, False, False]
    assert set(got) == {k for k in targets if want[k][1] is not None}
    for k in got:
        total, (structured, vectors, unstructured) = want[k]
        a = got[k]
        assert a.budget == pytest.approx(total) and a.structured == structured and a.vectors == vectors
        idx = unstructured_indices(a, tensors, tid, pos)
        assert set(idx) == set(unstructured)
        for name, i in unstructured.items():
            assert torch.equal(idx[name], i), name
        seen = [a or bool(b) for a, b in zip(seen, (structured, vectors, unstructured))]
    assert seen == [True, True, True]  # the test exercises every rule


def test_allocation_rules_at_the_thresholds():
    by = {t.name: t for t in spt_tensors(_backbone(depth=1))}
    q, nb = by["blocks.0.attn.q.weight"], by["blocks.0.norm1.bias"]
    # q: 48x48, LoRA r=2 costs 2*(48+48) = 192 -> structured from 19.2 entries; norm1.bias: 48 -> full from 9.6
    a = allocate([q, nb], [20, 10], 0, "lora", 2, 10, 5, 48)
    assert a.structured == ["blocks.0.attn.q"] and a.vectors == ["blocks.0.norm1.bias"] and a.unstructured == {}
    assert a.budget == pytest.approx((192 + 48 + 48) / 1e6)
    a = allocate([q, nb], [19, 9], 0, "lora", 2, 10, 5, 48)
    assert a.structured == [] and a.vectors == [] and a.unstructured == {q.name: 19, nb.name: 9}
    assert a.budget == pytest.approx((28 + 48) / 1e6)


def _selection():
    return {"structured": ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.0.attn.proj", "blocks.1.mlp.fc1",
                           "blocks.1.mlp.fc2"],
            "vectors": ["blocks.0.attn.k.bias", "blocks.1.norm2.weight", "blocks.0.mlp.fc1.bias"],
            "unstructured": {"blocks.0.attn.k.weight": 7, "blocks.1.attn.q.bias": 3, "blocks.0.norm1.weight": 5,
                             "blocks.1.mlp.fc2.bias": 4}}


def _model(kind, seed=0, selection=None, **kw):
    torch.manual_seed(seed)
    m = SptModel(_backbone(), 5, kind, selection or _selection(), rank=4, **kw).double()
    g = torch.Generator().manual_seed(seed)
    for pname, d in m.deltas.items():  # distinct random entries inside each part's own tensor
        idx = []
        for name, n, full in m.delta_parts[pname]:
            t = m.tensors[name]
            idx.append(t.offset + (torch.arange(n) if full else torch.randperm(t.numel, generator=g)[:n].sort().values))
        d.index.copy_(torch.cat(idx))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return m


def test_structured_modules_follow_the_official_formulas():
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    lora = _model("lora").eval()
    qkv = lora.backbone.blocks[0].attn.qkv
    assert isinstance(qkv, SptLinear) and set(qkv.branches) == {"q", "v"}
    base = qkv.base(x)
    with torch.no_grad():
        got = qkv(x)
        for s, k in ((0, "q"), (2, "v")):  # LoRA: W u + b + B A u on the q and v rows
            b = qkv.branches[k]
            assert torch.allclose(got[..., 48 * s:48 * (s + 1)], base[..., 48 * s:48 * (s + 1)]
                                  + x @ b.down.weight.T @ b.up.weight.T, atol=1e-12)
        assert torch.equal(got[..., 48:96], base[..., 48:96])
    ad = _model("adapter").eval()
    qkv, fc1 = ad.backbone.blocks[0].attn.qkv, ad.backbone.blocks[1].mlp.fc1
    proj = ad.backbone.blocks[0].attn.proj
    with torch.no_grad():
        base = qkv.base(x)
        b = qkv.branches["v"]  # adapter on the output: v' = v + Up(GELU(Down v))
        v = base[..., 96:]
        assert torch.allclose(qkv(x)[..., 96:], v + F.gelu(v @ b.down.weight.T + b.down.bias) @ b.up.weight.T
                              + b.up.bias, atol=1e-12)
        b = proj.branches["proj"]  # proj: in parallel from the input o
        assert torch.allclose(proj(x), proj.base(x) + F.gelu(x @ b.down.weight.T + b.down.bias) @ b.up.weight.T
                              + b.up.bias, atol=1e-12)
        h = torch.randn(2, 5, 48, dtype=torch.float64)
        f = fc1.base(h)
        b = fc1.branches["fc1"]
        assert torch.allclose(fc1(h), f + F.gelu(f @ b.down.weight.T + b.down.bias) @ b.up.weight.T + b.up.bias,
                              atol=1e-12)


@pytest.mark.parametrize("kind,calls", [("lora", 1), ("adapter", 2)])
def test_dropout_masks_qkv_lora_shares_one_adapters_draw_one_each(kind, calls):
    m = _model(kind)
    qkv = m.backbone.blocks[0].attn.qkv
    n = []
    qkv.dropout.register_forward_hook(lambda mod, a, out: n.append(1))
    m.train()
    qkv(torch.randn(2, 5, 48, dtype=torch.float64))
    assert len(n) == calls  # q and v branches: LoRA one shared input mask, adapters one per output slice


def test_only_selected_tensors_get_gradients():
    m = _model("lora").float()
    m.train()
    F.cross_entropy(m(torch.randn(2, 3, 32, 32)), torch.tensor([0, 4])).backward()
    got = {n for n, p in m.named_parameters() if p.grad is not None}
    assert {"head.weight", "head.bias", "backbone.cls_token", "backbone.blocks.1.norm2.weight",
            "backbone.blocks.0.mlp.fc1.bias"} <= got
    assert any("branches.q.down" in n for n in got) and any("branches.fc2.up" in n for n in got)
    assert not any(n.endswith("original") or "norm1" in n or "patch_embed" in n or "pos_embed" in n for n in got)
    # the k bias (a full vector inside the fused bias) and 3 q-bias entries: one delta of 48 + 3 on qkv.bias
    assert m.deltas["blocks.0.attn.qkv.bias"].delta.numel() == 48
    assert m.deltas["blocks.1.attn.qkv.bias"].delta.numel() == 3
    assert "blocks.0.norm1.weight" not in m.deltas  # LayerNorm entries: counted, not tuned
    c = m.parameter_counts()
    assert c["tuned"] - c["trainable"] == 5 == c["untrained_norm_entries"]


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_selection_artifact_keys_name_the_models_buffers(kind, tmp_path):
    """The sensitivity stage names the entry indices before the model exists (index_buffer_key); a Linear that
    also gets structured modules (block 0's qkv: q and v structured, deltas on its bias) is wrapped, its
    deltas under ``.base``. The demo suite's final runs failed on exactly this ("do not exist in the model")."""
    from safetensors.torch import save_file

    from peftbench.methods.spt.model import index_buffer_key
    from peftbench.train.build import load_trainable

    sel = _selection()
    m = _model(kind, selection=sel)
    names = m.index_buffer_names()
    assert "blocks.0.attn.qkv.bias" in names and ".base." in names["blocks.0.attn.qkv.bias"]  # the wrapped case
    assert {p: index_buffer_key(p, sel) for p in m.deltas} == names
    assert set(names.values()) <= set(m.state_dict())
    g = torch.Generator().manual_seed(3)
    state = {key: torch.randperm(m.deltas[p].numel, generator=g)[:m.deltas[p].index.numel()].sort().values
             for p, key in names.items()}
    save_file(state, str(tmp_path / "sel.safetensors"))
    fresh = SptModel(_backbone(), 5, kind, sel, rank=4)
    load_trainable(fresh, tmp_path / "sel.safetensors")
    for p, key in names.items():
        assert torch.equal(fresh.deltas[p].index, state[key])


def test_merged_spt_lora_is_a_plain_vit_with_the_same_logits():
    m = _model("lora").eval()
    merged = m.inference_variants()["merged"]
    assert is_plain_timm(merged)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(merged(x), m(x), atol=1e-10, rtol=0)
    assert _model("adapter").merged() is None


def test_released_masks_reproduce_their_budgets_on_vit_b16():
    """Every summarised official mask: SPT's budget count (unstructured incl. LayerNorm entries + structured + vectors
    + cls token) equals the budget the mask records, params x 1e6; trainable = that minus the untrained LayerNorm
    entries, + head. Two spot values from the official masks: cifar100 B = 0.4."""
    masks = json.loads(RELEASED.read_text())["masks"]
    assert len(masks) == 2 * 19 * 4
    for key in ("lora:cifar100@0.4", "adapter:cifar100@0.4", "lora:dtd@0.2", "adapter:smallnorb_elevation@0.8",
                "lora:kitti_distance@0.6"):
        kind, rest = key.split(":")
        c = count(f"spt-{kind}", 10, sets=[f"selection=released:{rest}"])
        assert c["spt_budget"] == round(masks[key]["params"] * 1e6), key
        assert c["trainable"] == c["tuned"] - c["untrained_norm_entries"]
    c = count("spt-lora", 100, sets=["selection=released:cifar100@0.4"])
    assert (c["trainable_without_head"], c["structured_matrices"], c["untrained_norm_entries"]) == (380_738, 14, 171)
    c = count("spt-adapter", 100, sets=["selection=released:cifar100@0.4"])
    assert (c["trainable_without_head"], c["structured_matrices"]) == (422_662, 17)
    # the official supervised SPT-Adapter script trains adapters on the LoRA masks
    assert count("spt-adapter", 100, sets=["selection=released:lora:cifar100@0.4"])["trainable_without_head"] == 419_250


def test_dry_run_stages():
    from peftbench.sweep.drive import count_runs

    specs = count_runs(plan_contexts("spt-lora", "dtd"))
    assert Counter(s.stage for s in specs) == {"sensitivity": 1, "search": 4, "final": 5}
    (job,) = [s for s in specs if s.stage == "sensitivity"]
    assert job.train_split == "train800" and job.hparams == {"batch_size": 32}
    search = [s for s in specs if s.stage == "search"]
    assert sorted(s.options["budget"] for s in search) == [0.2, 0.4, 0.6, 0.8]
    for s in search:
        assert s.extras["init_state"] == f"{job.key}.selection-{s.options['budget']}.safetensors"
        assert s.hparams["lr"] == 0.001 and s.hparams["wd"] == 0.0001 and s.hparams["lr_scaling"] is False
    specs = count_runs(plan_contexts("spt-adapter", "dtd", sets=("budget=0.6",)))
    assert Counter(s.stage for s in specs) == {"sensitivity": 1, "final": 5}
    specs = count_runs(plan_contexts("spt-lora", "demo_digits", "demo"))
    assert Counter(s.stage for s in specs) == {"sensitivity": 1, "final": 1}


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
    settings = Sweep(methods=["spt-lora"], suite="demo", tasks=["demo_digits"], backbone=name,
                             data_root=str(demo_root), sets=["low_rank_dim=2"],
                             **{"epochs": 1, "batch_size": 250, "lr": (0.01, 0.001)})
    (out,) = drive(plan(settings), LocalExecutor(Env(device="cpu", quiet=True)), RunStore(tmp_path / "runs"))
    assert out.error is None
    folder = tmp_path / "runs" / "spt-lora" / "demo_digits"
    recs = [json.loads(p.read_text()) for p in folder.glob("*.json") if p.stem.count(".") == 0]
    assert Counter(r["spec"]["stage"] for r in recs) == {"sensitivity": 1, "search": 2, "final": 1}
    assert all(r["status"] == "ok" for r in recs)
    (sens,) = [r for r in recs if r["spec"]["stage"] == "sensitivity"]
    assert sens["sensitivity"]["num_batches"] == 16 and sens["sensitivity"]["num_images"] == 512
    (final,) = [r for r in recs if r["spec"]["stage"] == "final"]
    sel = final["spec"]["options"]["selection"]
    assert sel["from"] == sens["key"] and sel == {**sens["selections"]["0.4"], "budget": 0.4, "from": sens["key"]}
    entries = load_file(str(folder / final["spec"]["extras"]["init_state"]))
    total = sum(v.numel() for v in entries.values())
    linear = sum(c for n, c in sel["unstructured"].items() if "norm" not in n)
    full_slices = sum(32 for n in sel["vectors"] if ".attn.q." in n or ".attn.k." in n or ".attn.v." in n)
    assert total == linear + full_slices == final["params"]["selected_weight_entries"]
    assert all(len(set(v.tolist())) == v.numel() for v in entries.values())  # distinct entries
