"""E^2VPT pruning + rewinding: masks, importance scores, candidate grid, the staged pipeline (resume)."""
import json
import math

import pytest
import torch
from torch import nn

from peftbench.methods import get_method
from peftbench.methods.e2vpt.model import E2vptPruneModel
from peftbench.methods.e2vpt.pruning import (
    SEGMENTS,
    candidate_patterns,
    dense_mask,
    make_pattern,
    mask_importance,
    segment_counts,
    segment_index,
    token_counts,
)
from peftbench.train.loop import OnEpoch


def _pattern(P: int) -> dict:
    # tokens 1 and 3 pruned; token k keeps all but segments {k, k+5} (mod 16)
    return {"pruned_tokens": [1, 3], "pruned_segments": [sorted({k % 16, (k + 5) % 16}) for k in range(P)]}


@pytest.mark.parametrize("layout", ["interleaved", "contiguous"])
def test_masks_zero_exactly_the_specified_entries(tiny_backbone, layout):
    P, D, depth = 5, 48, 3  # tiny: width 48 -> 3 channels per segment
    pattern = _pattern(P)
    model = get_method("e2vpt-prune").build(tiny_backbone, 4, {"prompt_tokens": P, "kv_tokens": 2, "mask": pattern,
                                                                "segment_layout": layout})
    assert isinstance(model, E2vptPruneModel)
    expected = torch.ones(P, D)
    for k in range(P):
        for d in range(D):
            seg = d % 16 if layout == "interleaved" else d // (D // 16)  # code: d mod 16; paper: 16 chunks
            if k in pattern["pruned_tokens"] or seg in pattern["pruned_segments"][k]:
                expected[k, d] = 0.0
    assert torch.equal(model.prompt_mask().detach(), expected)
    # what enters every block: the prompt slots are the masked prompts (eval mode: no dropout)
    seen = []
    for block in model.backbone.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, 1:1 + P].detach().clone()))
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    prompts = [model.prompt_embeddings[0]] + list(model.deep_prompt_embeddings)
    assert len(seen) == depth
    for got, p in zip(seen, prompts):
        assert torch.equal(got, (p.detach() * expected).expand(2, -1, -1))
    # soft masking counts (docs/methods/e2vpt.md §5): zeros per layer = D·n_tok + (P − n_tok)·2 segments·3 channels
    zeros = D * 2 + (P - 2) * 2 * 3
    c = model.parameter_counts()
    assert c["pruned_prompt_entries"] == depth * zeros
    assert c["kept_prompt_entries"] == depth * P * D - depth * zeros
    assert c["tuned"] == c["trainable"] - depth * zeros
    assert c["mask_values"] == 17 * P


def test_segment_layouts():
    assert segment_index(96, 16, "interleaved")[:18].tolist() == list(range(16)) + [0, 1]
    assert segment_index(96, 16, "contiguous")[:13].tolist() == [0] * 6 + [1] * 6 + [2]
    assert segment_index(768, 16, "interleaved")[[0, 16, 32, 767]].tolist() == [0, 0, 0, 15]
    tok, seg = torch.tensor([1.0, 0.5]), torch.arange(32.0).reshape(2, 16)
    m = dense_mask(tok, seg, segment_index(32, 16, "interleaved"))
    assert m[1, 17].item() == 0.5 * 17 and m[0, 3].item() == 3.0


def test_gradients_before_and_after_pruning(tiny_backbone):
    import copy

    method = get_method("e2vpt-prune")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    soft = method.build(copy.deepcopy(tiny_backbone), 4, {"prompt_tokens": 3, "kv_tokens": 2})
    fixed = method.build(tiny_backbone, 4, {"prompt_tokens": 3, "kv_tokens": 2,
                                            "mask": {"pruned_tokens": [1], "pruned_segments": [[0], [1, 2], [3]]}})
    for model, masks_train in ((soft, True), (fixed, False)):
        model.train()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None}
        want = {n for n, p in model.named_parameters()
                if n.startswith("head.") or ("prompt" in n and ("mask" not in n or masks_train))}
        assert got == want
        assert ("prompt_token_mask" in got) == masks_train and ("prompt_segment_mask" in got) == masks_train
        assert all(not n.startswith("backbone.") or n.endswith("prompt") for n in got)
    # the soft model counts its 17·P masks as tuned; the pruned one does not
    assert soft.parameter_counts()["trainable"] == fixed.parameter_counts()["trainable"] + 17 * 3


