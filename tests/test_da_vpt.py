"""DA-VPT (docs/methods/da-vpt.md, Noahsark/DA-VPT@1a5ac609): the forward and the extra loss equal the official
maths written out in float64 (models/vpt.py's prompt insertion, attn.py's separate q/k/v, criterion.py's proxy-anchor
loss, written here as loops); gradients reach exactly the trained tensors; the cosine k-means equals
model_creator.py's; the per-epoch re-clustering and its checkpoint state; the mapping job's class means and samples;
the counts (caltech101: 580,608 as the official formula gives); the stages run end to end."""
from __future__ import annotations

import copy
import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from helpers import plan_contexts, tiny_backbone_2x32
from petl_reference import build, gelu, inputs, layer_norm, linear, randomise

from peftbench.cli.params import count

OPTS = dict(proxies=3, guided=2, prompts=2, w_patch=0.7, w_cls=0.4, scale=5, cls="true", bias_k="true")


def model_of(tiny_backbone, **over):
    model = build("da-vpt", copy.deepcopy(tiny_backbone), num_classes=5, **{**OPTS, **over}).double()
    randomise(model)
    model.mapped.fill_(1)  # (as the mapping job's file does)
    return model


def official_forward(model, x, labels=None):
    """vpt.py:323-403 with attn.py's separate q, k, v Linears (the weights read from the model), and the loss of
    criterion.py at every guided block; returns (CLS feature, loss)."""
    p = {n: t.detach() for n, t in model.named_parameters()}
    vit = model.backbone
    patch = vit.patch_embed.patch_size[0]
    t = F.conv2d(x, p["backbone.patch_embed.proj.weight"], p["backbone.patch_embed.proj.bias"], stride=patch)
    t = torch.cat([p["backbone.cls_token"].expand(x.shape[0], -1, -1), t.flatten(2).transpose(1, 2)], dim=1)
    t = t + p["backbone.pos_embed"]
    img = t.shape[1] - 1
    depth, heads = len(vit.blocks), vit.blocks[0].attn.num_heads
    guided = list(range(depth - len(model.guided), depth))
    loss = torch.zeros((), dtype=x.dtype)
    for i in range(depth):
        pre = f"backbone.blocks.{i}."
        prompts = p["proxy_prompts"][guided.index(i)] if i in guided else p["other_prompts"][i]
        xin = torch.cat([t[:, :1], prompts.expand(x.shape[0], -1, -1), t[:, -img:]], dim=1)
        b, n, d = xin.shape
        h = layer_norm(xin, p[pre + "norm1.weight"], p[pre + "norm1.bias"])
        w = p[pre + "attn.qkv.weight"]
        q = linear(h, w[:d], p[pre + "attn.qkv.q_bias"])
        k = linear(h, w[d:2 * d], p[pre + "attn.qkv.k_bias"])
        v = linear(h, w[2 * d:], p[pre + "attn.qkv.v_bias"])
        split = lambda z: z.reshape(b, n, heads, d // heads).transpose(1, 2)  # noqa: E731
        att = torch.softmax(split(q) @ split(k).transpose(-2, -1) / math.sqrt(d // heads), dim=-1)
        o = (att @ split(v)).transpose(1, 2).reshape(b, n, d)
        t = xin + linear(o, p[pre + "attn.proj.weight"], p[pre + "attn.proj.bias"])
        h2 = layer_norm(t, p[pre + "norm2.weight"], p[pre + "norm2.bias"])
        t = t + linear(gelu(linear(h2, p[pre + "mlp.fc1.weight"], p[pre + "mlp.fc1.bias"])),
                       p[pre + "mlp.fc2.weight"], p[pre + "mlp.fc2.bias"])
        if labels is not None and i in guided:
            loss = loss + official_criterion(xin, prompts, labels, q, model)
    t = layer_norm(t, p["backbone.norm.weight"], p["backbone.norm.bias"])
    return t[:, 0], loss / len(guided)


def official_criterion(xin, prompts, labels, q, model):
    """criterion.py:406-433 (fast_selection, ml_patch_forward, ml_cls_forward), the proxy-anchor sums as loops."""
    num = prompts.shape[0]
    mapped = torch.tensor([int(model.mapping[int(c)]) for c in labels])
    patch = xin[:, 1 + num:].mean(dim=1)

    def anchor(feat):
        s = model.scale * F.normalize(feat, dim=-1) @ F.normalize(prompts, dim=-1).T  # (B, P)
        pos, neg = [], []
        for j in range(num):
            inside = mapped == j
            pos.append(torch.log(1 + torch.exp(-32 * (s[inside, j] - 0.1)).sum()) if inside.any() else s.new_zeros(()))
            neg.append(torch.log(1 + torch.exp(32 * (s[~inside, j] + 0.1)).sum()) if (~inside).any()
                       else s.new_zeros(()))
        return torch.stack(pos).mean() + torch.stack(neg).mean()

    return model.w_patch * anchor(patch) + model.w_cls * anchor(q[:, 0])


def test_forward_and_loss_equal_the_official_maths(tiny_backbone):
    model = model_of(tiny_backbone)
    model.mapping.copy_(torch.tensor([2, 0, 2, 1, 0]))
    x = torch.cat([inputs(0), inputs(1), inputs(2)])  # 6 images
    y = torch.tensor([0, 2, 4, 3, 0, 2])  # prompt 1 has one image; every prompt has positives and negatives
    model.eval()
    with torch.no_grad():
        got = model.features(x)
    want, _ = official_forward(model, x)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    model.train()
    model.start_epoch(0, 3)
    feats = model.features(x)
    loss = model.step_loss(y)
    want_feats, want_loss = official_forward(model, x, y)
    assert torch.allclose(feats, want_feats, rtol=0, atol=1e-12)
    assert torch.allclose(loss, want_loss, rtol=1e-12, atol=0) and loss > 0
    # a prompt without images of its group: its positive term is 0 (criterion.py:582-584)
    model.features(x[:2])
    few = model.step_loss(y[:2])
    assert torch.allclose(few, official_forward(model, x[:2], y[:2])[1], rtol=1e-12, atol=0)
    # evaluation adds nothing
    model.eval()
    model.features(x)
    assert model.step_loss(y) is None


def test_gradients_reach_exactly_the_trained_tensors(tiny_backbone):
    model = model_of(tiny_backbone)
    model.train()
    x, y = torch.cat([inputs(0), inputs(1)]), torch.tensor([0, 1, 2, 3])
    (F.cross_entropy(model(x), y) + model.step_loss(y)).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    blocks = {f"backbone.blocks.{i}.{t}" for i in range(3)
              for t in ("attn.qkv.k_bias", "attn.qkv.v_bias", "mlp.fc2.bias", "norm2.bias", "attn.proj.bias",
                        "norm1.weight", "norm1.bias")}
    assert got == blocks | {"backbone.patch_embed.proj.bias", "backbone.cls_token", "proxy_prompts", "other_prompts",
                            "head.weight", "head.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == got  # the q biases stay frozen
    # without the extra loss the guided prompts of the last block still train through the CE (they are attended to)
    other = model_of(tiny_backbone, w_patch=0, w_cls=0)
    other.train()
    other(x)
    assert other.step_loss(y) is None


def official_kmeans(data, k, centroids=None, tol=1e-4, max_iter=20):
    """model_creator.py:196-256, torch's global RNG."""
    zero = (data == 0).all(dim=1)
    rows = F.layer_norm(data[~zero], data[~zero].shape[1:])
    if centroids is None:
        centroids = rows[torch.randperm(rows.size(0))[:k]]
    for _ in range(max_iter):
        assign = F.cosine_similarity(rows[:, None], centroids[None, :], dim=2).argmax(dim=1)
        new = []
        for i in range(k):
            members = rows[assign == i]
            new.append(members.mean(dim=0) if members.size(0) > 0 else centroids[i])
        new = torch.stack(new)
        if torch.norm(centroids - new, dim=1).sum() < tol:
            break
        centroids = new
    out = torch.empty(data.size(0), dtype=torch.long)
    out[~zero] = assign
    out[zero] = torch.randint(k, (int(zero.sum()),))
    return centroids, out


def test_cosine_kmeans_equals_the_official_one():
    from peftbench.methods.da_vpt.model import cosine_kmeans

    g = torch.Generator().manual_seed(0)
    data = torch.randn(12, 16, generator=g, dtype=torch.float64) + torch.randn(3, 16, generator=g,
                                                                              dtype=torch.float64).repeat(4, 1)
    data[[4, 9]] = 0  # classes not seen this epoch
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        want_c, want_a = official_kmeans(data, 4)
        got_c, got_a = cosine_kmeans(data, 4, None, torch.Generator().manual_seed(seed))
        assert torch.equal(got_a, want_a) and torch.equal(got_c, want_c)
    warm = want_c + 0.05
    torch.manual_seed(7)
    want_c, want_a = official_kmeans(data, 4, warm)
    got_c, got_a = cosine_kmeans(data, 4, warm, torch.Generator().manual_seed(7))
    assert torch.equal(got_a, want_a) and torch.equal(got_c, want_c)


def test_the_epoch_means_recluster_warm_started_and_survive_a_checkpoint(tiny_backbone):
    from peftbench.methods.da_vpt.model import cosine_kmeans

    model = model_of(tiny_backbone, dynamic_from=1, proxies=2)
    model.train()
    x = torch.cat([inputs(0), inputs(1), inputs(2)])
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    model.start_epoch(0, 4)  # epoch 0 < dynamic_from: nothing collected
    model.features(x)
    model.step_loss(y)
    assert not model.class_count.any()
    model.start_epoch(1, 4)
    feats = []
    for part in (slice(0, 4), slice(4, 6)):
        feats.append(model.features(x[part]).detach())
        model.step_loss(y[part])
    feats = torch.cat(feats)
    means = torch.stack([feats[y == c].mean(0) for c in range(5)])
    assert torch.allclose(model.class_mean, means, rtol=1e-12, atol=1e-14)
    assert model.class_count.tolist() == [2, 1, 1, 1, 1]
    model.centroids.copy_(F.layer_norm(means[[0, 3]], (48,)))  # the warm start: two of the classes
    model.has_centroids.fill_(1)
    saved = {k: v.clone() for k, v in model.step_state().items()}
    want_c, want_a = cosine_kmeans(means, 2, model.centroids.clone(), torch.Generator())
    assert len(want_a.unique()) == 2
    model.start_epoch(2, 4)  # the end of epoch 1: re-cluster, warm-started, then a fresh epoch's means
    assert torch.equal(model.mapping, want_a) and torch.allclose(model.centroids, want_c, rtol=0, atol=1e-12)
    assert not model.class_count.any() and int(model.has_centroids) == 1
    # a clustering onto one prompt keeps the mapping and drops the centroids (vpt.py:275-287)
    before = model.mapping.clone()
    model.class_mean.copy_(means[[0]].repeat(5, 1))
    model.recluster(2)
    assert torch.equal(model.mapping, before) and int(model.has_centroids) == 0
    resumed = model_of(tiny_backbone, dynamic_from=1, proxies=2)
    resumed.load_step_state(saved, "test")
    resumed.start_epoch(2, 4)  # a run resumed after epoch 1 re-clusters the same way
    assert torch.equal(resumed.mapping, model.mapping) and torch.equal(resumed.centroids, model.centroids)


def test_one_prompt_per_class_when_the_task_has_fewer_classes(tiny_backbone):
    model = build("da-vpt", copy.deepcopy(tiny_backbone), num_classes=3, proxies=10)
    assert model.all_classes and model.num_proxies == 3 and model.mapping.tolist() == [0, 1, 2]
    assert not model.dynamic(5)  # train.py:187: no re-clustering then
    model.start_training(10)  # the identity mapping needs no job


def test_training_without_the_jobs_mapping_is_refused(tiny_backbone):


    model = build("da-vpt", copy.deepcopy(tiny_backbone), num_classes=5, proxies=2)
    with pytest.raises(ValueError, match="no class-to-prompt mapping loaded"):
        model.start_training(10)
    build("da-vpt", copy.deepcopy(tiny_backbone), num_classes=5, proxies=2, w_patch=0, w_cls=0).start_training(10)


def test_the_mapping_jobs_samples_and_class_means(tiny_backbone):
    from peftbench.data.images import Normalizer
    from peftbench.methods.da_vpt.method import class_means, class_samples

    labels = torch.tensor([0] * 14 + [1] * 3 + [2] * 10)
    picked = class_samples(labels, 3, 10, torch.Generator().manual_seed(0))
    assert Counter(labels[picked].tolist()) == {0: 10, 1: 10, 2: 10}
    assert len(set(picked[:10].tolist())) == 10  # without replacement where the class is large enough
    assert sorted(Counter(picked[10:20].tolist()).values()) == [3, 3, 4]  # 3 images: each 3 times, one of them once more
    model = build("da-vpt", copy.deepcopy(tiny_backbone), num_classes=3, proxies=2).double()
    images = torch.randint(0, 256, (27, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    norm = Normalizer((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), device="cpu")
    means = class_means(model, images, labels, picked, norm, "cpu", 7)
    vit = copy.deepcopy(tiny_backbone).double().eval()
    with torch.no_grad():
        f = vit.forward_head(vit.forward_features(norm(images[picked]).double()), pre_logits=True)
    want = torch.stack([f[labels[picked] == c].mean(0) for c in range(3)])
    assert torch.allclose(means, want, rtol=1e-10, atol=1e-12)


def test_counts_equal_the_formula_and_caltech101s_580608():
    from peftbench.methods.da_vpt.model import trained_count

    defaults = dict(bias_q=False, bias_k=False, bias_v=True, bias_fc2=True, bias_norm2=True, bias_proj=True,
                    norm1=True, cls=True)
    assert count("da-vpt", 100)["trainable_without_head"] == trained_count(12, 768, 1, 10, 20, defaults) == 233_472
    caltech = ["prompts=60", "bias_k=true", "proxies=10", "guided=1"]
    assert count("da-vpt", 102, sets=caltech)["trainable_without_head"] == 580_608  # notes/da-vpt.md's formula
    assert count("da-vpt", 100, sets=["guided=9", "proxies=20"])["trainable_without_head"] == trained_count(
        12, 768, 9, 20, 20, defaults)


def test_per_task_values_come_from_the_official_configs():
    from peftbench.methods import get_method
    from peftbench.tasks import get_task

    m = get_method("da-vpt")
    opts, sources = m.resolve_options(m.default_options(), get_task("cifar100"))
    assert (opts["proxies"], opts["guided"], opts["prompts"], opts["w_patch"], opts["w_cls"]) == (20, 9, 20, 1.0, 0.05)
    assert "vitb_cifar100.yaml" in sources["proxies"]
    opts, _ = m.resolve_options(m.default_options(), get_task("caltech101"))
    assert opts["w_patch"] == opts["w_cls"] == 0.0 and opts["prompts"] == 60 and opts["bias_k"] is True
    opts, sources = m.resolve_options(m.default_options(), get_task("svhn"))  # no vitb config
    assert opts["proxies"] == 10 and "default" in sources["proxies"]


def test_the_stages_plan_a_mapping_job_only_where_classes_are_clustered():
    from peftbench.sweep.drive import count_runs

    specs = count_runs(plan_contexts("da-vpt", "cifar100"))
    jobs = [s for s in specs if s.stage == "mapping"]
    assert jobs and all(s.job == "mapping" for s in jobs)
    split_job = {s.train_split: s for s in jobs}
    for s in specs:
        if s.stage != "mapping":
            assert s.extras["init_state"] == f"{split_job[s.train_split].key}.mapping.safetensors"
    specs = count_runs(plan_contexts("da-vpt", "patch_camelyon"))  # 2 classes < 10 proxies: one per class
    assert not [s for s in specs if s.stage == "mapping"] and all("init_state" not in s.extras for s in specs)


def test_pipeline_end_to_end(tmp_path, demo_root):
    from safetensors.torch import load_file

    from peftbench.api.schema import Sweep
    from peftbench.executors.local import LocalExecutor
    from peftbench.store import RunStore
    from peftbench.sweep.drive import drive
    from peftbench.sweep.plan import plan
    from peftbench.train.engine import Env

    settings = Sweep(methods=["da-vpt"], suite="demo", tasks=["demo_digits"], backbone=tiny_backbone_2x32(),
                     data_root=str(demo_root), save_weights="final", sets=["da-vpt.proxies=4", "da-vpt.prompts=2"],
                     **{"epochs": 3, "batch_size": 250, "lr": (0.01, 0.001)})
    (out,) = drive(plan(settings), LocalExecutor(Env(device="cpu", quiet=True, save_weights="final")),
                   RunStore(tmp_path / "runs"))
    assert out.error is None
    folder = tmp_path / "runs" / "da-vpt" / "demo_digits"
    recs = [json.loads(p.read_text()) for p in folder.glob("*.json") if p.stem.count(".") == 0]
    assert Counter(r["spec"]["stage"] for r in recs) == {"mapping": 2, "search": 2, "final": 1}
    assert all(r["status"] == "ok" for r in recs)
    (final,) = [r for r in recs if r["spec"]["stage"] == "final"]
    start = load_file(str(folder / final["spec"]["extras"]["init_state"]))
    assert start["mapping"].shape == (10,) and set(start["mapping"].tolist()) <= {0, 1, 2, 3}
    summary = json.loads((folder / f"{final['spec']['extras']['init_state'].split('.')[0]}.mapping.json").read_text())
    assert summary["images"] == 100 and summary["proxies"] == 4
