"""A demo sweep through submitit on a real SLURM cluster, with a preemption and a cancelled job.

Needs a cluster: ``bash scripts/slurm/start-slurm.sh`` (one node on this machine; set
``SLURM_CRED_EXPIRE=10`` so that a requeued job may start again after ~15 s instead of ~35 s).
Skipped, with the reason, when the SLURM commands are missing or no cluster answers (a failure
instead with ``PEFTBENCH_REQUIRE_SLURM=1``, which CI sets after starting the cluster).

What it shows (docs/slurm.md):
* ``peftbench run --executor slurm`` submits the stage as one job array and completes the sweep;
* ``peftbench status`` shows the running run with its job id while the sweep runs;
* a preempted job (submitit ``job._interrupt()``: SIGTERM + USR2, as SLURM does before a preemption
  or time limit) requeues itself, restarts (``SLURM_RESTART_COUNT`` 1) and resumes from its last epoch
  checkpoint;
* pickles planted where submitit keeps a job's callable (``<job>_submitted.pkl``) are never loaded,
  before the job starts or when it restarts (the job runs a JSON payload);
* a job whose process is killed mid-run (SIGKILL, as by the OOM killer or a node failure) ends
  without a result; the driver resubmits the run (recorded in ``retries``) and it resumes from its
  checkpoint again;
* the same command run again finds every run done and submits nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

EPOCHS = 8  # room for two interruptions, each after a checkpoint and before the last epoch (a loaded
#            machine reaches the first interruption several epochs in)


def _no_cluster_reason() -> str | None:
    for tool in ("sinfo", "srun", "sbatch", "scancel", "squeue"):
        if shutil.which(tool) is None:
            return (f"`{tool}` not found: no SLURM here (start a one-node cluster with "
                    "`bash scripts/slurm/start-slurm.sh`)")
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no SLURM cluster answers (sinfo: {exc})"
    if r.returncode != 0:
        return f"no SLURM cluster answers (sinfo: {(r.stderr or r.stdout).strip()[:200]})"
    states = [s.strip().rstrip("*~#$@+!%") for s in r.stdout.split()]
    if not any(s in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"the SLURM cluster has no usable node (sinfo states: {states})"
    return None


@pytest.fixture(scope="module")
def cluster():
    reason = _no_cluster_reason()
    if reason:
        if os.environ.get("PEFTBENCH_REQUIRE_SLURM") == "1":  # CI started a cluster: not finding it is an error
            pytest.fail(f"PEFTBENCH_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=20).stdout
    return {"gpus": "gpu" in gres}


def _env() -> dict:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ckpt_epoch(path: Path) -> int | None:
    """The last epoch saved in a run's checkpoint (None: absent, or replaced while we read it)."""
    from peftbench.store import checkpoints

    resumes_from = checkpoints.epoch(path)  # 0 when it cannot be read
    return resumes_from - 1 if resumes_from else None


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def test_sweep_survives_preemption_and_kill(cluster, tmp_path, demo_root):
    runs = tmp_path / "runs"
    profile = tmp_path / "profile.toml"
    profile.write_text(
        "# CI profile: the one-node cluster of scripts/slurm/start-slurm.sh\n"
        f"gpus_per_node = {1 if cluster['gpus'] else 0}\n"
        "cpus_per_task = 1\nmem_gb = 2\ntimeout_min = 20\nsignal_delay_s = 60\n"
        "array_parallelism = 2\nmax_retries = 2\npoll_s = 1\n")
    cmd = [sys.executable, "-m", "peftbench", "run", "--executor", "slurm", "--executor-profile", str(profile),
           "--methods", "linear,vpt", "--tasks", "demo_digits", "--backbone", "demo-vit-random",
           "--epochs", str(EPOCHS), "--data-root", str(demo_root), "--runs-dir", str(runs)]
    log_path = tmp_path / "driver.log"
    t0 = time.time()
    timeline = []

    def mark(what):
        timeline.append(f"{time.time() - t0:6.1f}s {what}")

    with open(log_path, "w") as log:
        driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
    try:
        def wait_for(cond, timeout, what):
            deadline = time.time() + timeout
            while time.time() < deadline:
                value = cond()
                if value:
                    mark(what)
                    return value
                if driver.poll() is not None:
                    pytest.fail(f"the driver exited ({driver.returncode}) while waiting for {what}:\n{_tail(log_path)}")
                time.sleep(0.2)
            queue = subprocess.run(["squeue", "-a"], capture_output=True, text=True).stdout
            pytest.fail(f"no {what} after {timeout} s\n{chr(10).join(timeline)}\n{_tail(log_path)}\n{queue}")

        def vpt():
            found = sorted((runs / "vpt-deep" / "demo_digits").glob("*.json"))
            if not found:
                return None, None, None
            rec = _load(found[0])
            return found[0], rec, _ckpt_epoch(found[0].with_name(found[0].stem + ".ckpt.safetensors"))

        # 1. the vpt run is running in its job and has finished its first epoch (checkpoint epoch 0)
        _, rec, _ = wait_for(lambda: (lambda p, r, e: (p, r, e) if r and r["status"] == "running" and e is not None
                                      else None)(*vpt()), 420, "vpt checkpoint after epoch 1")
        job = rec["executor"]["job_id"]

        # 2. `peftbench status` shows it running, with its job id
        st = subprocess.run([sys.executable, "-m", "peftbench", "status", "--runs-dir", str(runs), "--json"],
                            capture_output=True, text=True, env=_env(), timeout=120)
        assert st.returncode == 0, st.stderr
        by_method = {r["method"]: r for r in json.loads(st.stdout)["runs"]}
        assert by_method["vpt-deep"]["status"] == "running" and by_method["vpt-deep"]["job"] == job, by_method
        assert set(by_method) == {"linear", "vpt-deep"}
        text = subprocess.run([sys.executable, "-m", "peftbench", "status", "--runs-dir", str(runs)],
                              capture_output=True, text=True, env=_env(), timeout=120).stdout
        assert "vpt-deep" in text and f"job {job}" in text, text

        # 3. plant a pickle where submitit would keep the job's callable (unpickled at every start by
        #    submitit's own job wrapper), then preempt the job: it requeues itself and restarts
        import submitit

        class Plant:
            def __reduce__(self):
                return (Path.touch, (tmp_path / "PWNED",))

        import pickle

        job_dir = runs / ".slurm" / "logs" / job.split("_")[0]
        for name in (f"{job}_submitted.pkl", f"{job.split('_')[0]}_submitted.pkl", f"{job}_0_result.pkl"):
            (job_dir / name).write_bytes(pickle.dumps(Plant()))
        submitit.SlurmJob(folder=runs / ".slurm" / "logs", job_id=job)._interrupt()
        mark(f"interrupted job {job}")

        # 4. it restarts (SLURM_RESTART_COUNT 1), resumes from its checkpoint and checkpoints a further
        #    epoch (so it is now training an epoch before the last one ends)
        def resumed_and_checkpointed():
            _, r, e = vpt()
            starts = ((r or {}).get("executor") or {}).get("starts") or []
            if r and r["status"] == "running" and starts and starts[-1]["restart_count"] >= 1 \
                    and starts[-1]["resume_epoch"] >= 1 and e is not None and e >= starts[-1]["resume_epoch"]:
                return r
            return None

        rec = wait_for(resumed_and_checkpointed, 300, "requeued job resumed and checkpointed a further epoch")
        assert rec["executor"]["job_id"] == job  # requeued under the same id

        # 5. kill the run's process at once, as the OOM killer or a crashing node would (`scancel` would
        #    send SIGTERM first, which submitit ignores, and the run could end during SLURM's KillWait):
        #    the job ends without a result; the driver resubmits the run (a retry), which resumes again
        start = rec["executor"]["starts"][-1]
        assert start["node"] == socket.gethostname() or start["node"] == socket.gethostname().split(".")[0]
        os.kill(start["pid"], signal.SIGKILL)
        mark(f"killed pid {start['pid']} of job {job}")
        rc = driver.wait(timeout=600)
        mark(f"driver exited {rc}")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    out = log_path.read_text()
    print("\n".join(timeline))
    assert rc == 0, out[-6000:]

    # every run of the sweep is present and ok
    records = {p.parent.parent.name: _load(p) for p in runs.glob("*/*/*.json")}
    assert set(records) == {"linear", "vpt-deep"}, records.keys()
    assert all(r["status"] == "ok" and r["metrics"]["top1"] is not None for r in records.values()), out[-4000:]
    v = records["vpt-deep"]
    starts = v["executor"]["starts"]
    # preemption: same job restarted; cancel: retried as a new job that resumed from the last checkpoint
    assert any(s["job_id"] == job and s["restart_count"] >= 1 and s["resume_epoch"] >= 1 for s in starts), starts
    assert len(v["retries"]) == 1 and v["retries"][0]["job_id"] == job, v["retries"]
    assert v["retries"][0]["state"] in ("FAILED", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY"), v["retries"]
    assert starts[-1]["job_id"] != job and starts[-1]["resume_epoch"] >= 2, starts
    assert v["attempts"] >= 3 and len(v["history"]) == EPOCHS
    assert not list(runs.glob("*/*/*.ckpt.safetensors"))  # checkpoints are gone once runs end
    assert not (tmp_path / "PWNED").exists()  # the planted pickles never ran
    logs = "\n".join(p.read_text(errors="replace") for p in (runs / ".slurm" / "logs").rglob("*_log.err"))
    assert "resuming vpt-deep demo_digits" in logs and "checkpoint: requeueing" in logs
    assert "retry 1/2" in out and "ok top1" in out

    # the state file knows every job; status reports everything done
    state = json.loads((runs / ".slurm" / "state.json").read_text())
    assert state["runs"][v["key"]]["jobs"][:1] == [job] and len(state["runs"][v["key"]]["jobs"]) == 2
    st = json.loads(subprocess.run([sys.executable, "-m", "peftbench", "status", "--runs-dir", str(runs), "--json"],
                                   capture_output=True, text=True, env=_env(), timeout=120).stdout)
    assert sorted(r["status"] for r in st["runs"]) == ["done", "done"] and st["driver"] is None

    # started again, the driver finds every run done and submits nothing
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done already, skipped") == 2 and "[slurm] stage" not in again.stderr, again.stderr[-3000:]
