"""The engine and the run store: records, skip, resume, diverged, failed, atomic writes, protocols."""
import json
import os

import pytest
from helpers import TINY_BACKBONE, make_data_root

from peftbench._io import atomic_write_text
from peftbench.api.schema import Sweep
from peftbench.executors.local import LocalExecutor
from peftbench.store import RunSpec, RunStore
from peftbench.sweep.drive import count_runs, drive
from peftbench.sweep.plan import plan
from peftbench.train import engine as engine_mod
from peftbench.train.engine import Env
from peftbench.train.loop import OnEpoch


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("toydata"))


def sweep(data_root, runs, methods=("linear",), env=None, **kw):
    settings = Sweep(methods=list(methods), suite="testsuite", data_root=str(data_root),
                             backbone=TINY_BACKBONE, **kw)
    contexts = plan(settings)
    store = RunStore(runs)
    total = len(count_runs(contexts))
    outcomes = drive(contexts, LocalExecutor(env or Env(quiet=True), total), store)
    return outcomes, store


FAST = dict(tasks=["toy"], protocol="fixed", seeds=[1], **{"epochs": 3, "batch_size": 16,
                                                                  "lr": (0.05,), "wd": (0.0,)})


def records(store):
    return [r for _, r, _ in store.iter_records()]


def test_record_contents(data_root, tmp_path):
    outcomes, store = sweep(data_root, tmp_path / "runs", methods=["vpt-deep"], **FAST)
    (rec,) = records(store)
    assert rec["status"] == "ok" and rec["error"] is None
    assert rec["spec"]["protocol"] == "fixed" and rec["spec"]["stage"] == "final"
    assert rec["spec"]["train_split"] == "train800val200" and rec["spec"]["eval_split"] == "test"
    for k in ("peftbench", "git_sha", "torch", "timm", "device", "host", "torch_threads"):
        assert k in rec["provenance"]
    import torch

    assert rec["provenance"]["torch_threads"] == torch.get_num_threads()  # float sums are ordered by it
    p = rec["params"]
    assert p["trainable"] == p["trainable_without_head"] + p["head"] and 0 < p["tuned_total_pct"] < 100
    assert [h["epoch"] for h in rec["history"]] == [0, 1, 2]
    assert "eval_top1" in rec["history"][-1] and rec["metrics"]["top1"] == rec["history"][-1]["eval_top1"]
    assert rec["metrics"]["best_epoch_is_selected_on_eval_split"] is True
    assert rec["timing"]["train_images_per_s"] > 0 and rec["timing"]["peak_memory_mb"] > 0
    assert rec["spec"]["data_fingerprint"] and rec["started_at"] and rec["ended_at"]
    assert rec["spec"]["option_sources"]["prompt_tokens"].startswith("default 10")


