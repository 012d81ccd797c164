"""Results a researcher can trust: stale results are noticed, checkpoints never unpickle, concurrent
drivers train each run once, precision is part of a run's identity, planning and status are honest,
bad input is refused before compute with the exit code telling the truth."""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_BACKBONE, ensure_registered, make_data_root

from peftbench import fingerprint
from peftbench.cli import main
from peftbench.store import RunStore
from peftbench.train.loop import OnEpoch

ensure_registered()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("trustdata"))


def run(capsys, root, runs, *extra, methods="linear", tasks="toy", seeds="1"):
    code = main(["run", "--methods", methods, "--suite", "testsuite", "--tasks", tasks, "--data-root", str(root),
                 "--runs-dir", str(runs), "--backbone", TINY_BACKBONE, "--protocol", "fixed", "--seeds", seeds,
                 "--epochs", "2", "--batch-size", "16", "--quiet", *extra])
    return code, capsys.readouterr().err


def records(runs) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(runs).glob("*/*/*.json")) if "." not in p.stem]


# ---------------------------------------------------------------------------------------------
# 1. stale results
# ---------------------------------------------------------------------------------------------

PLUGIN = '''
from peftbench.methods import LINEAR_RECIPE, Method, TunedViT, register_method
from peftbench.train.loop import OnEpoch


@register_method
class Drifting(Method):
    name = "trust-drifting"
    description = "a linear probe whose code the test edits"
    recipe = LINEAR_RECIPE
    frozen_features = True
    version = VERSION

    def build(self, backbone, num_classes, opts):
        return TunedViT(backbone, num_classes)  # EDIT
'''


def _load_plugin(path: Path, version: int):
    path.write_text(PLUGIN.replace("VERSION", str(version)))
    name = f"trust_plugin_{version}_{time.time_ns()}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    from peftbench.methods import METHODS

    key = METHODS._norm("trust-drifting")
    METHODS._items.pop(key, None)  # the test re-registers its method after editing it
    METHODS._display.pop(key, None)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_changed_method_code_is_reported_stale_and_rerun_on_request(capsys, root, tmp_path):
    plugin = tmp_path / "trust_plugin.py"
    _load_plugin(plugin, 1)
    runs = tmp_path / "runs"
    assert run(capsys, root, runs, methods="trust-drifting")[0] == 0
    (rec,) = records(runs)
    assert set(rec["code"]) == {"method", "engine"}
    # a comment or docstring edit is not a code change
    plugin.write_text(plugin.read_text().replace("# EDIT", "# an edited comment"))
    fingerprint._LOADED.clear()  # (as a new process would: it loads the edited file)
    code, err = run(capsys, root, runs, methods="trust-drifting")
    assert code == 0 and "stale" not in err and "1 done already" in err
    # a real change of the method's code: reported, not silently reused
    plugin.write_text(plugin.read_text().replace("return TunedViT(backbone, num_classes)",
                                                 "model = TunedViT(backbone, num_classes)\n        return model"))
    fingerprint._LOADED.clear()  # (as a new process would: it loads the edited file)
    code, err = run(capsys, root, runs, methods="trust-drifting")
    assert code == 0 and "1 finished run(s) of 'trust-drifting' were produced by other code (its method code" in err
    assert "done already, skipped" not in err or "stale" in err
    assert main(["status", "--runs-dir", str(runs), "--no-query"]) == 0
    assert "stale" in capsys.readouterr().out
    main(["leaderboard", "--runs-dir", str(runs), "--no-plots"])
    assert "produced by other code" in capsys.readouterr().err
    # --rerun-stale reruns it; the old record is kept aside
    code, err = run(capsys, root, runs, "--rerun-stale", methods="trust-drifting")
    assert code == 0 and "1 stale record(s) set aside" in err
    (new,) = records(runs)
    assert new["code"]["method"] != rec["code"]["method"] and new["attempts"] == 1
    assert list(runs.rglob("*.stale.json"))
    assert "stale" not in run(capsys, root, runs, methods="trust-drifting")[1]


def test_bumping_a_method_version_changes_its_keys(capsys, root, tmp_path):
    plugin = tmp_path / "trust_plugin.py"
    _load_plugin(plugin, 1)
    runs = tmp_path / "runs"
    assert run(capsys, root, runs, methods="trust-drifting")[0] == 0
    _load_plugin(plugin, 2)
    code, err = run(capsys, root, runs, methods="trust-drifting")
    assert code == 0 and "0 done already" in err
    assert sorted(r["spec"]["method_version"] for r in records(runs)) == [1, 2]


