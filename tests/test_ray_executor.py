"""``--executor ray`` against a real local Ray cluster (docs/executors.md).

CI starts one (``ray start --head --num-cpus 2`` in .ci/run, RAY_ADDRESS set) and sets
``PEFTBENCH_REQUIRE_RAY=1``: then a missing ray package or a cluster that does not answer is a failure,
not a skip. Without it, the test starts its own one-node cluster on the loopback address (and stops it)
when ray is installed, and is skipped when it is not.

One short demo sweep (two runs), which shows: one Ray task per run with its CPU request; a worker
killed mid-run (SIGKILL, as the OOM killer or a lost node would) is retried by Ray and the run resumes
from its checkpoint under its lease; ``peftbench status`` shows the running run with its Ray task and
the live driver; the tracker travels to the workers; the same command again trains nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REQUIRE = os.environ.get("PEFTBENCH_REQUIRE_RAY") == "1"
EPOCHS = 4


def _fail_or_skip(reason: str):
    if REQUIRE:
        pytest.fail(f"PEFTBENCH_REQUIRE_RAY=1 but {reason}")
    pytest.skip(reason)


def _ray_bin() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.is_file() else (shutil.which("ray") or "ray")


# Ray's single-machine mode: every address the loopback one (Ray otherwise swaps --node-ip-address 127.0.0.1
# for the machine's routable address); every process that talks to such a cluster needs it (.ci/run exports it)
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _answers(address: str, env: dict | None = None) -> str | None:
    """None when a Ray cluster answers at ``address``, else why not."""
    try:
        r = subprocess.run([_ray_bin(), "status", "--address", address], capture_output=True, text=True, timeout=60,
                           env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ray status --address {address}` failed: {exc}"
    return None if r.returncode == 0 else f"no Ray cluster answers at {address}: {(r.stderr or r.stdout).strip()[-300:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    try:
        import ray  # noqa: F401
    except ImportError:
        _fail_or_skip("the ray package is not installed (pip install 'peftbench[ray]')")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        why = _answers(address)
        if why:
            _fail_or_skip(why)
        yield address
        return
    if REQUIRE:
        pytest.fail("PEFTBENCH_REQUIRE_RAY=1 but RAY_ADDRESS is not set (.ci/run starts the cluster and sets it)")
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="pbray-", dir="/tmp")  # short: Ray's unix sockets live under it
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **LOOPBACK)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    log = open(Path(tmp) / "ray-start.log", "w")
    proc = subprocess.Popen([_ray_bin(), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
                             "--port", str(port), "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
                             "--disable-usage-stats", "--object-store-memory", str(100 * 2**20), "--temp-dir", tmp],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while _answers(address, env) is not None:
            if proc.poll() is not None or time.time() > deadline:
                pytest.skip(f"could not start a local Ray cluster: {(Path(tmp) / 'ray-start.log').read_text()[-1500:]}")
            time.sleep(2)
        saved = {k: os.environ.get(k) for k in LOOPBACK}
        os.environ.update(LOOPBACK)  # this process and the drivers it starts talk to the cluster on the loopback
        try:
            yield address
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        _stop(proc, tmp)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _stop(proc: subprocess.Popen, tmp: str) -> None:
    """Stop the cluster this test started, and only it: SIGTERM to `ray start --block` (it stops its
    processes, draining up to 30 s), then SIGKILL to whatever still runs from its temp dir."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if tmp in cmd:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("peftbench")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "peftbench"]


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_demo_sweep_on_a_ray_cluster(ray_cluster, tmp_path, demo_root):
    from peftbench.executors._status import collect

    runs = tmp_path / "runs"
    cache = tmp_path / "cache"
    runtime_env = (f'runtime_env={{env_vars={{PEFTBENCH_CACHE="{cache}", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"}}}}')
    trackers = ["--tracker", "tensorboard"] if _has("tensorboard") else []
    cmd = _cli() + ["run", "--executor", "ray", "--executor-set", f"address={ray_cluster}", "--cpus-per-task", "1",
                    "--max-retries", "2", "--executor-set", runtime_env, "--methods", "linear,vpt-shallow",
                    "--tasks", "demo_digits",
                    "--suite", "demo", "--backbone", "demo-vit-random", "--epochs", str(EPOCHS), "--seeds", "1",
                    "--data-root", str(demo_root), "--runs-dir", str(runs), *trackers]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PEFTBENCH_CACHE=str(cache), PYTHONUNBUFFERED="1")
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    seen_running = None
    killed = None
    try:
        deadline = time.time() + 400
        while driver.poll() is None and time.time() < deadline:
            found = sorted((runs / "vpt-shallow" / "demo_digits").glob("*.json"))
            rec = _load(found[0]) if found else None
            ck = found[0].with_name(found[0].stem + ".ckpt.safetensors") if found else None
            if rec and rec["status"] == "running" and rec.get("executor") and ck.exists():
                if seen_running is None:
                    st = collect(runs, query=False)
                    by_method = {r["method"]: r for r in st["runs"]}
                    if by_method.get("vpt-shallow", {}).get("status") == "running":
                        seen_running = st
                if killed is None and seen_running is not None:
                    killed = rec["executor"]["starts"][-1]["pid"]
                    os.kill(killed, signal.SIGKILL)  # the worker dies mid-run: Ray retries the task
            time.sleep(0.2)
        rc = driver.wait(timeout=max(1, deadline - time.time()))
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    out = log_path.read_text()
    assert rc == 0, out[-5000:]
    assert seen_running is not None, out[-3000:]
    vpt = next(r for r in seen_running["runs"] if r["method"] == "vpt-shallow")
    assert vpt["job"].startswith("ray:") and seen_running["driver"]["pid"] == driver.pid

    records = {p.parent.parent.name: _load(p) for p in runs.glob("*/*/*.json")}
    assert set(records) == {"linear", "vpt-shallow"}
    for rec in records.values():
        assert rec["status"] == "ok" and rec["metrics"]["top1"] is not None, rec.get("error")
        starts = rec["executor"]["starts"]
        assert starts[0]["pid"] != driver.pid and rec["executor"]["task_id"]  # trained in a Ray worker
    v = records["vpt-shallow"]
    assert killed is not None and len(v["history"]) == EPOCHS
    starts = v["executor"]["starts"]
    assert len(starts) == 2 and starts[0]["pid"] == killed and starts[1]["pid"] != killed, starts
    assert starts[1]["resume_epoch"] >= 1, starts  # the retried task resumed from the checkpoint
    assert v["attempts"] == 2 and not list(runs.glob("*/*/*.ckpt.safetensors"))
    assert "taking over from a dead driver" in out or "resuming vpt-shallow" in out
    if trackers:  # the tracker travelled to the workers: one event folder per run
        assert len(list((runs / "tensorboard").glob("*/*/*/*"))) == 2

    st = collect(runs, query=False)
    assert sorted(r["status"] for r in st["runs"]) == ["done", "done"] and st["driver"] is None
    assert all(r["job"].startswith("ray:") for r in st["runs"])
    text = subprocess.run(_cli() + ["status", "--runs-dir", str(runs), "--all"], capture_output=True, text=True,
                          env=env, timeout=120).stdout
    assert "job ray:" in text and "restarts 1" in text, text

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done already, skipped") == 2, again.stderr[-3000:]


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_ray_settings_are_checked_before_compute(tmp_path, capsys, monkeypatch):
    from peftbench.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    f = tmp_path / "s.toml"
    f.write_text("methods = ['linear']\n[executor.ray]\ncpus_per_run = -1\n")
    assert main(["run", "--config", str(f), "--dry-run", "--runs-dir", str(tmp_path / "r")]) == 2
    assert f"{f}:3: cpus_per_run=-1 is below its minimum 0" in capsys.readouterr().err
    f.write_text("methods = ['linear']\n[executor.ray]\naddres = 'x'\n")
    assert main(["run", "--config", str(f), "--dry-run"]) == 2
    assert f"{f}:3: executor 'ray' has no setting 'addres'" in capsys.readouterr().err
    # a generic setting the chosen executor cannot honour, a setting it does not have: before compute
    assert main(["run", "--methods", "linear", "--executor", "ray", "--mem-gb", "4", "--dry-run"]) == 2
    assert "--mem-gb (executor setting 'mem_gb'): executor 'ray' does not take it" in capsys.readouterr().err
    assert main(["run", "--methods", "linear", "--executor-set", "address=x:1", "--dry-run"]) == 2
    assert "executor 'local' has no setting 'address'" in capsys.readouterr().err

