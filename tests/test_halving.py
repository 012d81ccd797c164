"""Successive halving (--search halving): rungs on the full schedule, survivors resume from their rung
state and end with exactly the grid's record; finished rungs are never recomputed; the budget formula."""
import dataclasses
import json

import pytest
import torch
from helpers import TINY_BACKBONE, make_data_root
from safetensors.torch import load_file

from peftbench.api.schema import Sweep
from peftbench.cli import main
from peftbench.errors import SettingsError
from peftbench.executors.local import LocalExecutor
from peftbench.store import RunStore
from peftbench.sweep.drive import count_runs, drive
from peftbench.sweep.plan import plan
from peftbench.sweep.search import Search, budget, rung_epochs, rung_sizes, survivors
from peftbench.train import engine as engine_mod
from peftbench.train.engine import Env


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("toydata"))


# 2 configurations, factor 1.5: both survive every rung (1, 2, 3 of 3 epochs); vpt-deep has prompt dropout,
# so the RNG state handed from rung to rung matters
SURVIVE = Search("halving", rungs=(0.34, 0.67, 1.0), factor=1.5)
OVERRIDES = {"epochs": 3, "batch_size": 16, "lr": (0.5, 2.0), "wd": (0.0,)}


def fields_of(search: Search) -> dict:
    """The sweep's fields of a search strategy."""
    return {"search": search.kind, "halving_rungs": list(search.rungs), "halving_factor": search.factor} \
        if search.kind == "halving" else {"search": search.kind}


def sweep(data_root, runs, search=Search(), method="vpt-deep", overrides=OVERRIDES, env=None):
    settings = Sweep(methods=[method], suite="testsuite", tasks=["toy"], data_root=str(data_root),
                     backbone=TINY_BACKBONE, seeds=[1], **dict(overrides), **fields_of(search))
    contexts = plan(settings)
    store = RunStore(runs)
    env = env or Env(quiet=True, save_weights="all")
    outcomes = drive(contexts, LocalExecutor(env, len(count_runs(contexts))), store)
    assert not any(o.error for o in outcomes), [o.error for o in outcomes]
    return outcomes, store


def by_stage(store):
    out = {}
    for _, rec, _ in store.iter_records():
        out.setdefault(rec.spec["stage"], []).append(rec)
    for recs in out.values():
        recs.sort(key=lambda r: r.hparams["lr"])
    return out


def weights(store, rec):
    return load_file(str(store.record_path(rec.run_spec).parent / rec.get("weights")))


def test_a_configuration_that_survives_every_rung_ends_with_exactly_the_grid_record(data_root, tmp_path):
    _, grid = sweep(data_root, tmp_path / "grid")
    _, halv = sweep(data_root, tmp_path / "halving", search=SURVIVE)
    g, h = by_stage(grid), by_stage(halv)
    assert sorted(h) == ["final", "search", "search-rung1", "search-rung2"]
    assert [len(h[s]) for s in ("search-rung1", "search-rung2", "search")] == [2, 2, 2]
    for rg, rh in zip(g["search"], h["search"]):
        assert rh.key == rg.key  # the last rung is the grid's run
        assert rh.history == rg.history and rh.top1 == rg.top1
        assert rh.metrics == rg.metrics
        wg, wh = weights(grid, rg), weights(halv, rh)
        assert wg.keys() == wh.keys() and all(torch.equal(wg[k], wh[k]) for k in wg)
        assert rh.get("resumed_from") == {"key": h["search-rung2"][g["search"].index(rg)].key, "epoch": 2}
        assert rh.spec["search"] == "halving" and rg.spec["search"] == "grid"
    for r1, r2 in zip(h["search-rung1"], h["search-rung2"]):
        assert r1.get("stopped_at_epoch") == 1 and r2.get("stopped_at_epoch") == 2
        assert [e["epoch"] for e in r1.history] == [0] and [e["epoch"] for e in r2.history] == [0, 1]
        assert r2.get("resumed_from") == {"key": r1.key, "epoch": 1}
        assert halv.rung_state_path(r1.run_spec).is_file()
    # a rung run's lr is the full schedule's (the schedule is not shortened)
    assert h["search-rung1"][0].history[0]["lr"] == g["search"][0].history[0]["lr"]
    assert h["search-rung2"][0].history[1]["lr"] == g["search"][0].history[1]["lr"]
    (fg,), (fh,) = g["final"], h["final"]
    assert fg.key == fh.key and fg.history == fh.history  # the same choice, the same final run
    assert fh.spec["search"] == "halving"
    assert leaderboard_search(tmp_path / "grid", tmp_path) == {"vpt-deep": "grid"}
    assert leaderboard_search(tmp_path / "halving", tmp_path) == {"vpt-deep": "halving"}