# ---------------------------------------------------------------------------------------------
# 2. checkpoints never unpickle
# ---------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _first_spec(root, tmp_path):
    from peftbench.api.schema import Sweep
    from peftbench.sweep.drive import count_runs
    from peftbench.sweep.plan import plan

    ctxs = plan(Sweep(methods=["vpt-deep"], suite="testsuite", tasks=["toy"], data_root=str(root),
                              backbone=TINY_BACKBONE, protocol="fixed", seeds=[1],
                              **{"epochs": 2, "batch_size": 16}))
    return count_runs(ctxs)[0]


@pytest.mark.parametrize("planted", ["ckpt.pt", "ckpt.safetensors"])
def test_a_planted_pickle_checkpoint_is_never_executed(capsys, root, tmp_path, planted):
    runs = tmp_path / "runs"
    spec = _first_spec(root, tmp_path)
    store = RunStore(runs)
    store.write(spec, {"key": spec.key, "spec": spec.to_dict(), "status": "running"})
    marker = tmp_path / "pwned"
    path = store.record_path(spec).with_name(f"{spec.key}.{planted}")
    path.write_bytes(pickle.dumps({"epoch": 0, "state": _Evil(marker)}))
    code, err = run(capsys, root, runs, methods="vpt-deep")
    assert code == 1 and not marker.exists()  # the pickle never ran
    (rec,) = records(runs)
    assert rec["status"] == "failed" and "refusing to resume from" in rec["error"] and str(path) in rec["error"]


def test_checkpoints_hold_tensors_and_json_only(capsys, root, tmp_path):
    from safetensors import safe_open

    from peftbench.train.env import Env

    runs = tmp_path / "runs"
    spec = _first_spec(root, tmp_path)

    class Stop(BaseException):
        pass

    def stop(s, epoch):
        raise Stop

    from peftbench.train.engine import execute

    with pytest.raises(Stop):
        execute(spec, RunStore(runs), Env(quiet=True, hooks=[OnEpoch(lambda s, e: stop(s, e['epoch']))]))
    ckpt = RunStore(runs).checkpoint_path(spec)
    with safe_open(str(ckpt), framework="pt") as fh:
        meta = json.loads(fh.metadata()["peftbench"])
        keys = list(fh.keys())
    assert meta["format"] == "peftbench-checkpoint" and meta["info"]["epoch"] == 0
    assert any(k.startswith("state/") for k in keys) and "rng/cpu" in keys


# ---------------------------------------------------------------------------------------------
# 3. concurrent drivers train each run once; a killed driver's run is taken over
# ---------------------------------------------------------------------------------------------


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("peftbench")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "peftbench"]