class _Toy(nn.Module):
    """logits = [s, 0] with s = x · Σ_{k,d} prompt[k,d] · mask[k,d] · w[d], label 0, x = ±1 per batch.

    With prompt[k, d] = t_k · u_{seg(d)} and w = 1: ∂L_b/∂ρ_k = −σ(−x_b A) · x_b · t_k · U,
    ∂L_b/∂ρ_{k,j} = −σ(−x_b A) · x_b · t_k · u_j · D/R, where U = Σ_j u_j · D/R and A = U · Σ_k t_k.
    """

    def __init__(self, t, u, dim, layout):
        super().__init__()
        self.index = segment_index(dim, SEGMENTS, layout)
        self.prompt = torch.tensor(t, dtype=torch.float64)[:, None] * torch.tensor(u, dtype=torch.float64)[self.index]
        self.prompt_token_mask = nn.Parameter(torch.ones(len(t), dtype=torch.float64))
        self.prompt_segment_mask = nn.Parameter(torch.ones(len(t), SEGMENTS, dtype=torch.float64))

    def forward(self, x):
        s = x * (self.prompt * dense_mask(self.prompt_token_mask, self.prompt_segment_mask, self.index)).sum()
        return torch.stack([s, torch.zeros_like(s)], dim=1)


@pytest.mark.parametrize("layout", ["interleaved", "contiguous"])
def test_importance_scores_rank_tokens_as_derived(layout):
    t = [0.03, -0.01, 0.005, -0.02]
    u = [float(j + 1) for j in range(SEGMENTS)]
    D = 48
    toy = _Toy(t, u, D, layout)
    xs = [1.0, 1.0, -1.0]  # one value per batch (3 batches of 4)
    batches = [(torch.full((4,), x, dtype=torch.float64), torch.zeros(4, dtype=torch.long)) for x in xs]
    scores = mask_importance(toy, batches)
    assert scores["num_batches"] == 3

    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    per = D // SEGMENTS
    U = sum(u) * per
    A = U * sum(t)
    signed_c = sum(-sig(-x * A) * x for x in xs) / len(xs)
    abs_c = sum(sig(-x * A) for x in xs) / len(xs)
    want = {
        "token": {"signed": [signed_c * tk * U for tk in t], "abs": [abs_c * abs(tk) * U for tk in t]},
        "segment": {"signed": [[signed_c * tk * uj * per for uj in u] for tk in t],
                    "abs": [[abs_c * abs(tk) * uj * per for uj in u] for tk in t]},
    }
    for kind in ("token", "segment"):
        for mode in ("abs", "signed"):
            assert torch.allclose(torch.tensor(scores[kind][mode]), torch.tensor(want[kind][mode]), rtol=1e-9), (kind, mode)

    # ranking: lowest score pruned first; nested token sets
    assert signed_c > 0  # A > 0 here: signed order follows t, abs order follows |t|
    abs_order, signed_order = [2, 1, 3, 0], [3, 1, 2, 0]
    for mode, order in (("abs", abs_order), ("signed", signed_order)):
        pats = candidate_patterns(scores, mode, [(n, 3) for n in range(4)])
        for n, p in enumerate(pats):
            assert p["pruned_tokens"] == sorted(order[:n])
            for k, segs in enumerate(p["pruned_segments"]):
                # segment scores ∝ sign·u_j: ascending u for abs and for t_k > 0 in signed mode
                lowest = [0, 1, 2] if (mode == "abs" or t[k] > 0) else [13, 14, 15]
                assert segs == lowest, (mode, k)
    # the importance pass leaves the mask flags as they were
    assert toy.prompt_token_mask.requires_grad


