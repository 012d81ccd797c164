"""Fused configurations (``--fuse K``, peftbench.train.fused): K runs that differ only in lr / wd trained
as one model equal K separate runs (losses, top-1, final weights, logits and gradients to 1e-5), each
with its own record; divergence, kills and resumes, fallbacks, grouping, SLURM packs, the CLI, the bench."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import TINY_BACKBONE, ensure_registered, make_data_root
from safetensors.torch import load_file

from peftbench.api.schema import Sweep
from peftbench.backbones import create_backbone
from peftbench.cli import main as cli_main
from peftbench.executors.local import LocalExecutor
from peftbench.methods import METHODS, get_method
from peftbench.store import RunSpec, RunStore
from peftbench.sweep.drive import count_runs, drive
from peftbench.sweep.plan import plan
from peftbench.train import fused as fused_mod
from peftbench.train.build import build_model, load_trainable
from peftbench.train.engine import Env, execute_group
from peftbench.train.fused import CannotFuse, FusedModel, group_indices, plan_groups
from peftbench.train.loop import OnEpoch

ensure_registered()
FUSABLE = sorted(name for name, m in METHODS.items() if m.fusable)
# one method of each kind the engine meets: cached-feature heads (with batch norm and dropout), prompts
# (input / deep / key-value, dropout on), adapters, a peft tuner (dropout on), backbone biases, a whole block
END_TO_END = ["linear", "mlp-3", "vpt-shallow", "vpt-deep", "e2vpt", "adapter", "adapter-noah", "lora", "bitfit",
              "partial-1"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("toydata"))


def settings(data_root, method, lrs=(0.05, 0.1), wds=(0.0, 0.001), epochs=2, **over):
    overrides = {"epochs": epochs, "batch_size": 16, "warmup_epochs": 0, "lr": tuple(lrs), "wd": tuple(wds),
                 **over}
    return Sweep(methods=[method], suite="testsuite", tasks=["toy"], protocol="vpt", seeds=[1],
                         data_root=str(data_root), backbone=TINY_BACKBONE, **overrides,
                         sets={"e2vpt": ["prompt_tokens=3", "kv_tokens=2"], "vpt-deep": ["prompt_tokens=3"],
                               "vpt-shallow": ["prompt_tokens=3"]}.get(method, []))


def sweep(s, runs, fuse=1, env=None):
    contexts = plan(s)
    env = env or Env(quiet=True, save_weights="all")
    env.fuse = fuse
    store = RunStore(runs)
    drive(contexts, LocalExecutor(env, len(count_runs(contexts))), store)
    return store


def separately(s, runs):
    """The search stage of ``s``, each run trained alone into a fresh store: the reference."""
    specs = search_specs(s)
    ref = RunStore(runs)
    for sp in specs:
        execute_group([sp], ref, Env(quiet=True, save_weights="all"))
    return specs, ref


def search_specs(s):
    ctx = plan(s)[0]
    return next(ctx.method.pipeline(ctx, ctx.protocol))


def by_key(store):
    return {r.key: r for _, r, _ in store.iter_records()}


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """Equal to ``tol`` relative to the reference's scale (absolute below 1)."""
    a, b = a.double(), b.double()
    return a.shape == b.shape and (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def exact_zero_gradient(name: str, t: torch.Tensor) -> torch.Tensor:
    """Entries whose gradient is exactly zero in exact arithmetic: the key bias of attention (softmax is
    invariant to adding q·b_k to every logit). Their float32 gradients are rounding noise, which Adam
    normalises to steps of ~lr whatever the noise's size, so a run's own value depends on the rounding
    (a separate run with its rows in another order would differ the same way); they change no logit."""
    mask = torch.zeros_like(t, dtype=torch.bool)
    if name.endswith("attn.qkv.bias"):
        d = t.numel() // 3
        mask[d:2 * d] = True
    return mask


def final_logits(spec: RunSpec, store: RunStore) -> torch.Tensor:
    """The trained model (from its final weights) on a fixed batch, in eval mode."""
    model = build_model(spec, Env(quiet=True), store)  # the store: a selection the spec names (GPS, SPT)
    load_trainable(model, store.artifact_path(spec, "final.safetensors"))
    torch.manual_seed(123)
    with torch.no_grad():
        return model.eval()(torch.rand(8, 3, 32, 32))


def assert_same_run(a, b, store_a, store_b, tol=1e-5):
    assert a.status == b.status == "ok", (a.error, b.error)
    la, lb = [h["train_loss"] for h in a.history], [h["train_loss"] for h in b.history]
    assert la == pytest.approx(lb, rel=tol, abs=tol)
    assert [h.get("eval_top1") for h in a.history] == [h.get("eval_top1") for h in b.history]
    spec = RunSpec.from_dict(a.spec)
    wa = load_file(str(store_a.artifact_path(spec, "final.safetensors")))
    wb = load_file(str(store_b.artifact_path(spec, "final.safetensors")))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        keep = ~exact_zero_gradient(k, wa[k])
        assert close(wb[k][keep], wa[k][keep], tol), k
    assert close(final_logits(spec, store_b), final_logits(spec, store_a), tol)


# ---------------------------------------------------------------------------------------------
# fused == separate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", END_TO_END)
def test_fused_sweep_equals_separate_runs(method, data_root, tmp_path):
    s = settings(data_root, method)
    sep = sweep(s, tmp_path / "sep")
    fus = sweep(s, tmp_path / "fus", fuse=4)
    ra, rb = by_key(sep), by_key(fus)
    assert ra.keys() == rb.keys() and len(ra) == 5  # 2 lr x 2 wd search runs + 1 final run, the same keys
    for key in ra:
        assert_same_run(ra[key], rb[key], sep, fus)
        assert "fused" not in ra[key].extra
        if ra[key].spec["stage"] == "search":  # the 4 search runs trained as one model, each with its own record
            info = rb[key].extra["fused"]
            assert info["group_size"] == 4 and len(info["siblings"]) == 3 and key not in info["siblings"]
        else:
            assert "fused" not in rb[key].extra  # the final stage has one run: trained alone


def test_bf16_fused_step_is_close_to_separate(data_root, tmp_path):
    s = settings(data_root, "vpt-deep", lrs=(0.05, 0.1), wds=(0.0,), epochs=1)
    s.precision = "bf16"
    sep, fus = sweep(s, tmp_path / "sep"), sweep(s, tmp_path / "fus", fuse=2)
    ra, rb = by_key(sep), by_key(fus)
    for key in ra:
        assert rb[key].status == "ok" and rb[key].spec["hparams"]["precision"] == "bf16"
        assert rb[key].metrics["final_train_loss"] == pytest.approx(ra[key].metrics["final_train_loss"], rel=2e-2)


# ---------------------------------------------------------------------------------------------
# divergence, kills, fallbacks
# ---------------------------------------------------------------------------------------------


def test_a_diverged_configuration_does_not_stop_its_siblings(data_root, tmp_path):
    s = settings(data_root, "vpt-deep", lrs=(1.0, 0.05, 0.1), wds=(0.0,))
    specs = search_specs(s)
    # a run whose lr is infinite (no sweep can ask for one: the engine must still survive a diverging run)
    specs[0] = dataclasses.replace(specs[0], hparams={**specs[0].hparams, "lr": float("inf")})
    sep = RunStore(tmp_path / "sep")
    for sp in specs:
        execute_group([sp], sep, Env(quiet=True, save_weights="all"))
    fus = RunStore(tmp_path / "fus")
    results = execute_group(specs, fus, Env(quiet=True, save_weights="all"))
    recs = [r for r, ran in results]
    assert all(ran for _, ran in results)
    assert recs[0].status == "diverged" and "loss became nan at epoch 0 step 1" in recs[0].error
    assert sep.load(specs[0]).status == "diverged" and sep.load(specs[0]).error == recs[0].error
    for sp, rec in zip(specs[1:], recs[1:]):
        assert_same_run(sep.load(sp), rec, sep, fus)
        assert rec.extra["fused"]["group_size"] == 3
    assert not list((tmp_path / "fus").rglob("*.ckpt.safetensors"))


class Interrupt(BaseException):
    """Like a kill: not an Exception, so the engine does not record it as a failure."""


def test_a_killed_fused_group_resumes_from_each_runs_checkpoint(data_root, tmp_path):
    s = settings(data_root, "e2vpt", lrs=(0.05, 0.1, 0.2), wds=(0.0,), epochs=3)
    specs, ref = separately(s, tmp_path / "ref")

    def kill(spec, epoch):
        if epoch == 1:
            raise Interrupt()

    store = RunStore(tmp_path / "runs")
    with pytest.raises(Interrupt):
        execute_group(specs, store, Env(quiet=True, save_weights="all", hooks=[OnEpoch(lambda s, e: kill(s, e['epoch']))]))
    assert [store.load(sp).status for sp in specs] == ["running"] * 3
    assert [store.checkpoint_epoch(sp) for sp in specs] == [2, 2, 2]  # every run checkpointed its own state
    assert not list((tmp_path / "runs").rglob("*.lease"))
    results = execute_group(specs, store, Env(quiet=True, save_weights="all"))
    for sp, (rec, ran) in zip(specs, results):
        assert ran and rec.attempts == 2 and rec.extra["fused"]["group_size"] == 3
        assert_same_run(ref.load(sp), rec, ref, store)
    assert not list((tmp_path / "runs").rglob("*.ckpt.safetensors"))


def test_runs_resuming_from_different_epochs_fuse_with_their_peers(data_root, tmp_path):
    s = settings(data_root, "vpt-deep", lrs=(0.05, 0.1, 0.2), wds=(0.0,), epochs=3)
    specs, ref = separately(s, tmp_path / "ref")

    def kill(spec, epoch):
        if epoch == 0:
            raise Interrupt()

    store = RunStore(tmp_path / "runs")
    with pytest.raises(Interrupt):  # the first run alone, killed after its first epoch
        execute_group(specs[:1], store, Env(quiet=True, save_weights="all", hooks=[OnEpoch(lambda s, e: kill(s, e['epoch']))]))
    assert [store.checkpoint_epoch(sp) for sp in specs] == [1, 0, 0]
    results = execute_group(specs, store, Env(quiet=True, save_weights="all"))
    recs = [r for r, _ in results]
    assert "fused" not in recs[0].extra  # it resumed alone; the two others trained fused
    assert recs[1].extra["fused"]["siblings"] == [specs[2].key]
    for sp, rec in zip(specs, recs):
        assert_same_run(ref.load(sp), rec, ref, store)


def test_a_group_that_cannot_fuse_trains_its_runs_one_by_one(data_root, tmp_path, monkeypatch):
    s = settings(data_root, "lora", lrs=(0.05, 0.1), wds=(0.0,))
    specs, ref = separately(s, tmp_path / "ref")

    def broken(self, *a, **k):
        raise RuntimeError("vmap: no batching rule for this layer")

    monkeypatch.setattr(FusedModel, "train_step", broken)
    logs = []
    env = Env(quiet=True, save_weights="all")
    env.log = lambda msg, detail=False: logs.append(msg)
    store = RunStore(tmp_path / "runs")
    recs = [r for r, _ in execute_group(specs, store, env)]
    assert any("cannot train fused" in m and "no batching rule" in m for m in logs)
    for sp, rec in zip(specs, recs):
        assert rec.attempts == 1 and "fused" not in rec.extra
        assert_same_run(ref.load(sp), rec, ref, store)


def test_a_failure_after_the_first_step_fails_every_run_of_the_group(data_root, tmp_path, monkeypatch):
    specs = search_specs(settings(data_root, "lora", lrs=(0.05, 0.1), wds=(0.0,)))
    real, calls = FusedModel.train_step, []

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(self, *a, **k)

    monkeypatch.setattr(FusedModel, "train_step", flaky)
    store = RunStore(tmp_path / "runs")
    recs = [r for r, _ in execute_group(specs, store, Env(quiet=True))]
    assert [r.status for r in recs] == ["failed", "failed"] and all("simulated crash" in r.error for r in recs)
    monkeypatch.setattr(FusedModel, "train_step", real)  # a failed run is retried by the next invocation
    recs = [r for r, _ in execute_group(specs, store, Env(quiet=True))]
    assert [(r.status, r.attempts) for r in recs] == [("ok", 2), ("ok", 2)]


def test_models_whose_frozen_tensors_differ_do_not_fuse():
    m = get_method("vpt-deep")
    opts, _ = m.resolve_options(m.parse_options({}), None)
    backbone = create_backbone(TINY_BACKBONE, None)
    a = m.build(copy.deepcopy(backbone), 3, dict(opts))
    b = m.build(copy.deepcopy(backbone), 3, dict(opts))
    with torch.no_grad():
        b.backbone.blocks[0].attn.qkv.weight.add_(1.0)
    with pytest.raises(CannotFuse, match="blocks.0.attn.qkv.weight differs"):
        FusedModel(a).add(b)
    c = m.build(copy.deepcopy(backbone), 3, {**opts, "prompt_tokens": 2})
    with pytest.raises(CannotFuse, match="shape"):
        FusedModel(a).add(c)


# ---------------------------------------------------------------------------------------------
# grouping, executors, CLI, bench
# ---------------------------------------------------------------------------------------------


def test_plan_groups_fuses_only_runs_that_differ_in_lr_and_wd(data_root):
    specs = search_specs(settings(data_root, "vpt-deep", lrs=(0.1, 0.2, 0.3), wds=(0.0, 0.1)))
    assert len(specs) == 6
    assert group_indices(specs, 1) == [[i] for i in range(6)]
    assert group_indices(specs, 4) == [[0, 1, 2, 3], [4, 5]]
    assert [len(g) for g in plan_groups(specs, 8)] == [6]
    import dataclasses

    other_seed = dataclasses.replace(specs[0], seed=2)
    other_epochs = dataclasses.replace(specs[1], hparams={**specs[1].hparams, "epochs": 5})
    job = dataclasses.replace(specs[2], job="importance")
    full = dataclasses.replace(specs[3], method="full")
    mixed = [specs[0], other_seed, specs[4], other_epochs, job, full, specs[5], specs[0]]
    assert group_indices(mixed, 8) == [[0, 2, 6], [1], [3], [4], [5], [7]]  # a duplicate key: its own group
    assert not get_method("full").fusable


def test_cli_fuse(data_root, tmp_path, capsys):
    assert cli_main(["run", "--methods", "linear", "--fuse", "0", "--runs-dir", str(tmp_path)]) == 2
    assert cli_main(["run", "--methods", "linear", "--fuse", "2", "--executor", "ray", "--runs-dir", str(tmp_path)]) == 2
    assert "executor 'ray' trains runs one at a time" in capsys.readouterr().err
    code = cli_main(["run", "--methods", "vpt-deep,full", "--suite", "vtab", "--tasks", "dtd", "--dry-run",
                     "--fuse", "8", "--backbone", TINY_BACKBONE, "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 0
    # vpt-deep: 10 lr x 4 wd search runs in 5 groups of 8, its 5 final seeds alone; full (4 x 4 + 5) never fuses
    assert "--fuse 8: 40 of the 66 runs train in 5 fused group(s), 26 alone" in err


def test_slurm_array_tasks_train_fused_groups(data_root, tmp_path):
    from peftbench.executors.slurm import SlurmExecutor, make_settings

    s = settings(data_root, "linear", lrs=(0.05, 0.1, 0.2), wds=(0.0,))
    runs = tmp_path / "runs"
    contexts = plan(s)
    debug = make_settings(flags={"gpus_per_node": 0, "cpus_per_task": 1, "max_retries": 0},
                          sets=["cluster = 'debug'", "poll_s = 0.01"])
    ex = SlurmExecutor(debug, runs, quiet=True, total=4, log=lambda m: None, fuse=3)
    drive(contexts, ex, RunStore(runs))
    ex.close()
    recs = list(by_key(RunStore(runs)).values())
    search = [r for r in recs if r.spec["stage"] == "search"]
    assert len(search) == 3 and all(r.status == "ok" and r.extra["fused"]["group_size"] == 3 for r in search)
    assert len({r.extra["executor"]["job_id"] for r in search}) == 1  # one array task trained the group
    ref = sweep(s, tmp_path / "ref")
    for r in search:
        other = ref.load(RunSpec.from_dict(r.spec))
        assert [h["train_loss"] for h in r.history] == pytest.approx([h["train_loss"] for h in other.history], rel=1e-5)
        assert r.top1 == other.top1


def test_bench_fused_rows(tmp_path):
    from peftbench.bench.speed import BenchSettings, run_bench, targets

    s = BenchSettings(methods=["vpt-deep", "full"], backbone=TINY_BACKBONE, batch_size=2, warmup=0, steps=1,
                      fuse=(2,), variants=False)
    rows = run_bench(s, log=lambda m: None)
    assert [(r["method"], r["variant"]) for r in rows] == [("vpt-deep", ""), ("vpt-deep", "fused-2"), ("full", "")]
    one, two = rows[0], rows[1]
    assert two["train_images_per_s"] == pytest.approx(2 * 2 / (two["train_step_ms"] / 1000), rel=0.01)
    assert two["trainable_params"] == one["trainable_params"] and two["tokens"] == one["tokens"]
    # per configuration-image the work is one run's (the shared patch embedding is computed once)
    assert 0.8 < two["gflops_train_per_image"] / one["gflops_train_per_image"] <= 1.0
    names = [t["target"] for t in targets(rows, None)]
    assert "vpt-deep fused-2 train configuration-images/s >= 1.5 x one run's" in names
    assert cli_main(["bench", "--methods", "linear", "--fuse", "1", "--out", str(tmp_path)]) == 2


def test_every_fusable_method_is_declared_so(data_root):
    """The capability is a flag on the method, never a name test: methods outside the table keep the
    default (not fusable), and the engine groups by the flag alone."""
    assert "full" not in FUSABLE and {"linear", "vpt-deep", "e2vpt", "lora", "adapter", "bitfit"} <= set(FUSABLE)
    assert fused_mod.fuse_key(search_specs(settings(data_root, "full"))[0]) is None


@pytest.mark.parametrize("method", ["gps", "spt-lora"])
def test_selection_methods_fuse_their_search_stage(method, data_root, tmp_path):
    """GPS and SPT: the selection job runs alone; the search runs (one selection artifact, loaded as the
    sparse deltas' frozen entry indices, shared by the group) train as one fused model, each equal to
    its separate run."""
    import dataclasses

    s = dataclasses.replace(settings(data_root, method), sets={"gps": ["K=1"], "spt-lora": ["budget=0.4",
                                                                                          "low_rank_dim=2"]}[method])
    sep = sweep(s, tmp_path / "sep")
    fus = sweep(s, tmp_path / "fus", fuse=4)
    ra, rb = by_key(sep), by_key(fus)
    assert ra.keys() == rb.keys()
    search = [k for k, r in ra.items() if r.spec["stage"] == "search"]
    assert len(search) == 4
    for key in ra:
        if ra[key].spec["job"] != "train":  # the selection stage: a method job, never fused
            assert "fused" not in rb[key].extra
            continue
        assert_same_run(ra[key], rb[key], sep, fus)
    assert all(rb[k].extra["fused"]["group_size"] == 4 for k in search)