def _env(tmp_path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PEFTBENCH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    return env


DEMO = ["--suite", "demo", "--tasks", "demo_digits", "--backbone", "demo-vit-random", "--quiet"]


@pytest.mark.slow
def test_concurrent_drivers_train_each_run_once(tmp_path, demo_root):
    runs = tmp_path / "runs"
    cmd = _cli() + ["run", "--methods", "vpt-shallow", "--seeds", "1,2,3,4", "--epochs", "2", "--data-root",
                    str(demo_root), "--runs-dir", str(runs), *DEMO[:-1]]  # not --quiet: count the trainings
    subprocess.run(_cli() + ["data", "verify", "--suite", "demo", "--tasks", "demo_digits", "--data-root",
                             str(demo_root)], env=_env(tmp_path), capture_output=True, timeout=300)
    procs = [subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    recs = records(runs)
    assert len(recs) == 4 and all(r["status"] == "ok" and r["attempts"] == 1 for r in recs)
    trained = sum(o[1].count(": ok top1") for o in outs)
    assert trained == 4, [o[1] for o in outs]  # 4 trainings in all, not 12


@pytest.mark.slow
def test_a_killed_driver_leaves_a_run_that_the_next_driver_takes_over(tmp_path, demo_root):
    runs = tmp_path / "runs"
    cmd = _cli() + ["run", "--methods", "vpt-shallow", "--seeds", "1", "--epochs", "8", "--data-root",
                    str(demo_root), "--runs-dir", str(runs), *DEMO[:-1]]
    p = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(runs.rglob("*.ckpt.safetensors")):
        time.sleep(0.2)
    assert list(runs.rglob("*.lease")), "the run holds a lease while it trains"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert main(["status", "--runs-dir", str(runs), "--no-query"]) == 0  # (no capsys: just must not fail)
    from peftbench.executors._status import collect

    (r,) = collect(runs, query=False)["runs"]
    assert r["status"] == "interrupted"  # its process is gone: not "running"
    again = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "taking over from a dead driver" in again.stderr and "resuming" in again.stderr
    (rec,) = records(runs)
    assert rec["status"] == "ok" and rec["attempts"] == 2


def test_status_tells_queued_and_running_runs(root, tmp_path):
    from peftbench.executors._status import collect
    from peftbench.store.journal import Journal

    runs = tmp_path / "runs"
    spec = _first_spec(root, tmp_path)
    store = RunStore(runs)
    journal = Journal(runs)
    journal.stage([spec])
    try:
        (r,) = collect(runs, query=False)["runs"]
        assert r["status"] == "pending" and "queued by pid" in r["holder"]
        store.write(spec, {"key": spec.key, "spec": spec.to_dict(), "status": "running"})
        with store.claim(spec):
            (r,) = collect(runs, query=False)["runs"]
            assert r["status"] == "running"
        (r,) = collect(runs, query=False)["runs"]
        assert r["status"] == "interrupted"
    finally:
        journal.close()


def test_a_dead_lease_is_taken_over_a_live_one_is_not(tmp_path):
    from peftbench.store import leases

    path = tmp_path / "x.lease"
    first = leases.claim(path, heartbeat=False)
    assert first is not None and leases.claim(path, heartbeat=False) is None  # held by a live process (us)
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "pid": 2**22 + 7}))  # a process that does not exist
    second = leases.claim(path, heartbeat=False)
    assert second is not None and second.took_over["pid"] == 2**22 + 7
    path.write_text(json.dumps({**info, "host": "elsewhere", "heartbeat": time.time() - 10 * leases.LEASE_TTL_S}))
    assert leases.claim(path, heartbeat=False) is not None  # expired heartbeat on another host


def test_a_fresh_lease_from_another_pid_namespace_is_live_whatever_its_pid(tmp_path):
    """Same hostname, another PID namespace (containers with host networking, hostNetwork pods): the pid
    says nothing here, the heartbeat decides."""
    from peftbench.store import leases

    path = tmp_path / "x.lease"
    info = {**leases.holder(), "pid": 2**22 + 7, "pid_ns": "pid:[1]", "heartbeat": time.time(), "token": "t"}
    path.write_text(json.dumps(info))
    assert leases.lease_state(leases.read_lease(path), path) == "live"
    assert leases.claim(path, heartbeat=False) is None
    path.write_text(json.dumps({**info, "heartbeat": time.time() - 10 * leases.LEASE_TTL_S}))
    assert leases.claim(path, heartbeat=False) is not None  # stale heartbeat: dead, whatever the namespace
    old = {k: v for k, v in info.items() if k not in ("boot_id", "pid_ns")}  # a lease without the two ids
    path.write_text(json.dumps(old))
    assert leases.claim(path, heartbeat=False) is None  # is never assumed to share our process table


def test_a_corrupt_lease_is_set_aside_not_fatal(tmp_path):
    from peftbench.store import leases

    path = tmp_path / "x.lease"
    for bad in ('{"pid": "abc", "host": "h", "heartbeat": 1}', "not json", "[1, 2]", '{"pid": 1, "heartbeat": "x"}'):
        path.write_text(bad)
        with pytest.warns(UserWarning, match="set aside"):
            lease = leases.claim(path, heartbeat=False)
        assert lease is not None and leases.read_lease(path)["token"] == lease.info["token"]
        lease.release()
    assert len(list(tmp_path.glob("x.lease.corrupt-*"))) >= 1


