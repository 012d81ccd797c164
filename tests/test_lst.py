"""LST on a ViT (docs/methods/lst.md, ylsung/Ladder-Side-Tuning@1798e82): the forward equals a direct float64
computation of the ladder; the Fisher importance equals a hand loop of one-image gradients; the pruning equals a
transcription of the official ``pruning_without_residual`` (version 2) loop, tensor for tensor; what trains, and that
the backbone records no graph; the counts; the stages (a Fisher job per training split, the runs loading their split's
side network) run end to end."""
from __future__ import annotations

import copy
import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from helpers import plan_contexts, tiny_backbone_2x32
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


def ref_block(p: dict, pre: str, t: torch.Tensor, heads: int) -> torch.Tensor:
    """A pre-norm ViT block written out (timm's Block, no layer scale)."""
    b, n, d = t.shape
    hd = d // heads
    h = layer_norm(t, p[pre + "norm1.weight"], p[pre + "norm1.bias"])
    q, k, v = linear(h, p[pre + "attn.qkv.weight"], p[pre + "attn.qkv.bias"]).reshape(b, n, 3, heads, hd).permute(
        2, 0, 3, 1, 4)
    o = (torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
    t = t + linear(o, p[pre + "attn.proj.weight"], p[pre + "attn.proj.bias"])
    h2 = layer_norm(t, p[pre + "norm2.weight"], p[pre + "norm2.bias"])
    return t + linear(gelu(linear(h2, p[pre + "mlp.fc1.weight"], p[pre + "mlp.fc1.bias"])), p[pre + "mlp.fc2.weight"],
                      p[pre + "mlp.fc2.bias"])


def test_forward_equals_the_ladder_written_out(tiny_backbone):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    model = build("lst", tiny_backbone, side_layers="0,2").double()
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
    e = torch.cat([w["cls_token"].expand(2, -1, -1), e], dim=1) + w["pos_embed"]
    s = linear(e, p["first_down.weight"], p["first_down.bias"])
    for i in (0, 2):
        g = torch.sigmoid(p[f"gates.{i}"] / 0.1)
        s = g * s + (1 - g) * linear(outs[i], p[f"downs.{i}.weight"], p[f"downs.{i}.bias"])
        s = ref_block(p, f"side.{i}.", s, heads=3)
    h = linear(layer_norm(s, p["side_norm.weight"], p["side_norm.bias"]), p["up.weight"], p["up.bias"])[:, 0]
    with torch.no_grad():
        got = model(x)
    expect = linear(h, p["head.weight"], p["head.bias"])
    assert torch.allclose(got, expect, rtol=0, atol=1e-12), (got - expect).abs().max()


def test_init_what_trains_no_backbone_graph_and_the_counts(tiny_backbone):
    torch.manual_seed(0)
    model = build("lst", copy.deepcopy(tiny_backbone))  # auto on 3 blocks: blocks 1 and 2 (0 % 4 == 0 is dropped)
    assert model.side_layers == [1, 2] and model.side["1"].attn.num_heads == 3
    assert model.side["1"].attn.qkv.weight.shape == (18, 6) and model.side["1"].mlp.fc1.weight.shape == (24, 6)
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"first_down", "downs", "gates", "side", "side_norm", "up", "head"}
    for lin in (model.first_down, model.downs["1"], model.up):  # N(0, 0.01²), bias 0
        assert 0.005 < lin.weight.std() < 0.015 and not lin.bias.any()
    assert all(g.item() == 0.0 for g in model.gates.values())
    assert blocks_in_graph(model) == [False, False, False]  # no backward through the backbone
    model.zero_grad()
    model(inputs().float()).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    d, m, D = 96, 384, 768  # ViT-B/16, r = 8, 9 side blocks
    block = 2 * d + 3 * d * d + 3 * d + d * d + d + 2 * d + d * m + m + m * d + d
    expect = 10 * (D * d + d) + 9 * block + 9 + 2 * d + d * D + D
    assert count("lst", 100)["trainable_without_head"] == expect == 1_819_497
    assert count("lst", 100, sets=["side_layers=all"])["trainable_without_head"] == expect + 3 * (D * d + d + block + 1)