def leaderboard_search(runs, tmp_path):
    import csv

    from peftbench.results.write import write_leaderboard

    out = tmp_path / f"board-{runs.name}"
    write_leaderboard(runs, out, "testsuite", plots=False, html=False)
    with open(out / "testsuite-leaderboard.csv") as fh:
        return {r["config"]: r["search"] for r in csv.DictReader(fh) if r["source"] == "reproduced"}


def test_finished_rungs_are_never_recomputed_and_a_grid_store_trains_only_the_lower_rungs(data_root, tmp_path,
                                                                                          monkeypatch):
    runs = tmp_path / "runs"
    sweep(data_root, runs)  # the grid first
    trained = []
    real = engine_mod.train

    def counting(spec, *a, **k):
        trained.append((spec.stage, spec.hparams["lr"]))
        return real(spec, *a, **k)

    monkeypatch.setattr(engine_mod, "train", counting)
    sweep(data_root, runs, search=SURVIVE)
    assert sorted(trained) == [("search-rung1", 0.5), ("search-rung1", 2.0), ("search-rung2", 0.5),
                               ("search-rung2", 2.0)]  # the last rung and the final run are the grid's
    trained.clear()
    sweep(data_root, runs, search=SURVIVE)
    assert trained == []
    # the runs the halving sweep reused say so
    recs = by_stage(RunStore(runs))
    assert all(r.get("searches") == ["grid", "halving"] for r in recs["search"] + recs["final"])
    assert all("searches" not in r.extra for r in recs["search-rung1"])
    assert leaderboard_search(runs, tmp_path) == {"vpt-deep": "grid + halving"}


def test_a_missing_rung_state_costs_compute_not_correctness(data_root, tmp_path):
    _, ref = sweep(data_root, tmp_path / "ref", search=SURVIVE)
    runs = tmp_path / "runs"
    _, store = sweep(data_root, runs, search=Search("halving", rungs=(0.34, 1.0), factor=1.5))
    for p in runs.rglob("*.rung.safetensors"):
        p.unlink()
    # the rung-2 runs of SURVIVE have no state to start from: they train epochs 0-1 again
    sweep(data_root, runs, search=SURVIVE)
    a, b = by_stage(ref), by_stage(store)
    assert [r.history for r in a["search-rung2"]] == [r.history for r in b["search-rung2"]]
    assert all("resumed_from" not in r.extra for r in b["search-rung2"])


def test_a_rung_state_of_another_run_is_refused(data_root, tmp_path):
    runs = tmp_path / "runs"
    _, store = sweep(data_root, runs, search=Search("halving", rungs=(0.34, 1.0), factor=1.5))
    r1 = by_stage(store)["search-rung1"]
    a, b = (store.rung_state_path(r.run_spec) for r in r1)
    a.write_bytes(b.read_bytes())  # lr 0.5's state replaced by lr 2.0's
    sweep(data_root, runs, search=SURVIVE)
    bad = [r for r in by_stage(store)["search-rung2"] if r.hparams["lr"] == 0.5][0]
    assert bad.status == "failed" and "not an earlier part of" in bad.error