_HOLD = """
import sys, time
from peftbench.store import leases
lease = leases.claim(sys.argv[1])
print(lease.info["pid"], flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_drivers_in_separate_pid_namespaces_train_a_run_once(tmp_path):
    """A driver in another PID namespace (``unshare --pid``) holds a run's lease: its pid does not exist (or is
    another process) here, yet its heartbeat is fresh, so this driver leaves the run alone."""
    import shutil
    import subprocess
    import sys

    from peftbench.store import leases

    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) on this machine")
    path = tmp_path / "x.lease"
    cmd = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", sys.executable, "-c", _HOLD,
           str(path), "30"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        if not line:
            pytest.skip(f"unshare --pid is not permitted here: {proc.stderr.read().strip()[-200:]}")
        held = leases.read_lease(path)
        assert held["pid"] == int(line) and held["pid_ns"] != leases.holder()["pid_ns"]
        assert leases.claim(path, heartbeat=False) is None  # the run stays with its holder
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------
# 4. precision
# ---------------------------------------------------------------------------------------------


def test_precision_is_part_of_the_run_and_of_the_leaderboard_row(capsys, root, tmp_path):
    runs = tmp_path / "runs"
    assert run(capsys, root, runs, methods="vpt-deep")[0] == 0
    code, err = run(capsys, root, runs, "--precision", "bf16", methods="vpt-deep")  # bf16 autocast runs on CPU
    assert code == 0 and "0 done already" in err
    recs = records(runs)
    assert sorted(r["spec"]["hparams"].get("precision", "fp32") for r in recs) == ["bf16", "fp32"]
    assert all(r["status"] == "ok" for r in recs)
    main(["leaderboard", "--runs-dir", str(runs), "--no-plots"])
    board = (runs / "leaderboard" / "testsuite-leaderboard.csv").read_text()
    assert "vpt-deep [test-tiny-vit, fixed, bf16]" in board and "vpt-deep [test-tiny-vit, fixed]" in board


def test_vpt_protocol_defaults_to_fp32_and_the_demo_protocol_to_bf16_on_cuda():
    from peftbench.sweep.protocols import get_protocol

    assert get_protocol("vpt").default_precision("cuda") == "fp32"
    assert get_protocol("demo").default_precision("cuda") == "bf16"
    assert get_protocol("demo").default_precision("cpu") == "fp32"


def test_bf16_autocast_on_cpu_stays_close_to_fp32(tiny_backbone):
    from peftbench.methods import get_method
    from peftbench.train.loop import autocast

    torch.manual_seed(0)
    model = get_method("e2vpt").build(tiny_backbone, 5, {"prompt_tokens": 3, "kv_tokens": 2}).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with autocast(torch.device("cpu"), "bf16"):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), ref, atol=0.1, rtol=0.05)


# ---------------------------------------------------------------------------------------------
# 5. honest planning
# ---------------------------------------------------------------------------------------------


def test_dry_run_counts_finished_runs_and_estimates_what_remains(capsys, root, tmp_path):
    runs = tmp_path / "runs"
    assert run(capsys, root, runs, seeds="1,2")[0] == 0
    assert main(["run", "--methods", "linear", "--suite", "testsuite", "--tasks", "toy", "--data-root", str(root),
                 "--runs-dir", str(runs), "--backbone", TINY_BACKBONE, "--protocol", "fixed", "--seeds", "1,2,3",
                 "--epochs", "2", "--batch-size", "16", "--dry-run"]) == 0
    cap = capsys.readouterr()
    assert "(2 done already)" in cap.err and "2 done already, 1 to run" in cap.out


def test_slurm_pending_reason_that_cannot_resolve_stops_the_driver(tmp_path, monkeypatch):
    from peftbench.errors import SettingsError
    from peftbench.executors.slurm.executor import SlurmExecutor
    from peftbench.executors.slurm.queue import hopeless, parse_reason_lines
    from peftbench.executors.slurm.settings import make_settings
    from peftbench.store import RunSpec

    assert parse_reason_lines("12_[0-1]|PartitionConfig\n13|Resources\n") == {
        "12_0": "PartitionConfig", "12_1": "PartitionConfig", "13": "Resources"}
    assert hopeless("PartitionConfig") and not hopeless("Resources") and not hopeless("Priority")
    s = make_settings(flags={"gpus_per_node": 1, "cpus_per_task": 8}, sets=["cluster='debug'", "poll_s=0.01"])
    ex = SlurmExecutor(s, tmp_path / "runs", quiet=True, log=lambda m: None)
    ex.s.cluster = "slurm"
    ex.hopeless_after_s = 0.0
    spec = RunSpec(method="linear", task="toy", suite="testsuite", protocol="fixed", stage="final",
                   train_split="train800val200", eval_split="test", hparams={"lr": 0.1, "wd": 0.0, "epochs": 1,
                                                                            "batch_size": 8}, seed=1)
    cancelled = []
    monkeypatch.setattr(ex, "_query", lambda ids: {j: {"state": "PENDING"} for j in ids})
    monkeypatch.setattr(ex, "_pending_reasons", lambda ids: {j: "PartitionConfig" for j in ids})
    monkeypatch.setattr(ex, "_submit", lambda specs, why: {sp.key: "90_0" for sp in specs})
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: cancelled.append(cmd))
    with pytest.raises(SettingsError, match="PartitionConfig.*--cpus-per-task"):
        ex.run([spec], RunStore(tmp_path / "runs"))
    ex.close()
    assert cancelled and cancelled[0][:2] == ["scancel", "90"]


# ---------------------------------------------------------------------------------------------
# 7-8. small traps and bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,needle", [
    (["--methods", ","], "--methods names no method"),
    (["--device", "tpu"], "--device 'tpu': not a device"),
    (["--epochs", "0"], "--epochs: 0 is below its minimum 1"),
    (["--epochs", "-3"], "--epochs: -3"),
    (["--epochs", "1000000000000"], "--epochs: 1000000000000 is above its maximum"),
    (["--batch-size", "0"], "--batch-size: 0"),
    (["--batch-size", "1000000000"], "--batch-size: 1000000000 is above its maximum"),
    (["--batch-size", "-8"], "--batch-size: -8"),
    (["--lr", "-0.1"], "--lr: -0.1 is below its minimum 0"),
    (["--lr", "inf"], "--lr: inf is not a finite number"),
    (["--lr", "nan"], "--lr: nan is not a finite number"),
    (["--wd", "-1"], "--wd: -1.0 is below its minimum 0"),
    (["--seeds", "12345678901234567890"], "--seeds: 12345678901234567890 is above its maximum"),
    (["--seeds", "3,3"], "a seed is listed twice"),
    (["--num-seeds", "0"], "--num-seeds: 0 is below its minimum 1"),
    (["--num-seeds", "100000000"], "--num-seeds: 100000000 is above its maximum 1000"),
    (["--num-seeds", "-2"], "--num-seeds: -2"),
    (["--methods", "vpt-deep", "--set", "prompt_tokens=-1"], "below its minimum 0"),
    (["--methods", "vpt-deep", "--set", "dropout=1.5"], "above its maximum 1"),
    (["--methods", "vpt-deep", "--set", "prompt_tokens=100000000"], "cannot fit in the"),
    (["--backbone", "vit_base_patch16_244"], "Did you mean 'vit_base_patch16_224'"),
])
def test_bad_numbers_and_names_are_refused_before_compute(capsys, root, tmp_path, extra, needle):
    argv = ["run", "--suite", "testsuite", "--tasks", "toy", "--data-root", str(root), "--runs-dir",
            str(tmp_path / "runs"), "--backbone", TINY_BACKBONE, "--protocol", "fixed", "--seeds", "1", "--quiet"]
    if "--methods" not in extra:
        argv += ["--methods", "linear"]
    for flag, given in (("--backbone", "--backbone"), ("--seeds", "--seeds"), ("--seeds", "--num-seeds")):
        if given in extra and flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.json"))


def test_zero_prompts_warn_that_only_the_head_trains(capsys, root, tmp_path):
    code, err = run(capsys, root, tmp_path / "runs", "--set", "prompt_tokens=0", methods="vpt-deep")
    assert code == 0 and "trains nothing but the head" in err


def test_cuda_without_a_gpu_is_a_clear_error(capsys, root, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert run(capsys, root, tmp_path / "runs", "--device", "cuda")[1].count("no CUDA device on this machine") == 1
    assert main(["bench", "--device", "cuda", "--methods", "linear", "--backbone", TINY_BACKBONE]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_runs_dir_that_is_a_file_or_not_writable(capsys, root, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    code, err = run(capsys, root, f)
    assert code == 2 and "is a file, not a folder" in err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
        code, err = run(capsys, root, ro / "runs")
        assert code == 2 and "cannot write there" in err
    finally:
        ro.chmod(0o700)


def test_bad_checkpoint_files_are_clear_errors(capsys, root, tmp_path):
    for name, data in (("empty.safetensors", b""), ("garbage.safetensors", b"\x00garbage" * 10),
                       ("truncated.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")):
        p = tmp_path / name
        p.write_bytes(data)
        code, err = run(capsys, root, tmp_path / "runs", "--checkpoint", str(p))
        assert code == 2 and f"checkpoint {p} cannot be read as .safetensors" in err and "Traceback" not in err


def test_run_exits_nonzero_when_runs_fail_or_diverge_and_says_how_many(capsys, root, tmp_path, monkeypatch):
    from peftbench.train import loop

    real = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: real(*a, **k) * float("nan"))  # every loss diverges
    code, err = run(capsys, root, tmp_path / "runs", methods="vpt-deep", seeds="1,2")
    assert code == 1 and "0 run(s) failed, 2 diverged" in err


def test_records_follow_the_umask_so_a_group_can_read_them(capsys, root, tmp_path):
    old = os.umask(0o027)
    try:
        assert run(capsys, root, tmp_path / "runs")[0] == 0
    finally:
        os.umask(old)
    (p,) = [p for p in (tmp_path / "runs").glob("*/*/*.json")]
    mode = stat.S_IMODE(p.stat().st_mode)
    assert mode & stat.S_IRGRP and not mode & stat.S_IROTH


def test_a_killed_attempt_counts_in_wall_s(capsys, root, tmp_path, monkeypatch):
    """The running record's wall_s keeps up with the attempt between epochs (a small ticking thread), so a
    process killed at any moment loses at most one tick of its time; the next attempt adds its own."""
    from peftbench.train import engine
    from peftbench.train.engine import execute
    from peftbench.train.env import Env

    monkeypatch.setattr(engine, "WALL_TICK_S", 0.1)
    spec = _first_spec(root, tmp_path)
    store = RunStore(tmp_path / "runs")
    seen = {}

    class Kill(BaseException):
        pass

    def stuck_then_killed(s, epoch):
        time.sleep(1.5)  # e.g. a slow evaluation, a stalled file system: no epoch ends, the time still counts
        seen.update(wall=store.load(spec).wall_s, real=time.time() - t0)
        raise Kill

    t0 = time.time()
    with pytest.raises(Kill):
        execute(spec, store, Env(quiet=True, hooks=[OnEpoch(lambda s, e: stuck_then_killed(s, e['epoch']))]))
    assert seen["real"] - seen["wall"] < 0.7, seen  # without the ticks it would lag by the 1.5 s
    first = store.load(spec).wall_s
    assert store.load(spec).status == "running" and first >= seen["wall"]
    rec = execute(spec, store, Env(quiet=True))
    assert rec.status == "ok" and rec.wall_s > first
    time.sleep(0.3)
    assert store.load(spec).status == "ok"  # no tick after the end overwrote the final record


def test_leaderboard_defaults_next_to_the_runs_and_never_overwrites_another_stores_files(capsys, root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for runs in (a, b):
        assert run(capsys, root, runs)[0] == 0
    out = tmp_path / "out"
    assert main(["leaderboard", "--runs-dir", str(a)]) == 0
    assert (a / "leaderboard" / "testsuite-leaderboard.csv").is_file()
    assert main(["leaderboard", "--runs-dir", str(a), "--out", str(out), "--no-plots"]) == 0
    capsys.readouterr()
    assert main(["leaderboard", "--runs-dir", str(b), "--out", str(out), "--no-plots"]) == 2
    assert "written from another run store" in capsys.readouterr().err
    assert main(["leaderboard", "--runs-dir", str(b), "--out", str(out), "--no-plots", "--force"]) == 0
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["leaderboard", "--runs-dir", str(a), "--out", str(f)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_a_full_disk_names_the_file_and_keeps_earlier_records(capsys, root, tmp_path, monkeypatch):
    import errno

    from peftbench.store import checkpoints

    runs = tmp_path / "runs"
    assert run(capsys, root, runs, seeds="1")[0] == 0
    before = {p: p.read_bytes() for p in runs.glob("*/*/*.json")}

    def full(path, write, fsync=True):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints, "atomic_write", full)
    code, err = run(capsys, root, runs, methods="vpt-deep")
    assert code == 1
    rec = next(r for r in records(runs) if r["spec"]["method"] == "vpt-deep")
    assert rec["status"] == "failed" and "cannot write the checkpoint" in rec["error"]
    assert "No space left on device" in rec["error"] and ".ckpt.safetensors" in rec["error"]
    assert all(p.read_bytes() == data for p, data in before.items())


@pytest.mark.slow
def test_interrupt_through_a_dead_pipe_still_exits_130(tmp_path, demo_root):
    cmd = _cli() + ["run", "--methods", "vpt-shallow", "--epochs", "200", "--data-root", str(demo_root),
                    "--runs-dir", str(tmp_path / "runs"), *DEMO[:-1]]
    p = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "runs").rglob("*.ckpt.safetensors")):
        time.sleep(0.2)
    p.stdout.close()  # the reader of a `| tee` went away
    p.stderr.close()
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=120) == 130


@pytest.mark.slow
def test_a_closed_output_pipe_never_fails_a_run(tmp_path, demo_root):
    """`peftbench run ... 2>&1 | head -1`: the reader goes away after one line; the sweep trains on, muted,
    and records its runs ok (an output error is never a run's error)."""
    runs = tmp_path / "runs"
    cmd = _cli() + ["run", "--methods", "vpt-shallow", "--seeds", "1,2", "--epochs", "3", "--data-root",
                    str(demo_root), "--runs-dir", str(runs), "--verbose", *DEMO[:-1]]
    p = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert p.stdout.readline()
    p.stdout.close()
    assert p.wait(timeout=900) == 0
    recs = records(runs)
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]