def test_same_command_skips_finished_runs(data_root, tmp_path, monkeypatch):
    sweep(data_root, tmp_path / "runs", **FAST)
    before = records(RunStore(tmp_path / "runs"))

    def boom(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(engine_mod, "train", boom)
    sweep(data_root, tmp_path / "runs", **FAST)
    assert records(RunStore(tmp_path / "runs")) == before


def test_reproducible(data_root, tmp_path):
    _, a = sweep(data_root, tmp_path / "a", methods=["vpt-deep"], **FAST)
    _, b = sweep(data_root, tmp_path / "b", methods=["vpt-deep"], **FAST)
    (ra,), (rb,) = records(a), records(b)
    assert ra["history"] == rb["history"]


class Interrupt(BaseException):
    """Like a kill: not an Exception, so the engine does not record it as a failure."""


def test_interrupted_run_resumes_and_equals_uninterrupted(data_root, tmp_path):
    _, ref = sweep(data_root, tmp_path / "ref", methods=["vpt-deep"], **FAST)

    def kill_after_epoch_1(spec, epoch):
        if epoch == 1:
            raise Interrupt()

    env = Env(quiet=True, hooks=[OnEpoch(lambda s, e: kill_after_epoch_1(s, e['epoch']))])
    with pytest.raises(Interrupt):
        sweep(data_root, tmp_path / "runs", methods=["vpt-deep"], env=env, **FAST)
    store = RunStore(tmp_path / "runs")
    (rec,) = records(store)
    assert rec["status"] == "running"
    assert list((tmp_path / "runs").rglob("*.ckpt.safetensors"))
    sweep(data_root, tmp_path / "runs", methods=["vpt-deep"], **FAST)
    (done,) = records(store)
    assert done["status"] == "ok" and done["attempts"] == 2
    assert done["history"] == records(ref)[0]["history"]
    assert not list((tmp_path / "runs").rglob("*.ckpt.safetensors"))


def test_diverged_run_is_recorded_and_sweep_goes_on(data_root, tmp_path, monkeypatch):
    from peftbench.layers.prompted_vit import PromptedViT
    from peftbench.train import loop

    real = loop.train_step

    def diverging(forward, *args, **kw):  # VPT's loss becomes NaN at its second step (no sweep can ask for it)
        loss = real(forward, *args, **kw)
        diverging.steps += isinstance(forward, PromptedViT)
        return loss * float("nan") if isinstance(forward, PromptedViT) and diverging.steps % 2 == 0 else loss

    diverging.steps = 0
    monkeypatch.setattr(loop, "train_step", diverging)
    settings = dict(FAST, tasks=["toy", "toy_b"])
    outcomes, store = sweep(data_root, tmp_path / "runs", methods=["vpt-deep", "linear"], **settings)
    recs = records(store)
    assert len(recs) == 4
    assert all(r["status"] == "diverged" for r in recs if r["spec"]["method"] == "vpt-deep")
    assert all("loss became" in r["error"] for r in recs if r["status"] == "diverged")
    assert {r["spec"]["task"] for r in recs} == {"toy", "toy_b"}  # the sweep went on after the first one
    # diverged runs are final: a rerun does not repeat them
    assert all(store.is_done(RunSpec.from_dict(r["spec"])) for r in recs if r["status"] == "diverged")


def test_exception_becomes_failed_record_and_sweep_goes_on(data_root, tmp_path, monkeypatch):
    real = engine_mod.train

    def flaky(spec, store, env, **kw):
        if spec.task == "toy":
            raise RuntimeError("simulated crash")
        return real(spec, store, env, **kw)

    monkeypatch.setattr(engine_mod, "train", flaky)
    sweep(data_root, tmp_path / "runs", **dict(FAST, tasks=["toy", "toy_b"]))
    by_task = {r["spec"]["task"]: r for r in records(RunStore(tmp_path / "runs"))}
    assert by_task["toy"]["status"] == "failed" and "simulated crash" in by_task["toy"]["error"]
    assert "Traceback" in by_task["toy"]["error"]
    assert by_task["toy_b"]["status"] == "ok"
    monkeypatch.setattr(engine_mod, "train", real)  # a failed run is retried by the next invocation
    sweep(data_root, tmp_path / "runs", **dict(FAST, tasks=["toy", "toy_b"]))
    by_task = {r["spec"]["task"]: r for r in records(RunStore(tmp_path / "runs"))}
    assert by_task["toy"]["status"] == "ok" and by_task["toy"]["attempts"] == 2


def test_vpt_protocol_selects_on_val_then_runs_final_seeds(data_root, tmp_path, monkeypatch):
    from peftbench.train import loop

    real = loop.train_step

    def diverging(forward, x, y, optimizer, *args, **kw):  # the run at lr 8 diverges (its loss becomes NaN)
        loss = real(forward, x, y, optimizer, *args, **kw)
        return loss * float("nan") if optimizer.param_groups[0]["lr"] > 0.1 else loss

    monkeypatch.setattr(loop, "train_step", diverging)
    overrides = {"epochs": 2, "batch_size": 16, "lr": (8.0, 0.05), "wd": (0.0,), "warmup_epochs": 0}
    outcomes, store = sweep(data_root, tmp_path / "runs", methods=["linear"], tasks=["toy"], protocol="vpt",
                            seeds=[1, 2], **overrides)
    recs = records(store)
    search = [r for r in recs if r["spec"]["stage"] == "search"]
    final = [r for r in recs if r["spec"]["stage"] == "final"]
    assert len(search) == 2 and {r["spec"]["eval_split"] for r in search} == {"val200"}
    assert {r["spec"]["train_split"] for r in search} == {"train800"}
    assert all("eval_top1" in h for r in search if r["status"] == "ok" for h in r["history"])  # every epoch
    assert sorted(r["spec"]["seed"] for r in final) == [1, 2]
    assert {r["spec"]["hparams"]["lr"] for r in final} == {0.05}  # the diverging lr is never selected
    assert {r["spec"]["eval_split"] for r in final} == {"test"}
    assert outcomes[0].error is None


def test_cached_features_give_the_same_result_as_the_backbone_path(data_root, tmp_path, monkeypatch):
    _, a = sweep(data_root, tmp_path / "a", methods=["linear"], **FAST)
    from peftbench.methods import get_method

    monkeypatch.setattr(type(get_method("linear")), "frozen_features", False)
    _, b = sweep(data_root, tmp_path / "b", methods=["linear"], **FAST)
    (ra,), (rb,) = records(a), records(b)
    assert ra["timing"]["cached_features"] and not rb["timing"]["cached_features"]
    assert ra["metrics"]["top1"] == rb["metrics"]["top1"]
    for ha, hb in zip(ra["history"], rb["history"]):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-4)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    atomic_write_text(path, json.dumps({"v": 1}))

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_text(path, json.dumps({"v": 2}))
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


def test_run_key_is_stable_and_sensitive(data_root):
    settings = Sweep(methods=["linear"], suite="testsuite", data_root=str(data_root),
                             backbone=TINY_BACKBONE, **FAST)
    s1 = count_runs(plan(settings))[0]
    s2 = count_runs(plan(settings))[0]
    assert s1.key == s2.key
    settings.seeds = [2]
    assert count_runs(plan(settings))[0].key != s1.key