def test_candidate_counts_follow_the_official_code():
    assert token_counts(10) == list(range(1, 10))
    assert token_counts(32) == [3, 6, 9, 12, 16, 19, 22, 25, 28]
    assert token_counts(5) == [0, 1, 2, 3, 4]
    assert token_counts(1) == [0]
    assert segment_counts() == [1, 3, 4, 6, 8, 9, 11, 12]
    assert token_counts(10, demo=True) == [3, 6] and segment_counts(demo=True) == [4, 8]
    scores = [0.3, 0.1, 0.5, 0.2, 0.4]
    segs = [[float((7 * k + j) % 16) for j in range(16)] for k in range(5)]
    prev = set()
    for n in range(5):
        p = make_pattern(scores, segs, n, 4)
        assert prev <= set(p["pruned_tokens"]) and len(p["pruned_tokens"]) == n  # nested
        prev = set(p["pruned_tokens"])
        for k in range(5):  # every token (pruned ones too) independently its 4 lowest segments
            assert p["pruned_segments"][k] == sorted(j for j in range(16) if segs[k][j] < 4)


def _contexts(task, protocol="vpt", sets=(), method="e2vpt-prune"):
    from peftbench.sweep.protocols import PlanContext, get_protocol
    from peftbench.tasks import get_suite, get_task

    method = get_method(method)
    t = get_task(task)
    opts, sources = method.resolve_options(method.parse_options(dict(s.split("=") for s in sets)), t)
    proto = get_protocol(protocol)
    return [proto.adapt(PlanContext(method=method, task=t, suite=get_suite(t.suite), protocol=proto, options=opts,
                                    option_sources=sources, config="e2vpt-prune", seeds=proto.default_seeds,
                                    backbone="demo-vit", checkpoint=None, checkpoint_id=None, data_root="/nonexistent",
                                    fingerprint=None))]


def test_dry_run_enumerates_every_stage():
    from collections import Counter

    from peftbench.sweep.drive import count_runs

    for task, rewinds in (("dtd", 72), ("caltech101", 72), ("cifar100", 40), ("oxford_flowers102", 8)):
        specs = count_runs(_contexts(task))
        n = Counter(s.stage for s in specs)
        assert n == {"search": 40, "before_pruning": 1, "importance": 1, "rewind": rewinds, "final": 5}, task
        (imp,) = [s for s in specs if s.stage == "importance"]
        (before,) = [s for s in specs if s.stage == "before_pruning"]
        assert imp.job == "importance" and imp.extras["init_state"] == f"{before.key}.final.safetensors"
        assert before.extras == {"save_init": True, "save_final": True}
        finals = [s for s in specs if s.stage == "final"]
        assert {s.train_split for s in finals} == {"train800val200"} and {s.eval_split for s in finals} == {"test"}
        rw = [s for s in specs if s.stage == "rewind"]
        assert len({json.dumps(s.options["mask"], sort_keys=True) for s in rw}) == rewinds  # mask in the key
        assert len({s.key for s in rw}) == rewinds
    specs = count_runs(_contexts("demo_digits", "demo"))
    assert Counter(s.stage for s in specs) == {"search": 2, "before_pruning": 1, "importance": 1, "rewind": 4,
                                               "final": 1}
    assert "candidate_grid" in specs[-1].option_sources and "search_grid" in specs[0].option_sources
    # FGVC: batch 128 and the lr grid without 0.05 (E^2VPT FGVC commands); train -> val, train -> test
    for method, n in (("e2vpt-prune", {"search": 36, "before_pruning": 1, "importance": 1, "rewind": 40, "final": 5}),
                      ("e2vpt", {"search": 36, "final": 5})):
        specs = count_runs(_contexts("cub", method=method))
        assert Counter(s.stage for s in specs) == n, method
        assert {s.hparams["batch_size"] for s in specs} == {128}
        assert 0.05 not in {s.hparams.get("lr") for s in specs}
        assert {(s.train_split, s.eval_split) for s in specs} == {("train", "val"), ("train", "test")}
        assert "batch_size" in specs[-1].option_sources
    # fixed counts restrict the grid; rewind_init=saved rewinds from the stage-B initial weights
    specs = count_runs(_contexts("dtd", sets=("prune_tokens=3", "prune_segments=4", "rewind_init=saved")))
    rw = [s for s in specs if s.stage in ("rewind", "final")]
    assert len(rw) == 6 and all(s.options["mask"]["n_tok"] == 3 and s.options["mask"]["n_seg"] == 4 for s in rw)
    assert all(s.extras["init_state"].endswith(".init.safetensors") for s in rw)