@pytest.mark.slow
def test_broken_pipe_on_list_is_quiet(tmp_path):
    out = subprocess.run(" ".join(_cli()) + " list methods | head -1", shell=True, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert "Traceback" not in out.stderr and out.stdout.strip()


@pytest.mark.slow
def test_an_installed_wheel_finds_its_reference_numbers_bench_tables_and_assets(tmp_path):
    """A non-editable install: the wheel holds the package data, found without the source checkout."""
    import zipfile

    repo = Path(__file__).resolve().parent.parent
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(repo), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("peftbench-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import peftbench, peftbench.results.reference as r, peftbench.bench.estimate as e, peftbench.backbones as b;"
             "print(peftbench.__file__); print(r.default_reference_dir()); print(e.TABLES);"
             "print(b.resolve_checkpoint('demo-vit', None));"
             "from peftbench.methods import METHODS; from peftbench.tasks import SUITES, get_task;"
             "import peftbench.methods.vpt as v, peftbench.methods.spt.method as s;"
             "print(v.PROMPT_LENGTHS); print(s.RELEASED); print(peftbench.methods.__file__);"
             "from peftbench.sweep.paper import papers_dir, recipes; print(papers_dir());"
             "print(len(METHODS.names()), len(SUITES.names()), len(recipes()), file=__import__('sys').stderr);"
             "m = METHODS.get('vpt-shallow'); print(m.resolve_options(m.parse_options({}), get_task('cifar100'))[0],"
             " file=__import__('sys').stderr)")
    env = dict(_env(tmp_path), PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [Path(x) for x in out.stdout.split()]
    assert all(str(x).startswith(str(site)) for x in lines), lines  # the wheel's copy, not the checkout
    assert (lines[1] / "vtab-top1.csv").is_file() and list(lines[2].glob("bench-cpu-*.csv")) and lines[3].is_file()
    # the top-level plugin folders install inside the package, their per-task data beside them
    assert lines[4].is_file() and lines[5].is_file() and lines[6] == site / "peftbench" / "methods" / "__init__.py"
    assert (lines[7] / "e2vpt.toml").is_file() and (lines[7] / "noah.toml").is_file()  # the paper recipes
    from peftbench.methods import METHODS

    builtin = [n for n, m in METHODS.items() if type(m).__module__.startswith("peftbench.methods.")]
    from peftbench.sweep.paper import papers_dir, read_card

    pairs = sum(len(c.methods) * len(c.suites) for c in map(read_card, papers_dir().glob("*.toml")))
    assert out.stderr.split("\n")[0].split() == [str(len(builtin)), "3", str(pairs)], out.stderr  # demo, vtab, fgvc
    assert "'prompt_tokens': 100" in out.stderr  # VPT-shallow's cifar100 length, read from the wheel's CSV