@pytest.mark.parametrize("raw, message", [("12", "outside"), ("1-x", "not auto"), ("", "not auto")])
def test_side_layers_and_widths_are_checked(tiny_backbone, raw, message):
    with pytest.raises(ValueError, match=message):
        build("lst", tiny_backbone, side_layers=raw) if raw != "12" else build("lst", tiny_backbone, side_layers="1,12")
    with pytest.raises(ValueError, match="does not divide"):
        build("lst", tiny_backbone, reduction=5)
    with pytest.raises(ValueError, match="multiple of the backbone's 3 heads"):
        build("lst", tiny_backbone, reduction=12)  # 48 / 12 = 4 channels for 3 heads


def test_fisher_equals_a_hand_loop(tiny_backbone):
    from peftbench.methods.lst.model import fisher_importance

    model = build("lst", copy.deepcopy(tiny_backbone)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 3, 3, 1])
    got = fisher_importance(model, [(x[i:i + 1], y[i:i + 1]) for i in range(4)], lambda t: t)
    plain, head = copy.deepcopy(tiny_backbone).double().eval(), copy.deepcopy(model.head)
    expect = {n: torch.zeros_like(p) for n, p in plain.named_parameters()}
    for i in range(4):
        plain.zero_grad()
        F.cross_entropy(head(plain.forward_head(plain.forward_features(x[i:i + 1]), pre_logits=True)), y[i:i + 1]).backward()
        for n, p in plain.named_parameters():
            expect[n] += p.grad ** 2
    assert set(got) == {"patch_embed.proj.weight"} | {f"blocks.{i}.{w}" for i in range(3) for w in
                                                      ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight",
                                                       "mlp.fc2.weight")}
    for n, v in got.items():
        assert torch.allclose(v, expect[n], rtol=1e-12, atol=0), n
    assert not any(p.requires_grad for p in model.backbone.parameters())  # put back frozen


def official_pruning_v2(state: dict, importance: dict, reduction: int, depth: int) -> dict:
    """pruning_methods.py:394-562 (``pruning_without_residual``, version 2, one pass) transcribed for the encoder
    of a ViT: T5's names mapped (shared.weight -> the patch embedding; SelfAttention q, k, v -> the three thirds of
    qkv; o -> proj; DenseReluDense wi, wo -> fc1, fc2; the ViT's biases follow their weight), T5's loop kept: the
    LNStrategy of Torch-Pruning (argsort of the L1 norms, the first round(amount·n) pruned) and select_weights'
    set difference."""
    amount = 1 - 1 / reduction

    def strategy(weights):
        n = len(weights)
        l1 = torch.norm(weights.reshape(n, -1), p=1, dim=1)
        return torch.sort(torch.argsort(l1)[:round(amount * n)])[0].tolist()

    def select(weights, idxs):
        return weights[list(set(range(len(weights))) - set(idxs))]

    split = {}
    for i in range(depth):
        for part in ("weight", "bias"):
            for name, t in zip("qkv", state[f"blocks.{i}.attn.qkv.{part}"].chunk(3)):
                split[f"blocks.{i}.attn.{name}.{part}"] = t
            if part == "weight":
                for name, t in zip("qkv", importance[f"blocks.{i}.attn.qkv.weight"].chunk(3)):
                    split[f"imp.blocks.{i}.attn.{name}.weight"] = t
    order: list = ["shared"]
    for i in range(depth):
        b = f"blocks.{i}."
        order += [b + "norm1", [b + "attn.q", b + "attn.k", b + "attn.v"], [b + "attn.proj"], b + "norm2",
                  [b + "mlp.fc1"], [b + "mlp.fc2"]]
    order.append("norm")
    out: dict = {}
    idx: list = []
    for layer in order:
        if isinstance(layer, list):
            ws = [split.get(f"{s}.weight", state.get(f"{s}.weight")) for s in layer]
            bs = [split.get(f"{s}.bias", state.get(f"{s}.bias")) for s in layer]
            ims = [split.get(f"imp.{s}.weight", importance.get(f"{s}.weight")) for s in layer]
            ws = [select(w.T, idx).T for w in ws]
            ims = [select(m.T, idx).T for m in ims]
            prod = 1
            for m in ims:
                prod = prod * m
            idx = strategy(prod)
            for s, w, bias in zip(layer, ws, bs):
                out[f"{s}.weight"], out[f"{s}.bias"] = select(w, idx), select(bias, idx)
        elif layer == "shared":
            idx = strategy(importance["patch_embed.proj.weight"])  # importance.T of [V, d]: one row per channel
        else:
            out[f"{layer}.weight"], out[f"{layer}.bias"] = select(state[f"{layer}.weight"], idx), select(
                state[f"{layer}.bias"], idx)
    for i in range(depth):  # q, k, v back into one qkv
        for part in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([out.pop(f"blocks.{i}.attn.{n}.{part}") for n in "qkv"])
    return out


