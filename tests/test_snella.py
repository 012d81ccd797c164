"""SNELLA (docs/methods/snella.md, ssfgunner/SNELL@e9d5185): the forward equals a direct float64 computation of the
official maths (SNELL's kernel mixed with α·softmax(K/γ) + β, sparsified at every matrix's own s_m, always; dense for
the mixk variant); the allocator equals a transcription of sparse_allocator.py step for step; a run trains through
the loop's hooks, moves the sparsities to the target on average, and resumes bit for bit; counts, per-task values, no
decay on the 1-d scalars."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_data_root
from petl_reference import build, inputs, linear, randomise, reference_features, tiny_kwargs, weights

from peftbench.cli.params import count
from peftbench.tasks import get_task


def kernel_reference(d) -> torch.Tensor:
    """MixK.pathIntegrals / SNELLA.pathIntegrals: the signed distance kernels, then + α·softmax(K/γ, dim=-1) + β."""
    a, b = d.a.detach(), d.b.detach()
    k = 0.1 * torch.cdist(a[0], b[0]) - 0.1 * torch.cdist(a[1], b[1])
    return k + d.alpha.detach() * torch.softmax(k / d.gamma.detach(), dim=-1) + d.beta.detach()


def update_reference(d, dense: bool) -> torch.Tensor:
    k = kernel_reference(d)
    if dense:
        return k
    tau = float(np.quantile(k.abs().numpy(), d.sparsity))  # (torch.quantile's linear interpolation)
    return torch.where(k.abs() > tau, k * k.abs(), torch.zeros_like(k))


def layer_hook(layer, dense):
    def hook(x, y):
        return y + x @ torch.cat([update_reference(d, dense) for d in layer.deltas], dim=1)
    return hook


@pytest.mark.parametrize("variant", ["snella", "mixk"])
def test_forward_equals_the_official_maths(tiny_backbone, variant):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    model = build("snella", tiny_backbone, rank=4, variant=variant, init_sparsity=0.0, target_sparsity=0.5).double()
    randomise(model, std=0.5)
    gen = torch.Generator().manual_seed(3)
    deltas = [m for layer in model.backbone.modules() if hasattr(layer, "deltas") for m in layer.deltas]
    if variant == "snella":  # every matrix its own s_m (what the allocator sets), 0 included
        for d in deltas:
            d.sparsity = float(torch.rand((), generator=gen, dtype=torch.float64)) * 0.9
        deltas[0].sparsity = 0.0
    model.eval()
    hooks = {}
    for i, blk in enumerate(model.backbone.blocks):
        for name, layer in (("qkv", blk.attn.qkv), ("proj", blk.attn.proj), ("fc1", blk.mlp.fc1), ("fc2", blk.mlp.fc2)):
            hooks[(name, i)] = layer_hook(layer, variant == "mixk")
    w = weights(ref)
    w["cls_token"] = model.backbone.cls_token.detach()
    x = inputs()
    expect = linear(reference_features(w, x, hooks, **tiny_kwargs(ref)), model.head.weight, model.head.bias)
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got, expect, rtol=0, atol=1e-12), (got - expect).abs().max()
    if variant == "snella":  # at s = 0 SNELLA still keeps K'·|K'| (all but the least entry), unlike SNELL's KLoRA
        k = kernel_reference(deltas[0])
        upd = deltas[0].update().detach()
        assert (upd == 0).sum() == 1 and torch.allclose(upd[upd != 0], (k * k.abs())[upd != 0])


class OfficialAllocator:
    """sparse_allocator.py (ssfgunner/SNELL@e9d5185) ``Allocator`` with ``metric='ipt'``, restated line by line for
    this test: ``modules`` are (name, module with In_Qs, Out_Qs, init_thres, in_features, out_features)."""

    def __init__(self, modules, target_ratio, init_warmup, final_warmup, mask_interval, beta1, beta2, total_step):
        self.modules = modules
        self.initial_warmup, self.final_warmup, self.mask_interval = init_warmup, final_warmup, mask_interval
        self.beta1, self.beta2, self.total_step = beta1, beta2, total_step
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}
        self.init_nonzero_param = 0
        self.target_nonzero_param = 0
        self.name_list, self.max_alloc_list = [], []
        for name, m in modules:
            self.name_list.append(name)
            self.max_alloc_list.append(m.in_features * m.out_features)
            self.init_nonzero_param += (1 - m.init_thres) * m.in_features * m.out_features
            self.target_nonzero_param += (1 - target_ratio) * m.in_features * m.out_features

    def schedule_threshold(self, step):
        if step <= self.initial_warmup:
            return self.init_nonzero_param, False
        if step > self.total_step - self.final_warmup:
            return self.target_nonzero_param, True
        mul_coeff = 1 - (step - self.initial_warmup) / (self.total_step - self.final_warmup - self.initial_warmup)
        curr = self.target_nonzero_param + (self.init_nonzero_param - self.target_nonzero_param) * (mul_coeff ** 3)
        return int(curr), step % self.mask_interval == 0

    def update_ipt(self):
        for name, m in self.modules:
            for key, p in ((f"{name}.In_Qs", m.In_Qs), (f"{name}.Out_Qs", m.Out_Qs)):
                if key not in self.ipt:
                    self.ipt[key] = torch.zeros_like(p)
                    self.exp_avg_ipt[key] = torch.zeros_like(p)
                    self.exp_avg_unc[key] = torch.zeros_like(p)
                with torch.no_grad():
                    self.ipt[key] = (p * p.grad).abs().detach()
                    self.ipt[key] = torch.where(torch.isnan(self.ipt[key]), torch.full_like(self.ipt[key], 0),
                                                self.ipt[key])
                    self.exp_avg_ipt[key] = self.beta1 * self.exp_avg_ipt[key] + (1 - self.beta1) * self.ipt[key]
                    self.exp_avg_unc[key] = self.beta2 * self.exp_avg_unc[key] + \
                        (1 - self.beta2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs()

    def param_alloc(self, scores, curr_volume, max_alloc_volumes):
        alloc_volumes = (curr_volume * scores).squeeze().int()
        alloc_volumes = torch.min(max_alloc_volumes, alloc_volumes)
        alloc_delta = curr_volume - torch.sum(alloc_volumes)
        while alloc_delta > 0:
            volume_remain = max_alloc_volumes - alloc_volumes
            idx = torch.nonzero(volume_remain).squeeze()
            alloc_volumes[idx] += torch.min((alloc_delta * scores[idx] / torch.sum(scores[idx])).squeeze(),
                                            volume_remain[idx])
            alloc_delta = curr_volume - torch.sum(alloc_volumes)
        return alloc_volumes.int()

    def update(self, step):
        curr_volume, mask_ind = self.schedule_threshold(step)
        if not mask_ind:
            return
        scores = []
        for name, m in self.modules:
            a = (self.exp_avg_ipt[f"{name}.In_Qs"] * self.exp_avg_unc[f"{name}.In_Qs"]).mean()
            b = (self.exp_avg_ipt[f"{name}.Out_Qs"] * self.exp_avg_unc[f"{name}.Out_Qs"]).mean()
            scores.append(a + b)
        scores = torch.Tensor(scores)
        scores = scores / torch.sum(scores)
        alloc = self.param_alloc(scores, curr_volume, torch.Tensor(self.max_alloc_list).squeeze())
        for (name, m), v in zip(self.modules, alloc.tolist()):
            m.init_thres = min(max(1 - float(v / (m.in_features * m.out_features)), 0), 1)


class Shim:
    """An official-looking view of one of our matrices (the official loops read these attributes)."""

    def __init__(self, d):
        self.In_Qs, self.Out_Qs = d.a, d.b
        self.in_features, self.out_features = d.d_in, d.d_out
        self.init_thres = d.sparsity


def test_the_allocator_is_the_official_one_step_for_step(tiny_backbone):
    torch.manual_seed(0)
    model = build("snella", tiny_backbone, rank=4, variant="snella", init_sparsity=0.01, target_sparsity=0.7)
    alloc = model.allocator
    official = OfficialAllocator([(n, Shim(d)) for n, d in alloc.deltas], 0.7, 0, 0, 1, 0.85, 0.85, 5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    gen = torch.Generator().manual_seed(1)
    for epoch in range(5):
        model.start_epoch(epoch, 5)
        official.update(epoch)
        assert [s.init_thres for _, s in official.modules] == model.sparsities()
        for step in range(3):
            x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 5, (4,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            model.after_step(epoch * 3 + step)
            official.update_ipt()
            for k in official.exp_avg_ipt:
                assert torch.equal(official.exp_avg_ipt[k], alloc.exp_avg_ipt[k])
                assert torch.equal(official.exp_avg_unc[k], alloc.exp_avg_unc[k])
    s = np.array(model.sparsities())
    sizes = np.array([d.d_in * d.d_out for _, d in alloc.deltas])
    assert len(set(s.round(6))) > 3  # the matrices got different sparsities
    kept = ((1 - s) * sizes).sum() / sizes.sum()
    # epoch 4 of 5: V = V_T + (V_0 - V_T)·(1/5)³, about the target's 30 % kept
    v0, vt = 0.99, 0.3
    assert kept == pytest.approx(vt + (v0 - vt) * (1 / 5) ** 3, abs=2e-3)


def test_counts_per_task_values_and_no_decay_on_the_scalars(tiny_backbone):
    from peftbench.methods import get_method
    from peftbench.train.optim import build_optimizer

    assert count("snella", 100)["trainable_without_head"] == 165_888 * 32 + 768 + 72 * 3
    m = get_method("snella")
    for task, want in {"cifar100": ("snella", 0.8, 0.01), "caltech101": ("mixk", None, None),
                       "dtd": ("snella", 0.93, 0.01)}.items():
        opts, sources = m.resolve_options(m.parse_options({}), get_task(task))
        assert opts["variant"] == want[0] and "snella32" in sources["variant"]
        if want[1] is not None:
            assert (opts["target_sparsity"], opts["init_sparsity"]) == want[1:]
    opts, sources = m.resolve_options(m.parse_options({}), get_task("cub200"))
    assert (opts["variant"], opts["target_sparsity"], opts["init_sparsity"]) == ("snella", 0.63, 0.01)
    model = build("snella", tiny_backbone, rank=4)
    scalars = {n for n, p in model.named_parameters() if p.requires_grad and p.ndim == 1 and "head" not in n}
    assert scalars and all(n.endswith((".alpha", ".gamma", ".beta")) for n in scalars)
    opt = build_optimizer("adamw", model, 1e-3, 0.01)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    params = dict(model.named_parameters())
    assert not any(id(params[n]) in decayed for n in scalars) and id(model.backbone.cls_token) not in decayed


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("toydata"))


def test_a_run_moves_the_sparsities_and_resumes_bit_for_bit(data_root, tmp_path):
    from test_engine_store import FAST, Interrupt, records, sweep

    from peftbench.store import RunStore
    from peftbench.train.engine import Env
    from peftbench.train.loop import OnEpoch

    settings = dict(FAST, options={"snella": {"rank": "4", "variant": "snella", "target_sparsity": "0.6",
                                              "init_sparsity": "0.01"}}, save_weights="final")
    _, ref = sweep(data_root, tmp_path / "ref", methods=["snella"], env=Env(quiet=True), **settings)

    def kill(spec, entry):
        if entry["epoch"] == 1:
            raise Interrupt()

    with pytest.raises(Interrupt):
        sweep(data_root, tmp_path / "runs", methods=["snella"], env=Env(quiet=True, hooks=[OnEpoch(kill)]), **settings)
    sweep(data_root, tmp_path / "runs", methods=["snella"], **settings)
    (done,), (want,) = records(RunStore(tmp_path / "runs")), records(ref)
    assert done["status"] == "ok" and done["attempts"] == 2
    assert done["history"] == want["history"] and done["metrics"] == want["metrics"]
    from safetensors.torch import load_file

    (weights_file,) = (tmp_path / "ref").rglob("*.final.safetensors")
    sparsities = [v.item() for k, v in load_file(str(weights_file)).items() if k.endswith(".s_m")]
    assert len(sparsities) == 3 * 6 and len(set(sparsities)) > 1  # the trained state carries each matrix's s_m
    assert math.isclose(float(np.mean(sparsities)), 0.6, abs_tol=0.25)