def test_halving_keeps_the_best_third_and_ties_go_to_the_smaller_lr(data_root, tmp_path):
    runs = tmp_path / "runs"
    over = {**OVERRIDES, "epochs": 4, "lr": (0.0, 0.1, 0.2, 8.0, 0.5, 1.0)}
    outcomes, store = sweep(data_root, runs, search=Search("halving", rungs=(0.25, 0.5, 1.0), factor=3),
                            overrides=over)
    st = by_stage(store)
    first = st["search-rung1"]
    assert len(first) == 6 and len(st["search-rung2"]) == 2  # ceil(6/3) = 2; then ceil(2/3) = 1: selected
    assert "search" not in st  # the rung that would train one configuration is skipped
    ranked = sorted((r for r in first if r.usable), key=lambda r: (-r.top1, r.hparams["lr"]))
    assert sorted(r.hparams["lr"] for r in st["search-rung2"]) == sorted(r.hparams["lr"] for r in ranked[:2])
    best = max(st["search-rung2"], key=lambda r: (r.top1, -r.hparams["lr"]))
    (final,) = st["final"]
    assert final.hparams["lr"] == best.hparams["lr"]


def test_rung_arithmetic():
    assert rung_epochs((0.1, 0.33, 1.0), 100) == [10, 33, 100]
    assert rung_epochs((0.1, 0.33, 1.0), 10) == [1, 3, 10]
    assert rung_epochs((0.01, 0.02, 1.0), 10) == [1, 10]  # rungs rounding to the same epoch merge
    assert [survivors(n, 3) for n in (40, 14, 5, 3, 2, 1)] == [14, 5, 2, 1, 1, 1]
    assert rung_sizes(40, [10, 33, 100], 3) == [40, 14, 5]
    grid, halving = budget(40, 100, Search("halving"))  # the VPT grid: 10 lr x 4 wd, 100 epochs
    assert (grid, halving) == (4000, 40 * 10 + 14 * 23 + 5 * 67)
    assert grid / halving >= 3
    assert budget(1, 100, Search("halving")) == (100, 100)


def test_the_dry_run_counts_rung_runs_and_what_each_search_costs(data_root, tmp_path, capsys):
    args = ["run", "--methods", "vpt-deep", "--suite", "testsuite", "--tasks", "toy", "--data-root", str(data_root),
            "--backbone", TINY_BACKBONE, "--runs-dir", str(tmp_path / "runs"), "--seeds", "1", "--epochs", "10",
            "--lr", "0.1,0.5,1,2,4,8,16,32,64", "--wd", "0", "--dry-run"]
    assert main(args + ["--search", "halving"]) == 0
    out = capsys.readouterr().out
    assert "search-rung1" in out and "search-rung2" in out
    lines = {ln.split()[2]: int(ln.split()[3]) for ln in out.splitlines() if ln.startswith("vpt-deep")}
    assert lines == {"search-rung1": 9, "search-rung2": 3, "final": 1}
    assert "grid" in out and "halving" in out and "image-steps" in out


@pytest.mark.parametrize("extra, needle", [
    (["--halving-rungs", "0.5,0.2,1"], "rungs must increase"),
    (["--halving-rungs", "0.1,0.5"], "the last rung must be 1"),
    (["--halving-rungs", "0,1"], "a rung is a fraction"),
    (["--halving-factor", "1"], "must be a number > 1"),
])
def test_bad_halving_settings_are_refused_before_compute(data_root, tmp_path, capsys, extra, needle):
    args = ["run", "--methods", "linear", "--suite", "testsuite", "--tasks", "toy", "--data-root", str(data_root),
            "--backbone", TINY_BACKBONE, "--runs-dir", str(tmp_path / "runs"), "--search", "halving", *extra]
    assert main(args) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.json"))


