"""The SLURM executor's logic without SLURM: submitit's in-process ``debug`` cluster runs the job
arrays; profiles and flags, stages as arrays, packing, retries, give-up, re-attach, the driver lock,
the state file and ``peftbench status``. The real cluster is tests/test_slurm_integration.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest
import submitit
from helpers import TINY_BACKBONE, make_data_root

from peftbench.api.schema import Sweep
from peftbench.cli import build_parser
from peftbench.cli import main as cli_main
from peftbench.errors import SettingsError
from peftbench.executors import slurm as slurm_mod
from peftbench.executors.slurm import SlurmExecutor, make_settings, parse_state_lines, read_state
from peftbench.executors.slurm import job as slurm_job
from peftbench.executors.slurm import payload as slurm_payload
from peftbench.store import RunRecord, RunSpec, RunStore
from peftbench.sweep.drive import count_runs, drive
from peftbench.sweep.plan import plan


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("toydata"))


def debug_settings(**kw):
    return make_settings(flags=dict({"gpus_per_node": 0, "cpus_per_task": 1, "max_retries": 2}, **kw),
                         sets=["cluster = 'debug'", "poll_s = 0.01"])


def contexts(data_root, lr_grid=(0.05, 0.01), seeds=(1,)):
    return plan(Sweep(methods=["linear"], suite="testsuite", tasks=["toy"], protocol="vpt",
                              data_root=str(data_root), backbone=TINY_BACKBONE, seeds=list(seeds),
                              **{"epochs": 2, "batch_size": 16, "lr": lr_grid, "wd": (0.0,)}))


def spec(data_root, seed=1, task="toy", **kw):
    hp = {"optimizer": "sgd", "batch_size": 16, "epochs": 1, "lr": 0.05, "wd": 0.0, "eval_every": 0}
    return RunSpec(method="linear", task=task, suite="testsuite", protocol="vpt", stage="final",
                   train_split="train800val200", eval_split="test", hparams=hp, seed=seed,
                   backbone=TINY_BACKBONE, data_root=str(data_root), **kw)


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------


def test_profile_settings_and_errors(tmp_path):
    prof = tmp_path / "cluster.toml"
    prof.write_text('partition = "gpu"\naccount = "proj"\ngpus_per_node = 4\nmem_gb = 64\npack = 2\n'
                    'setup = ["module load cuda"]\n[additional_parameters]\nexclude = "node07"\n')
    s = make_settings(prof, sets=["max_retries = 5"], flags={"gpus_per_node": 1, "partition": None})
    assert (s.partition, s.account, s.gpus_per_node, s.mem_gb, s.pack, s.max_retries) == ("gpu", "proj", 1, 64.0, 2, 5)
    assert s.additional_parameters == {"exclude": "node07"} and s.setup == ["module load cuda"]
    assert "partition=gpu" in s.describe() and "--exclude=node07" in s.describe()

    prof.write_text('partition = "gpu"\ngpus = 2\n')
    with pytest.raises(SettingsError, match=rf"{prof}.*no setting 'gpus'"):
        make_settings(prof)
    prof.write_text('timeout_min = "2h"\n')
    with pytest.raises(SettingsError, match=r"timeout_min must be an integer"):
        make_settings(prof)
    prof.write_text('timeout_min = 1\nsignal_delay_s = 120\n')
    with pytest.raises(SettingsError, match="signal_delay_s"):
        make_settings(prof)
    with pytest.raises(SettingsError, match="no such file"):
        make_settings(tmp_path / "missing.toml")
    with pytest.raises(SettingsError, match="pack=0 is below its minimum 1"):
        make_settings(flags={"pack": 0})
    with pytest.raises(SettingsError, match="gpus_per_node=100000 is above its maximum"):
        make_settings(flags={"gpus_per_node": 100_000})
    # the committed example profile stays valid
    example = make_settings(Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "profile.example.toml")
    assert example.partition == "gpu" and example.additional_parameters["exclude"] == "node[07-08]"


def test_generic_executor_flags_are_translated_by_the_chosen_executor(tmp_path, data_root):
    """One vocabulary for every executor (submitit's habit): --gpus-per-node, --cpus-per-task, --timeout-min,
    --max-retries, --workers become SLURM's gpus_per_node, cpus_per_task, ..., array_parallelism; the
    executor's own keys come through --executor-set / --executor-profile; a generic setting an executor cannot
    honour is a one-line error before any planning."""
    from peftbench.api import plan_sweep
    from peftbench.cli.run import sweep_from_args

    prof = tmp_path / "p.toml"
    prof.write_text('partition = "p0"\naccount = "acct"\n')
    args = build_parser().parse_args(
        ["run", "--methods", "linear", "--suite", "testsuite", "--tasks", "toy", "--backbone", TINY_BACKBONE,
         "--data-root", str(data_root), "--executor", "slurm", "--gpus-per-node", "0", "--cpus-per-task", "2",
         "--timeout-min", "30", "--max-retries", "4", "--workers", "7", "--executor-profile", str(prof),
         "--executor-set", "partition=p1", "--executor-set", "pack=3", "--executor-set", "additional_parameters={exclude='n1'}",
         "--executor-set", "cluster=debug", "--runs-dir", str(tmp_path / "runs")])
    sweep = sweep_from_args(args)
    assert sweep.executor_settings == {"slurm": {"profile": str(prof), "partition": "p1", "pack": 3,
                                                 "additional_parameters": {"exclude": "n1"}, "cluster": "debug"}}
    plan = plan_sweep(sweep, check_data=False)
    s = plan.executor_settings
    assert (s["gpus_per_node"], s["cpus_per_task"], s["timeout_min"], s["max_retries"], s["array_parallelism"]) == \
        (0, 2, 30, 4, 7)
    assert (s["partition"], s["account"], s["pack"], s["additional_parameters"]) == ("p1", "acct", 3, {"exclude": "n1"})
    # the resolved sweep holds SLURM's own names (no generic keys left)
    assert plan.sweep.gpus_per_node is None and plan.sweep.executor_settings["slurm"]["array_parallelism"] == 7
    # a generic setting another executor cannot honour, a setting it does not have: one line, exit 2
    assert cli_main(["run", "--methods", "linear", "--mem-gb", "4", "--dry-run"]) == 2
    local = sweep.replace(executor="local", executor_settings={}, **{k: None for k in sweep.generic_executor_settings()})
    with pytest.raises(SettingsError, match="--mem-gb .*executor 'local' does not take it"):
        plan_sweep(local.replace(mem_gb=4.0), check_data=False)
    with pytest.raises(SettingsError, match="executor 'slurm' has no setting 'partitions'"):
        plan_sweep(sweep.replace(executor_settings={"slurm": {"partitions": "x"}}), check_data=False)


def test_parse_sacct_and_squeue_lines():
    text = ("JobID|State|NodeList\n123_0|RUNNING|vm\n123_0.batch|RUNNING|vm\n123_1|CANCELLED by 0|vm\n"
            "123_[2-4%2]|PENDING|None assigned\n124|COMPLETED|vm\n125_7|OUT_OF_MEMORY|n3\n")
    st = parse_state_lines(text)
    assert st["123_0"] == {"state": "RUNNING", "node": "vm"}
    assert st["123_1"]["state"] == "CANCELLED" and st["124"]["state"] == "COMPLETED"
    assert [st[f"123_{i}"]["state"] for i in (2, 3, 4)] == ["PENDING"] * 3 and st["123_2"]["node"] is None
    assert st["125_7"]["state"] == "OUT_OF_MEMORY" and "123_0.batch" not in st


def test_a_job_payload_is_json_checked_field_by_field(tmp_path, data_root):
    """What a job runs is JSON (no pickle): written private (0o600 in a 0o700 folder), read back into the same
    specs; a payload naming an unregistered method or task, or a field of the wrong type, is refused."""
    folder = tmp_path / "logs"
    settings = {"runs_dir": str(tmp_path / "runs"), "device": "auto", "quiet": True, "tracking": None,
                "save_weights": "final", "fuse": 1, "timeout_min": 10, "signal_delay_s": 60, "max_num_timeout": 3}
    a, b = spec(data_root, seed=1), spec(data_root, seed=2, task="toy_b")
    path = slurm_payload.write_payload(folder, settings, [[a], [b]])
    assert oct(path.stat().st_mode & 0o777) == "0o600" and oct(path.parent.stat().st_mode & 0o777) == "0o700"
    data = json.loads(path.read_text())
    assert data["format"] == "peftbench-slurm-job" and len(data["tasks"]) == 2
    got, specs = slurm_payload.read_payload(path, 1)
    assert got == settings and [s.key for s in specs] == [b.key]
    with pytest.raises(SettingsError, match="array task 2 does not exist"):
        slurm_payload.read_payload(path, 2)
    for change, match in ((lambda d: d["tasks"][0][0].update(method="../../etc"), "not a run spec"),
                          (lambda d: d["tasks"][0][0].update(task="nope"), "not a run spec"),
                          (lambda d: d.update(fuse="2"), "field 'fuse'"),
                          (lambda d: d.update(format="pickle"), "not a peftbench job payload")):
        d = json.loads(path.read_text())
        change(d)
        path.write_text(json.dumps(d))
        with pytest.raises(SettingsError, match=match):
            slurm_payload.read_payload(path, 0)
    cli = subprocess.run([sys.executable, "-m", "peftbench.executors.slurm.job", str(path)], capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 2 and "not a peftbench job payload" in cli.stderr and "Traceback" not in cli.stderr


def test_a_payload_or_folder_others_can_write_is_refused(tmp_path, data_root):
    """Whoever can write the SLURM folder or a payload could change what a job trains: a group-writable
    payload (or folder), or one another user owns, is refused by the job and by the driver before it submits."""
    settings = {"runs_dir": str(tmp_path / "runs"), "device": "auto", "quiet": True, "tracking": None,
                "save_weights": "final", "fuse": 1, "timeout_min": 10, "signal_delay_s": 60, "max_num_timeout": 3}
    path = slurm_payload.write_payload(tmp_path / "logs", settings, [[spec(data_root)]])
    path.chmod(0o620)
    with pytest.raises(SettingsError, match="group or others may write it"):
        slurm_payload.read_payload(path, 0)
    path.chmod(0o600)
    path.parent.chmod(0o770)
    with pytest.raises(SettingsError, match="group or others may write it"):
        slurm_payload.read_payload(path, 0)
    path.parent.chmod(0o700)
    if os.geteuid() == 0:  # root can hand the file to another user: then it is that user's payload
        os.chown(path, 54321, -1)
        with pytest.raises(SettingsError, match="owned by"):
            slurm_payload.read_payload(path, 0)
    # the driver: a group-writable SLURM folder (umask 002 on a shared store) is refused before submitting
    runs = tmp_path / "runs2"
    ex = SlurmExecutor(debug_settings(), runs, quiet=True, log=lambda m: None)
    try:
        (runs / ".slurm").chmod(0o775)
        with pytest.raises(SettingsError, match=r"\.slurm: group or others may write it"):
            ex.run([spec(data_root)], RunStore(runs))
    finally:
        ex.close()
    assert not RunStore(runs).load(spec(data_root))  # nothing ran


@pytest.mark.slow
def test_the_driver_never_unpickles_and_planted_pickles_never_run(tmp_path, demo_root, monkeypatch):
    """Pickles planted where submitit keeps its own (``<job>_submitted.pkl``, ``<job>_<task>_result.pkl``)
    are never loaded: a sweep on submitit's local cluster (real job processes running the JSON payload)
    finishes ok, the planted pickles' side effect never happens, and the driver calls no unpickler."""
    import pickle

    marker = tmp_path / "PWNED"

    class Plant:
        def __reduce__(self):
            return (Path.touch, (marker,))

    blob = pickle.dumps(Plant())
    runs = tmp_path / "runs"
    ex = SlurmExecutor(make_settings(flags={"gpus_per_node": 0, "cpus_per_task": 1, "max_retries": 0},
                                     sets=["cluster = 'local'", "poll_s = 0.2", "timeout_min = 10"]),
                       runs, quiet=True, log=lambda m: None)
    real = ex._submit_payload

    def submit_and_plant(packs):
        jobs = real(packs)
        for job in jobs:  # where submitit would look for the job's callable and its result
            folder = Path(str(ex.folder / "%A").replace("%A", str(job.job_id)))
            folder.mkdir(parents=True, exist_ok=True)
            for name in (f"{job.job_id}_submitted.pkl", f"{job.job_id}_0_result.pkl", f"{job.job_id}_0_submitted.pkl"):
                (folder / name).write_bytes(blob)
        return jobs

    def refuse(*a, **k):
        raise AssertionError("unpickled")

    monkeypatch.setattr(ex, "_submit_payload", submit_and_plant)
    for mod, name in ((pickle, "load"), (pickle, "loads"), (cloudpickle, "load"), (cloudpickle, "loads")):
        monkeypatch.setattr(mod, name, refuse)
    monkeypatch.setattr(submitit.core.utils.DelayedSubmission, "load", refuse)
    monkeypatch.setattr(submitit.core.core.Job, "result", refuse)
    hp = {"optimizer": "sgd", "batch_size": 64, "epochs": 1, "lr": 0.05, "wd": 0.0, "eval_every": 0}
    a, b = (RunSpec(method="linear", task="demo_digits", suite="demo", protocol="demo", stage="final",
                    train_split="train800val200", eval_split="test", hparams=hp, seed=seed, backbone="demo-vit-random",
                    data_root=str(demo_root)) for seed in (1, 2))  # a suite the job's own process knows
    from peftbench.tasks import get_task

    get_task("demo_digits").ensure(demo_root)
    try:
        recs = ex.run([a, b], RunStore(runs))
    finally:
        ex.close()
    assert [str(r.status) for r in recs] == ["ok", "ok"], [r.error for r in recs]
    assert not marker.exists()
    assert not list((runs / ".slurm").rglob("*.pkl")) or all(p.read_bytes() == blob for p in (runs / ".slurm").rglob("*.pkl"))
    payloads = list((runs / ".slurm" / "logs" / "payloads").glob("*.json"))
    assert len(payloads) == 1 and json.loads(payloads[0].read_text())["format"] == "peftbench-slurm-job"


def test_requeue_command_survives_the_jobs_sigterm(tmp_path):
    """On the preemption signal the job runs ``scontrol requeue``; SLURM's SIGTERM to the job's processes
    (the preemption's, or the requeue's own) must not kill that child (CI once saw ``Command ['scontrol',
    'requeue', ...] died with SIGTERM``). Here, in a fresh interpreter with the job's handlers installed and
    a fake ``scontrol`` that SIGTERMs itself: a child started before the requeue dies of SIGTERM; the
    requeue's ``scontrol`` outlives it, and the job exits after requeueing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"
    fake.write_text(f"#!/bin/sh\nkill -TERM $$\necho \"$@\" > {tmp_path / 'requeued'}\n")
    fake.chmod(0o755)
    script = f"""
import os, signal, subprocess, sys, time
from pathlib import Path
from peftbench.executors.slurm.job import Requeue, job_info
child = "kill -TERM $$; echo alive"
handler = Requeue(Path({str(tmp_path / 'p.json')!r}), {{"timeout_min": 60, "max_num_timeout": 3}}, job_info(), time.time())
handler.install()
before = subprocess.run(["sh", "-c", child], capture_output=True, text=True)
print(before.returncode, flush=True)
os.kill(os.getpid(), signal.SIGUSR2)
time.sleep(5)
print("not requeued")
"""
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert r.stdout.split() == [str(-signal.SIGTERM)], (r.stdout, r.stderr)
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    assert r.returncode == 255 and "checkpoint: requeueing (preempted)" in r.stderr


# ---------------------------------------------------------------------------------------------
# the executor, on submitit's in-process debug cluster
# ---------------------------------------------------------------------------------------------


def test_stages_run_as_arrays_and_records_name_their_jobs(tmp_path, data_root, capsys):
    runs = tmp_path / "runs"
    ctxs = contexts(data_root)
    total = len(count_runs(ctxs))
    logs = []
    ex = SlurmExecutor(debug_settings(pack=2), runs, quiet=True, total=total, log=logs.append)
    submitted = []
    real_submit = ex._submit
    ex._submit = lambda specs, why: submitted.append([s.stage for s in specs]) or real_submit(specs, why)
    outcomes = drive(ctxs, ex, RunStore(runs))
    ex.close()
    assert submitted == [["search", "search"], ["final"]]  # one array per stage, finished stages first
    assert outcomes[0].error is None and outcomes[0].records[0]["status"] == "ok"
    recs = [r for _, r, _ in RunStore(runs).iter_records()]
    assert len(recs) == total == 3 and all(r["status"] == "ok" for r in recs)
    jobs = {r["spec"]["stage"]: r["executor"]["job_id"] for r in recs}
    assert all(j.startswith("DEBUG_") for j in jobs.values())
    assert len({r["executor"]["job_id"] for r in recs if r["spec"]["stage"] == "search"}) == 1  # packed: 2 runs, 1 job
    assert all(r["executor"]["starts"][0]["resume_epoch"] == 0 for r in recs)
    state = read_state(runs)
    assert {e["job_id"] for e in state["runs"].values()} == {r["executor"]["job_id"] for r in recs}
    assert all(e["result"] == "ok" for e in state["runs"].values())
    assert any("[run 3/3]" in m for m in logs)

    # status: everything done, with job ids
    capsys.readouterr()
    assert cli_main(["status", "--runs-dir", str(runs), "--no-query", "--all"]) == 0
    out = capsys.readouterr().out
    assert "linear" in out and "toy" in out and "job DEBUG_" in out
    assert cli_main(["status", "--runs-dir", str(runs), "--json", "--no-query"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in info["runs"]] == ["done"] * 3 and info["driver"] is None

    # a second driver submits nothing: every run is done
    ex2 = SlurmExecutor(debug_settings(), runs, quiet=True, log=logs.append)
    ex2._submit = lambda specs, why: pytest.fail("resubmitted a finished run")
    drive(contexts(data_root), ex2, RunStore(runs))
    ex2.close()


def test_retries_give_up_and_exceptions(tmp_path, data_root, monkeypatch):
    """A job that ends without a final record is resubmitted up to max_retries times (each recorded in
    ``retries``), then the run is a failed record; an exception inside a run is a failed record at
    once, and the other runs of the array go on."""
    runs = tmp_path / "runs"
    store = RunStore(runs)
    flaky, dead, broken = spec(data_root, seed=1), spec(data_root, seed=2), spec(data_root, seed=3, task="toy_b")
    broken = RunSpec.from_dict(dict(broken.to_dict(), data_root=str(tmp_path / "nowhere")))
    real = slurm_job._execute
    calls = {}

    def fake_execute(s, st, env, on_claim=None):
        calls[s.key] = calls.get(s.key, 0) + 1
        if on_claim is not None:
            on_claim()
        if s.key == dead.key or (s.key == flaky.key and calls[s.key] == 1):
            return RunRecord.for_spec(s, status="running")  # the job "dies" here: its record stays "running"
        return real(s, st, env, on_claim=None)

    monkeypatch.setattr(slurm_job, "_execute", fake_execute)
    logs = []
    ex = SlurmExecutor(debug_settings(max_retries=1), runs, quiet=True, total=3, log=logs.append)
    recs = ex.run([flaky, dead, broken], store)
    ex.close()
    by = {r["spec"]["seed"]: r for r in recs}
    assert by[1]["status"] == "ok" and [r["reason"] for r in by[1]["retries"]] == ["resubmitted (retry 1 of 1)"]
    assert len(by[1]["executor"]["starts"]) == 2 and by[1]["attempts"] == 1
    assert by[2]["status"] == "failed" and len(by[2]["retries"]) == 1 and "gave up after 1 retry" in by[2]["error"]
    assert by[2]["retries"][0]["state"] == "COMPLETED"
    assert by[3]["status"] == "failed" and "Traceback" in by[3]["error"] and "retries" not in by[3]
    assert calls[flaky.key] == 2 and calls[dead.key] == 2 and calls[broken.key] == 1
    assert any("resubmitting (retry 1/1)" in m for m in logs)
    assert store.load(dead)["status"] == "failed" and not store.is_done(dead)  # a rerun tries it again


def test_restarted_driver_reattaches_instead_of_resubmitting(tmp_path, data_root, monkeypatch):
    runs = tmp_path / "runs"
    store = RunStore(runs)
    alive, ended = spec(data_root, seed=1), spec(data_root, seed=2)
    # what an earlier driver left behind: both submitted; one job still runs, the other died
    ex0 = SlurmExecutor(debug_settings(), runs, quiet=True, log=lambda m: None)
    ex0._track(alive, "77_0")
    ex0._track(ended, "77_1")
    ex0.close()
    store.write(ended, {"key": ended.key, "spec": ended.to_dict(), "status": "running", "slurm": {"job_id": "77_1"}})

    logs = []
    ex = SlurmExecutor(debug_settings(), runs, quiet=True, log=logs.append)
    ex.s.cluster = "slurm"  # re-attaching asks SLURM; answer for it
    polls = {"n": 0}

    def fake_query(ids):
        polls["n"] += 1
        if polls["n"] >= 3 and store.load(alive) is None:  # the re-attached job finishes
            store.write(alive, {"key": alive.key, "spec": alive.to_dict(), "status": "ok", "metrics": {"top1": 50.0},
                                "slurm": {"job_id": "77_0"}})
        states = {"77_0": "RUNNING" if polls["n"] < 3 else "COMPLETED", "77_1": "NODE_FAIL", "78": "COMPLETED"}
        return {j: {"state": states[j], "node": "n1"} for j in ids if j in states}

    def fake_submit(specs, why):
        assert [s.key for s in specs] == [ended.key], "only the run whose job died is submitted again"
        for s in specs:
            rec = dict(store.load(s) or {})  # as the engine does, keep `retries`
            rec.update(status="ok", metrics={"top1": 60.0}, slurm={"job_id": "78"})
            store.write(s, rec)
            ex._track(s, "78")
        return {s.key: "78" for s in specs}

    monkeypatch.setattr(ex, "_query_slurm", fake_query)
    monkeypatch.setattr(ex, "_submit", fake_submit)
    recs = ex.run([alive, ended], store)
    ex.close()
    assert [r["status"] for r in recs] == ["ok", "ok"]
    assert any("re-attached to job 77_0" in m for m in logs)
    rec = store.load(ended)
    assert rec["retries"][0]["state"] == "NODE_FAIL" and "restarted driver" in rec["retries"][0]["reason"]
    assert read_state(runs)["runs"][ended.key]["jobs"] == ["77_1", "78"]


def test_one_driver_per_runs_dir(tmp_path):
    runs = tmp_path / "runs"
    first = SlurmExecutor(debug_settings(), runs, quiet=True, log=lambda m: None)
    assert slurm_mod.driver_lock_holder(runs)["pid"] > 0
    with pytest.raises(SettingsError, match="another peftbench driver"):
        SlurmExecutor(debug_settings(), runs, quiet=True, log=lambda m: None)
    first.close()
    assert slurm_mod.driver_lock_holder(runs) is None
    SlurmExecutor(debug_settings(), runs, quiet=True, log=lambda m: None).close()