# ---------------------------------------------------------------------------------------------
# the pipeline end to end, interrupted between stages and inside a stage
# ---------------------------------------------------------------------------------------------


class _Interrupt(KeyboardInterrupt):
    pass


class _StopAtStage:
    """An executor that dies when asked to run ``stage`` (a kill between two stages)."""

    def __init__(self, inner, stage):
        self.inner, self.stage = inner, stage

    def run(self, specs, store):
        if any(s.stage == self.stage for s in specs):
            raise _Interrupt(self.stage)
        return self.inner.run(specs, store)


@pytest.fixture
def tiny_preset():
    from peftbench.backbones import BACKBONES, Preset, register_backbone

    name = "test-tiny-vit-2x32"
    if name not in BACKBONES:
        register_backbone(name, Preset("vit_tiny_patch16_224",
                                       dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), None,
                                       "random tiny ViT for tests"))
    return name


def _run(contexts, runs, executor_wrap=None, callbacks=()):
    """One `peftbench run` of the planned contexts (a fresh Env, as a new process would have)."""
    from peftbench.executors.local import LocalExecutor
    from peftbench.store import RunStore
    from peftbench.sweep.drive import drive
    from peftbench.train.engine import Env

    env = Env(device="cpu", quiet=True, hooks=[OnEpoch(lambda s, e, cb=cb: cb(s, e['epoch'])) for cb in callbacks])
    executor = LocalExecutor(env)
    if executor_wrap:
        executor = executor_wrap(executor)
    return drive(contexts, executor, RunStore(runs))


def _records(runs):
    from peftbench.store import RunStore

    return {rec["key"]: rec for _, rec, _ in RunStore(runs).iter_records() if rec is not None}


def test_pipeline_resumes_between_and_inside_stages(tmp_path, demo_root, tiny_preset):
    from peftbench.api.schema import Sweep
    from peftbench.sweep.plan import plan

    settings = Sweep(methods=["e2vpt-prune"], suite="demo", tasks=["demo_digits"], backbone=tiny_preset,
                             data_root=str(demo_root), sets=["prompt_tokens=4", "kv_tokens=2", "prune_segments=4"],
                             **{"epochs": 2, "batch_size": 200})  # demo grid: 2 token counts x 1
    contexts = plan(settings)
    # reference: uninterrupted
    (ref,) = _run(contexts, tmp_path / "ref")
    assert ref.error is None and [r["status"] for r in ref.records] == ["ok"]
    reference = _records(tmp_path / "ref")
    stages = sorted(r["spec"]["stage"] for r in reference.values())
    assert stages == ["before_pruning", "final", "importance"] + ["rewind"] * 2 + ["search"] * 2

    runs = tmp_path / "runs"
    # 1. killed between stages: search and retrain finished, the importance pass never started
    with pytest.raises(_Interrupt):
        _run(contexts, runs, executor_wrap=lambda ex: _StopAtStage(ex, "importance"))
    assert sorted(r["spec"]["stage"] for r in _records(runs).values()) == ["before_pruning", "search", "search"]

    # 2. killed inside the rewind stage, after the first epoch of its second run (checkpoint written)
    started = []

    def kill(spec, epoch):
        if spec.stage == "rewind":
            if spec.key not in started:
                started.append(spec.key)
            if len(started) == 2 and epoch == 0:
                raise _Interrupt("rewind")

    with pytest.raises(_Interrupt):
        _run(contexts, runs, callbacks=[kill])
    recs = _records(runs)
    victim = started[1]
    assert recs[victim]["status"] == "running"
    assert (runs / "e2vpt-prune" / "demo_digits" / f"{victim}.ckpt.safetensors").exists()
    assert sum(r["spec"]["stage"] == "rewind" and r["status"] == "ok" for r in recs.values()) == 1

    # 3. rerun: finished runs are skipped, the killed one resumes at its second epoch
    seen = []
    (out,) = _run(contexts, runs, callbacks=[lambda spec, epoch: seen.append((spec.key, spec.stage, epoch))])
    assert out.error is None
    assert not any(stage in ("search", "before_pruning") for _, stage, _ in seen)
    assert [(k, e) for k, _, e in seen if k == victim] == [(victim, 1)]
    assert {k for k, s, _ in seen if s == "rewind"} == {k for k in reference
                                                        if reference[k]["spec"]["stage"] == "rewind"} - {started[0]}
    resumed = _records(runs)

    # same runs, same results as without interruptions
    assert set(resumed) == set(reference)
    for key, want in reference.items():
        got = resumed[key]
        assert got["status"] == "ok", (key, got.get("error"))
        assert got["spec"]["stage"] == want["spec"]["stage"]
        if want["spec"]["job"] == "importance":
            for kind in ("token", "segment"):
                assert torch.allclose(torch.tensor(got["scores"][kind]["abs"]),
                                      torch.tensor(want["scores"][kind]["abs"]), rtol=1e-5, atol=1e-12)
            continue
        assert got["metrics"]["top1"] == want["metrics"]["top1"], got["spec"]["stage"]
        assert [h["train_loss"] for h in got["history"]] == pytest.approx(
            [h["train_loss"] for h in want["history"]], rel=1e-5)
    assert resumed[victim]["attempts"] == 2
    assert all(r["attempts"] == 1 for k, r in resumed.items() if k != victim)  # nothing else ran twice
    # the chosen mask is readable JSON in the final record and points at the importance run's artifacts
    (final,) = [r for r in resumed.values() if r["spec"]["stage"] == "final"]
    mask = final["spec"]["options"]["mask"]
    assert len(mask["pruned_tokens"]) == mask["n_tok"] and len(mask["pruned_segments"]) == 4
    folder = runs / "e2vpt-prune" / "demo_digits"
    assert (folder / mask["scores_from"]).exists()
    (imp,) = [r for r in resumed.values() if r["spec"]["stage"] == "importance"]
    cands = json.loads((folder / imp["artifacts"]["masks"]).read_text())["candidates"]["demo/abs"]
    assert any(c["id"] == mask["id"] for c in cands)
    assert final["params"]["tuned"] == final["params"]["trainable"] - final["params"]["pruned_prompt_entries"]