def test_halving_flags_without_halving_are_an_error(data_root, tmp_path, capsys):
    assert main(["run", "--methods", "linear", "--suite", "testsuite", "--data-root", str(data_root),
                 "--halving-factor", "2", "--dry-run"]) == 2
    assert "only apply with --search halving" in capsys.readouterr().err


def test_search_checks():
    with pytest.raises(SettingsError):
        Search("random").check()
    assert Search("halving").check().describe().startswith("halving")


def test_record_says_which_search_produced_it(data_root, tmp_path):
    _, store = sweep(data_root, tmp_path / "runs", search=SURVIVE)
    for path in (tmp_path / "runs").rglob("*.json"):
        rec = json.loads(path.read_text())
        if "spec" in rec:
            assert rec["spec"]["search"] == "halving"


def test_costs_of_each_choice_use_the_fused_rows_of_the_bench_table(data_root, tmp_path, monkeypatch, capsys):
    from peftbench.bench.estimate import print_costs
    from peftbench.methods import get_method

    table = tmp_path / "bench.csv"
    table.write_text("method,variant,device,precision,compile,train_images_per_s,eval_images_per_s\n"
                     "vpt-deep,,cpu,fp32,False,100,1e12\n"
                     "vpt-deep,fused-4,cpu,fp32,False,300,1e12\n")
    settings = Sweep(methods=["vpt-deep"], suite="testsuite", tasks=["toy"], data_root=str(data_root),
                             backbone=TINY_BACKBONE, seeds=[1],
                             **{"epochs": 10, "batch_size": 16, "lr": (0.1, 0.2, 0.4, 0.8),
                                        "wd": (0.0, 0.001)})
    contexts = plan(settings)
    monkeypatch.setattr(type(get_method("vpt-deep")), "fusable", False, raising=False)
    rows = print_costs(contexts, table)
    assert len(rows) == 2 and "can be fused" in capsys.readouterr().out  # a method that cannot fuse: no fused rows
    monkeypatch.setattr(type(get_method("vpt-deep")), "fusable", True, raising=False)
    rows = {(r["kind"], r["fuse"]): r for r in print_costs(contexts, table)}
    assert set(rows) == {("grid", 0), ("grid", 4), ("halving", 0), ("halving", 4)}
    n_train, n_final = 48, 64  # the toy task's train800 and train800val200
    grid = rows[("grid", 0)]
    assert grid["search_image_steps"] == 8 * 10 * n_train and grid["image_steps"] == 8 * 10 * n_train + 10 * n_final
    assert grid["hours"] * 3600 == pytest.approx(grid["image_steps"] / 100)
    # fused: the 8 search runs train in 2 groups of 4 at 300 configuration-images/s; the final run alone
    assert rows[("grid", 4)]["hours"] * 3600 == pytest.approx(8 * 10 * n_train / 300 + 10 * n_final / 100)
    _, halving = budget(8, 10, Search("halving"))
    assert rows[("halving", 0)]["search_image_steps"] == halving * n_train
    assert "fused (--fuse 4)" in capsys.readouterr().out


def test_slurm_runs_each_rung_as_one_job_array(data_root, tmp_path):
    from peftbench.executors.slurm import SlurmExecutor, make_settings

    settings = make_settings(flags={"gpus_per_node": 0, "cpus_per_task": 1, "max_retries": 0},
                             sets=["cluster = 'debug'", "poll_s = 0.01"])
    ctxs = plan(Sweep(methods=["linear"], suite="testsuite", tasks=["toy"], protocol="vpt",
                      data_root=str(data_root), backbone=TINY_BACKBONE, seeds=[1], **fields_of(SURVIVE),
                      **{**OVERRIDES, "lr": (0.05, 0.01, 0.2)}))
    runs = tmp_path / "runs"
    ex = SlurmExecutor(settings, runs, quiet=True, log=lambda m: None)
    submitted = []
    real_submit = ex._submit
    ex._submit = lambda specs, why: submitted.append([s.stage for s in specs]) or real_submit(specs, why)
    try:
        outcomes = drive(ctxs, ex, RunStore(runs))
    finally:
        ex.close()
    assert outcomes[0].error is None
    assert submitted == [["search-rung1"] * 3, ["search-rung2"] * 2, ["search"] * 2, ["final"]]
    st = by_stage(RunStore(runs))
    assert all(r.status == "ok" and r.get("executor") for recs in st.values() for r in recs)
    assert all(r.get("resumed_from") for r in st["search"] + st["search-rung2"])


