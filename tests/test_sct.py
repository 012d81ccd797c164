"""SCT (docs/methods/sct.md, showlab/SCT@384cecb): the forward equals a direct float64 computation of the official
maths; the saliency score equals a hand loop over the pretrained ViT's norm2 inputs; the top-K rule and its tie
break; the counts; the stages (a saliency job per training split, the runs loading their split's selection) run end
to end, and a saved model carries its selection."""
from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
from helpers import plan_contexts, tiny_backbone_2x32
from petl_reference import build, inputs, linear, randomise, reference_features, tiny_kwargs, weights

from peftbench.cli.params import count


def test_forward_equals_the_official_maths(tiny_backbone):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    model = build("sct", tiny_backbone, channels=5).double()
    randomise(model)
    g = torch.Generator().manual_seed(3)
    for blk in model.sct_blocks():  # a selection of 5 of the 48 channels, different per block
        blk.index.copy_(torch.randperm(48, generator=g)[:5].sort().values)
    model.eval()

    def attn_branch(i):
        blk = model.sct_blocks()[i]

        def hook(t, h, f):  # returns what is added to the stream: the attention output, then SCT on the sum
            a = t + f
            sel = a[..., blk.index]
            delta = torch.zeros_like(a)
            delta[..., blk.index] = linear(sel, blk.linear.weight, blk.linear.bias)
            return f + delta
        return hook

    x = inputs()
    hooks = {("attn_branch", i): attn_branch(i) for i in range(len(model.sct_blocks()))}
    expect = linear(reference_features(weights(ref), x, hooks, **tiny_kwargs(ref)), model.head.weight, model.head.bias)
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got, expect, rtol=0, atol=1e-12), (got - expect).abs().max()


def test_init_what_trains_and_the_counts(tiny_backbone):
    torch.manual_seed(0)
    model = build("sct", copy.deepcopy(tiny_backbone))  # auto: 48 / 8 = 6 channels
    assert model.channels == 6
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"backbone.blocks.{i}.linear.{t}" for i in range(3) for t in ("weight", "bias")} | \
        {"head.weight", "head.bias"}
    w = torch.cat([b.linear.weight.flatten() for b in model.sct_blocks()])
    assert 0.01 < w.std() < 0.03 and all(not b.linear.bias.any() for b in model.sct_blocks())  # trunc-normal 0.02
    assert count("sct", 100)["trainable_without_head"] == 12 * (96 * 96 + 96) == 111_744
    assert count("sct", 100)["trainable"] == 188_644  # the official log's "number of extra params" for CIFAR-100
    assert count("sct", 100, sets=["channels=48"])["trainable_without_head"] == 12 * (48 * 48 + 48)
    with pytest.raises(ValueError, match="within the block's width"):
        build("sct", tiny_backbone, channels=49)


def test_saliency_equals_a_hand_loop_and_ignores_the_modules(tiny_backbone):
    from peftbench.methods.sct.model import saliency, top_channels

    plain = copy.deepcopy(tiny_backbone).double().eval()
    model = build("sct", tiny_backbone, channels=4).double()
    randomise(model)  # the SCT modules are off during the pass: the score is the pretrained ViT's
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 2, 2, 0, 2, 5])
    scores, classes = saliency(model, [(x[:4], y[:4]), (x[4:], y[4:])], lambda t: t)
    assert classes == [0, 2, 5]
    feats = []
    hooks = [b.norm2.register_forward_pre_hook(lambda m, a: feats.append(a[0][:, 1:])) for b in plain.blocks]
    with torch.no_grad():
        plain.forward_features(x)
    for h in hooks:
        h.remove()
    for i, h in enumerate(feats):  # h: (6 images, 16 patch tokens, 48 channels)
        per_class = [torch.sqrt((h[y == c] ** 2).sum(dim=(0, 1))) for c in (0, 2, 5)]
        assert torch.allclose(scores[i], torch.stack(per_class).mean(0), rtol=1e-12, atol=0)
    top = top_channels(scores, 4)
    assert torch.equal(top[0], torch.topk(scores[0], 4).indices.sort().values)
    assert all(b.enabled for b in model.sct_blocks())  # switched back on


def test_ties_at_the_boundary_go_to_the_lower_channel():
    from peftbench.methods.sct.model import top_channels

    s = torch.tensor([[3.0, 1.0, 2.0, 2.0, 5.0, 2.0]])  # the official strict threshold keeps {0, 4} for K = 3 and 4
    assert top_channels(s, 3).tolist() == [[0, 2, 4]] and top_channels(s, 4).tolist() == [[0, 2, 3, 4]]


def test_the_stages_plan_a_saliency_job_per_training_split():
    """(With a search, one per split: the end-to-end test below.)"""
    from peftbench.sweep.drive import count_runs

    specs = count_runs(plan_contexts("sct", "caltech101"))  # NOAH's fixed point: no search, one selection
    assert Counter(s.stage for s in specs) == {"saliency": 1, "final": 5}
    jobs = {s.train_split: s for s in specs if s.stage == "saliency"}
    assert set(jobs) == {"train800val200"} and all(s.job == "saliency" for s in jobs.values())
    for s in specs:
        if s.stage != "saliency":
            assert s.extras["init_state"] == f"{jobs[s.train_split].key}.selection.safetensors"


def test_pipeline_end_to_end_and_a_saved_model_carries_its_selection(tmp_path, demo_root):
    from safetensors.torch import load_file

    from peftbench.api.schema import Sweep
    from peftbench.executors.local import LocalExecutor
    from peftbench.store import RunStore
    from peftbench.sweep.drive import drive
    from peftbench.sweep.plan import plan
    from peftbench.train.engine import Env

    name = tiny_backbone_2x32()
    settings = Sweep(methods=["sct"], suite="demo", tasks=["demo_digits"], backbone=name, data_root=str(demo_root),
                     save_weights="final", **{"epochs": 1, "batch_size": 250, "lr": (0.01, 0.001)})
    (out,) = drive(plan(settings), LocalExecutor(Env(device="cpu", quiet=True, save_weights="final")),
                   RunStore(tmp_path / "runs"))
    assert out.error is None
    folder = tmp_path / "runs" / "sct" / "demo_digits"
    recs = [json.loads(p.read_text()) for p in folder.glob("*.json") if p.stem.count(".") == 0]
    assert Counter(r["spec"]["stage"] for r in recs) == {"saliency": 2, "search": 2, "final": 1}
    assert all(r["status"] == "ok" for r in recs)
    (final,) = [r for r in recs if r["spec"]["stage"] == "final"]
    sel = load_file(str(folder / final["spec"]["extras"]["init_state"]))
    assert set(sel) == {"backbone.blocks.0.index", "backbone.blocks.1.index"}
    assert all(v.shape == (4,) and torch.equal(v, v.sort().values) for v in sel.values())  # 32 / 8 channels
    summary = json.loads((folder / f"{final['spec']['extras']['init_state'].split('.')[0]}.selection.json").read_text())
    assert summary["K"] == 4 and summary["num_images"] == 1000 and summary["classes"] == 10
    saved = load_file(str(folder / final["weights"]))
    assert all(torch.equal(saved[k], sel[k]) for k in sel)  # the model's own selection travels with its weights