def test_pruning_equals_the_official_loop(tiny_backbone):
    from peftbench.methods.lst.model import prune_side_weights

    bb = copy.deepcopy(tiny_backbone).double()
    state = weights(bb)
    g = torch.Generator().manual_seed(2)
    imp = {n: torch.rand(t.shape, dtype=torch.float64, generator=g) for n, t in state.items() if t.dim() >= 2}
    got = prune_side_weights(bb, imp, 8)
    expect = official_pruning_v2(state, imp, 8, 3)
    assert set(got) == set(expect)
    for n, v in expect.items():
        assert torch.equal(got[n], v), n
    assert got["blocks.0.attn.qkv.weight"].shape == (18, 6) and got["blocks.2.mlp.fc2.weight"].shape == (6, 24)


def test_the_pruned_weights_load_into_the_side_network(tiny_backbone):
    from peftbench.methods.lst.method import side_from_importance
    from peftbench.train.build import copy_into

    model = build("lst", copy.deepcopy(tiny_backbone))
    imp = {n: torch.rand(t.shape) for n, t in model.backbone.named_parameters() if t.dim() >= 2}
    state = side_from_importance(model, imp)
    assert set(state) == {n for n in model.trainable_state() if n.startswith(("side.", "side_norm."))}
    copy_into(model, state, "test")
    assert torch.equal(model.side["2"].attn.qkv.weight, state["side.2.attn.qkv.weight"])


def test_the_stages_plan_a_fisher_job_per_training_split():
    from peftbench.sweep.drive import count_runs

    specs = count_runs(plan_contexts("lst", "caltech101"))
    assert Counter(s.stage for s in specs) == {"fisher": 1, "final": 5}
    (job,) = [s for s in specs if s.stage == "fisher"]
    assert job.train_split == "train800val200" and job.job == "fisher" and job.hparams["batch_size"] == 1
    assert all(s.extras["init_state"] == f"{job.key}.side.safetensors" for s in specs if s.stage == "final")


def test_pipeline_end_to_end(tmp_path, demo_root):
    from safetensors.torch import load_file

    from peftbench.api.schema import Sweep
    from peftbench.executors.local import LocalExecutor
    from peftbench.store import RunStore
    from peftbench.sweep.drive import drive
    from peftbench.sweep.plan import plan
    from peftbench.train.engine import Env

    settings = Sweep(methods=["lst"], suite="demo", tasks=["demo_digits"], backbone=tiny_backbone_2x32(),
                     data_root=str(demo_root), save_weights="final", sets=["lst.fisher_samples=40"],
                     **{"epochs": 1, "batch_size": 250, "lr": (0.01, 0.001)})
    (out,) = drive(plan(settings), LocalExecutor(Env(device="cpu", quiet=True, save_weights="final")),
                   RunStore(tmp_path / "runs"))
    assert out.error is None
    folder = tmp_path / "runs" / "lst" / "demo_digits"
    recs = [json.loads(p.read_text()) for p in folder.glob("*.json") if p.stem.count(".") == 0]
    assert Counter(r["spec"]["stage"] for r in recs) == {"fisher": 2, "search": 2, "final": 1}
    assert all(r["status"] == "ok" for r in recs)
    (final,) = [r for r in recs if r["spec"]["stage"] == "final"]
    side = load_file(str(folder / final["spec"]["extras"]["init_state"]))
    assert side["side.1.attn.qkv.weight"].shape == (12, 4)  # width 32 / 8, 2 blocks: side block 1 only
    summary = json.loads((folder / f"{final['spec']['extras']['init_state'].split('.')[0]}.side.json").read_text())
    assert summary["num_images"] == 40 and summary["side_layers"] == [1]