def test_rewind_from_saved_initial_weights(tmp_path, demo_root, tiny_preset):
    """rewind_init=saved: the rewind and final runs load stage B's initial tensors (a relative
    ``init_state`` resolved in the run store), with the fixed masks still applied."""
    from safetensors.torch import load_file

    from peftbench.api.schema import Sweep
    from peftbench.sweep.plan import plan

    settings = Sweep(methods=["e2vpt-prune"], suite="demo", tasks=["demo_digits"], backbone=tiny_preset,
                             data_root=str(demo_root),
                             sets=["prompt_tokens=2", "kv_tokens=1", "prune_tokens=1", "prune_segments=3",
                                   "rewind_init=saved"],
                             **{"epochs": 1, "batch_size": 500, "lr": (1.0,)})  # 1 point: no search
    (out,) = _run(plan(settings), tmp_path / "runs")
    assert out.error is None
    recs = _records(tmp_path / "runs")
    assert sorted(r["spec"]["stage"] for r in recs.values()) == ["before_pruning", "final", "importance", "rewind"]
    assert all(r["status"] == "ok" for r in recs.values())
    (before,) = [r for r in recs.values() if r["spec"]["stage"] == "before_pruning"]
    folder = tmp_path / "runs" / "e2vpt-prune" / "demo_digits"
    init = load_file(str(folder / f"{before['key']}.init.safetensors"))
    assert {"prompt_token_mask", "prompt_segment_mask", "head.weight"} <= set(init)
    for r in recs.values():
        if r["spec"]["stage"] in ("rewind", "final"):
            assert r["spec"]["extras"]["init_state"] == f"{before['key']}.init.safetensors"
            mask = r["spec"]["options"]["mask"]
            assert (mask["n_tok"], mask["n_seg"]) == (1, 3)
            # 32 wide, 2 layers: zeros/layer = 32·1 + (2 − 1)·3·2
            assert r["params"]["pruned_prompt_entries"] == 2 * (32 + 6)