def test_e2vpt_prune_searches_its_stage_a_by_halving_and_marks_every_later_stage(data_root):
    settings = Sweep(methods=["e2vpt-prune"], suite="testsuite", tasks=["toy"], data_root=str(data_root),
                             backbone=TINY_BACKBONE, seeds=[1], search="halving",
                             **{"epochs": 10, "batch_size": 16, "lr": (0.1, 0.2, 0.4, 0.8),
                                        "wd": (0.0,)})
    specs = count_runs(plan(settings))
    stages = [s.stage for s in specs]
    assert stages[:4] == ["search-rung1"] * 4 and stages[4:6] == ["search-rung2"] * 2
    assert "search" not in stages and {"before_pruning", "importance", "rewind", "final"} <= set(stages)
    assert all(s.search == "halving" for s in specs)


def test_fused_halving_equals_halving_run_by_run(data_root, tmp_path):
    """--search halving with --fuse: the configurations of each rung train as one model, continuing from
    their own rung states; every record equals the one of the same halving trained run by run."""
    _, alone = sweep(data_root, tmp_path / "alone", search=SURVIVE)
    _, fused = sweep(data_root, tmp_path / "fused", search=SURVIVE, env=Env(quiet=True, save_weights="all", fuse=4))
    a, f = by_stage(alone), by_stage(fused)
    assert sorted(a) == sorted(f) == ["final", "search", "search-rung1", "search-rung2"]
    for stage in ("search-rung1", "search-rung2", "search"):
        for ra, rf in zip(a[stage], f[stage]):
            assert ra.key == rf.key and rf.get("fused", {}).get("group_size") == 2
            assert [e["epoch"] for e in ra.history] == [e["epoch"] for e in rf.history]
            for ea, ef in zip(ra.history, rf.history):
                assert ef["train_loss"] == pytest.approx(ea["train_loss"], rel=1e-5, abs=1e-6)
            assert rf.top1 == pytest.approx(ra.top1, abs=1e-5)
            assert rf.get("resumed_from") == ra.get("resumed_from")
    assert a["final"][0].key == f["final"][0].key


@pytest.mark.parametrize("method", ["gps", "spt-lora"])
def test_halving_applies_to_methods_with_their_own_stages(method, data_root):
    """GPS and SPT emit their search through search_stage: --search halving plans rungs for them (their
    selection jobs first, the rungs, then the finals), and every run after the search records it."""
    settings = Sweep(methods=[method], suite="testsuite", tasks=["toy"], data_root=str(data_root),
                             backbone=TINY_BACKBONE, seeds=[1], search="halving",
                             **{"epochs": 10, "batch_size": 16, "lr": (0.1, 0.2, 0.4, 0.8),
                                        "wd": (0.0,)})
    specs = count_runs(plan(settings))
    stages = [s.stage for s in specs]
    jobs = [s for s in specs if s.job != "train"]
    assert jobs and all(stages.index(s.stage) < stages.index("search-rung1") for s in jobs)
    n = stages.count("search-rung1")
    assert n >= 4 and 0 < stages.count("search-rung2") < n and stages.count("search") < stages.count("search-rung2")
    assert all(s.hparams["stop_epoch"] < 10 for s in specs if s.stage.startswith("search-rung"))
    assert all(s.search == "halving" for s in specs if s.job == "train")
    grid = count_runs(plan(dataclasses.replace(settings, search="grid")))
    assert sum(s.stage == "search" for s in grid) == n  # the grid trains every point of the same search fully
