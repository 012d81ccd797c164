"""``--executor ray``: every run as one Ray task on a Ray cluster (``pip install 'peftbench[ray]'``; docs/executors.md).

For cloud and Kubernetes users without SLURM. The driver (``peftbench run``) connects to the cluster
at ``[executor.ray] address`` (``--executor-set address=...``, else ``$RAY_ADDRESS``, else Ray's default: a
cluster started on this machine with ``ray start``, or a new local one), then, per stage of the sweep:

* submits **one Ray task per unfinished run**, each asking for ``cpus_per_run`` CPUs and
  ``gpus_per_run`` GPUs (default: 1 when the cluster has GPUs, else 0); a request that no node of the
  cluster can meet is an error before anything is submitted (it would wait forever);
* inside the task, the run trains through :func:`peftbench.train.engine.execute_claimed` under its
  **run lease** (``<key>.lease``): a run is trained by one process at a time, whatever drives it (two
  drivers, a Ray retry while the first attempt still lives); a dead lease is taken over and the run
  resumes from its per-epoch checkpoint;
* **retries**: a task whose worker or node dies (killed, out of memory, node lost) is retried by Ray
  up to ``max_retries`` times and resumes from the run's checkpoint; a Python exception inside a run
  is a ``failed`` record (the engine) and is not retried; a task that fails for good leaves a failed
  record that says why;
* every start of a run in a task is recorded in its record (``ray``: task id, node, host, pid, the epoch
  it resumed from), and ``<runs-dir>/.ray/state.json`` holds the driver and the task of every run, so
  that ``peftbench status`` shows the task ids and a live driver.

The run store must be one folder that the driver and every worker see (a shared file system, a PVC
on Kubernetes). The experiment trackers of the sweep (``Env.tracking``) travel with each task and are
made again in the worker.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SettingsError
from ..store import RunRecord, RunSpec, RunStatus, RunStore
from ..store.leases import HEARTBEAT_S
from . import _driver as driver
from ._base import ExecutorPlugin, Setting, register_executor

STATE_DIR = ".ray"
STATE_FILE = "state.json"

# every Ray setting: the sweep file's [executor.ray] table, --executor-set and a profile take exactly these keys
SETTINGS: dict[str, Setting] = {
    "address": Setting((str,), "the cluster: host:6379, ray://<head>:10001 (Ray client, e.g. KubeRay), auto, local "
                               "(default $RAY_ADDRESS, else Ray's default)"),
    "cpus_per_run": Setting((int, float), "CPUs a run asks for (default 1); also torch's thread count in the task",
                            min=0, max=4096),
    "gpus_per_run": Setting((int, float), "GPUs a run asks for: a number (0.5 shares a GPU) or auto (default: 1 when "
                                          "the cluster has GPUs, else 0)", min=0, max=64, keywords=("auto",)),
    "max_retries": Setting((int,), "Ray retries of a run whose worker or node dies (default 2)", min=0, max=1000),
    "max_in_flight": Setting((int,), "at most this many runs submitted at once (default 0: all of a stage)", min=0,
                             max=1_000_000),
    "runtime_env": Setting((dict,), "Ray runtime environment of the job: env_vars, pip, working_dir, py_modules, ..."),
    "namespace": Setting((str,), "Ray namespace (default peftbench)"),
    "device": Setting((str,), "device inside a task: auto (cuda when the task got a GPU), cpu, cuda or cuda:N"),
    "resources": Setting((dict,), "custom Ray resources a run asks for, e.g. {accelerator_type_H100 = 0.001}"),
}
# the sweep's generic executor settings -> Ray's own (peftbench.executors._base)
GENERIC = {"gpus_per_node": "gpus_per_run", "cpus_per_task": "cpus_per_run", "max_retries": "max_retries",
           "workers": "max_in_flight"}


@dataclass
class RaySettings:
    address: str | None = None
    cpus_per_run: float = 1
    gpus_per_run: float | str = "auto"
    max_retries: int = 2
    max_in_flight: int = 0
    runtime_env: dict = field(default_factory=dict)
    namespace: str = "peftbench"
    device: str = "auto"
    resources: dict = field(default_factory=dict)

    def describe(self) -> str:
        return (f"address={self.address or '(Ray default)'}, cpus_per_run={self.cpus_per_run:g}, "
                f"gpus_per_run={self.gpus_per_run}, max_retries={self.max_retries}"
                + (f", max_in_flight={self.max_in_flight}" if self.max_in_flight else "")
                + (f", runtime_env keys={sorted(self.runtime_env)}" if self.runtime_env else ""))


def resolve(values: dict) -> dict:
    """Defaults < ``$RAY_ADDRESS`` < the given settings; the device's form checked."""
    out: dict[str, Any] = {}
    if os.environ.get("RAY_ADDRESS"):
        out["address"] = os.environ["RAY_ADDRESS"]
    out.update(values)
    device = out.get("device", "auto")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise SettingsError(f"ray setting 'device' must be auto, cpu, cuda or cuda:N, got {device!r}")
    s = RaySettings(**out)
    return {k: v for k, v in asdict(s).items() if v is not None}


# ---------------------------------------------------------------------------------------------
# inside a Ray task
# ---------------------------------------------------------------------------------------------


def mark_start(store: RunStore, spec: RunSpec, info: dict) -> None:
    """This task's start, in the run's record (``record.executor``: the shared driver layer), before the engine
    starts (the engine keeps it); the task id is the run's job id there, a retry of the task a restart."""
    driver.mark_start(store, spec, "ray", {"job_id": info.get("task_id"), "node": info.get("host"),
                                           **{k: v for k, v in info.items() if k != "pid"}})


def run_task(spec: dict, runs_dir: str, device: str, quiet: bool, tracking: dict | None,
             save_weights: str = "final") -> dict:
    """One run, inside a Ray task (the function Ray runs; a module-level function, so workers import it)."""
    import ray
    import torch

    from ..trackers import hooks_for
    from ..train.engine import Env, execute_claimed

    s = RunSpec.from_dict(spec)
    store = RunStore(runs_dir)
    ctx = ray.get_runtime_context()
    gpus = [str(g) for g in ray.get_gpu_ids()]
    dev = device if device != "auto" else ("cuda" if gpus and torch.cuda.is_available() else "cpu")
    cpus = ctx.get_assigned_resources().get("CPU") or 1
    torch.set_num_threads(max(1, int(cpus)))
    task_id = ctx.get_task_id()
    info = {"task_id": task_id, "node_id": ctx.get_node_id(), "host": socket.gethostname(), "pid": os.getpid(),
            "gpus": gpus, "device": dev}
    env = Env(device=dev, quiet=quiet, tracking=tracking, hooks=hooks_for(tracking), prefix=f"[ray {task_id[:10]}]",
              save_weights=save_weights)
    rec, ran = execute_claimed(s, store, env, wait=True, poll_s=5.0, on_claim=lambda: mark_start(store, s, info))
    return {"key": s.key, "status": str(rec.status), "ran": ran, "host": info["host"], "task_id": task_id}


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------


def _import_ray():
    try:
        import ray
    except ImportError:
        raise SettingsError("--executor ray: the 'ray' package is not installed (pip install 'peftbench[ray]')") from None
    return ray


def plain_worker_logs(environ=None, streams=(sys.stdout, sys.stderr)) -> bool:
    """No ANSI colour codes around the "(run_task pid=...)" prefix Ray prints before each worker line when the
    driver's output goes to a file (a log, a SLURM .out): Ray reads ``RAY_COLOR_PREFIX=0`` in the driver
    (ray/_private/worker.py ``print_worker_logs``). A value the user set is kept. Returns whether it was set here."""
    environ = os.environ if environ is None else environ
    if "RAY_COLOR_PREFIX" in environ or all(getattr(s, "isatty", lambda: False)() for s in streams):
        return False
    environ["RAY_COLOR_PREFIX"] = "0"
    return True


class RayExecutor:
    """Runs each stage's runs as Ray tasks and waits for them (the :class:`~peftbench.sweep.drive.Executor`
    protocol); see the module docstring."""

    def __init__(self, settings: RaySettings, runs_dir: str | Path, *, quiet: bool = False, total: int | None = None,
                 tracking: dict | None = None, log=None, save_weights: str = "final"):
        self.ray = ray = _import_ray()
        self.save_weights = save_weights
        self.s = settings
        self.root = Path(runs_dir).resolve()
        self.quiet = quiet
        self.total = total
        self.done = 0
        self.tracking = tracking
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self._owns = not ray.is_initialized()
        plain_worker_logs()
        if self._owns:
            kwargs: dict[str, Any] = {"namespace": settings.namespace, "log_to_driver": not quiet,
                                      "configure_logging": False}
            if settings.runtime_env:
                kwargs["runtime_env"] = dict(settings.runtime_env)
            try:
                ray.init(address=settings.address or None, **kwargs)
            except Exception as exc:  # no cluster there, wrong address, version mismatch
                raise SettingsError(f"--executor ray: cannot connect to the Ray cluster at "
                                    f"{settings.address or '(Ray default)'}: {type(exc).__name__}: {exc}") from None
        self.gpus = self._gpus_per_run()
        self._check_fits()
        self._remote = ray.remote(run_task)
        self.driver = driver.DriverState(self.root, "ray")
        self.state = self.driver.data
        self.driver.start(address=settings.address)
        self.log(f"[ray] connected: {self._cluster_line()}; each run asks for {settings.cpus_per_run:g} CPU(s), "
                 f"{self.gpus:g} GPU(s)")

    def log(self, msg: str) -> None:
        self._log(msg)

    # -- cluster ------------------------------------------------------------------------------
    def _cluster_line(self) -> str:
        res = self.ray.cluster_resources()
        return f"{len(self._nodes())} node(s), {res.get('CPU', 0):g} CPU(s), {res.get('GPU', 0):g} GPU(s)"

    def _nodes(self) -> list[dict]:
        return [n for n in self.ray.nodes() if n.get("Alive")]

    def _gpus_per_run(self) -> float:
        if self.s.gpus_per_run == "auto":
            return 1.0 if self.ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        return float(self.s.gpus_per_run)

    def _check_fits(self) -> None:
        """A request no node can meet would wait forever: an error before anything is submitted (an
        autoscaling cluster may add such nodes: then ``resources`` / a smaller request is the fix)."""
        need = {"CPU": float(self.s.cpus_per_run), "GPU": self.gpus, **{k: float(v) for k, v in self.s.resources.items()}}
        nodes = self._nodes()
        if not any(all(n.get("Resources", {}).get(k, 0) >= v for k, v in need.items() if v > 0) for n in nodes):
            have = "; ".join(f"{n.get('NodeManagerAddress')}: {n.get('Resources', {}).get('CPU', 0):g} CPU, "
                             f"{n.get('Resources', {}).get('GPU', 0):g} GPU" for n in nodes) or "no live node"
            raise SettingsError(f"--executor ray: no node of the cluster can run a task asking for "
                                f"{', '.join(f'{v:g} {k}' for k, v in need.items() if v > 0)} ({have}); change "
                                "--cpus-per-task / --gpus-per-node (or [executor.ray] cpus_per_run / gpus_per_run)")

    # -- state --------------------------------------------------------------------------------
    def _save(self) -> None:
        self.driver.save()

    # -- one stage ----------------------------------------------------------------------------
    def _count(self, msg: str) -> None:
        self.done += 1
        self.log(f"[run {self.done}/{self.total or '?'}] {msg}")

    def run(self, specs: list[RunSpec], store: RunStore) -> list[RunRecord]:
        ray = self.ray
        by_key: dict[str, RunSpec] = {}
        for s in specs:
            by_key.setdefault(s.key, s)
        todo = []
        for s in by_key.values():
            if store.is_done(s):
                self._count(f"{s.label()}: done already, skipped")
            else:
                todo.append(s)
        opts: dict[str, Any] = {"num_cpus": float(self.s.cpus_per_run), "num_gpus": self.gpus,
                                "max_retries": int(self.s.max_retries), "retry_exceptions": False}
        if self.s.resources:
            opts["resources"] = {k: float(v) for k, v in self.s.resources.items()}
        queue = list(todo)
        refs: dict[Any, RunSpec] = {}
        t0: dict[str, float] = {}
        limit = self.s.max_in_flight or len(queue) or 1
        try:
            while queue or refs:
                while queue and len(refs) < limit:
                    s = queue.pop(0)
                    ref = self._remote.options(name=f"peftbench:{s.label()}"[:200], **opts).remote(
                        s.to_dict(), str(self.root), self.s.device, self.quiet, self.tracking, self.save_weights)
                    refs[ref] = s
                    t0[s.key] = time.time()
                    self.driver.track(s, ref.task_id().hex(), "SUBMITTED", task_id=ref.task_id().hex())
                self._save()
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=HEARTBEAT_S)
                for ref in ready:
                    s = refs.pop(ref)
                    self._finished(s, ref, store, time.time() - t0[s.key])
        except BaseException:
            for ref in refs:  # interrupted: the tasks go (their leases die with them; the next driver resumes)
                try:
                    ray.cancel(ref, force=True)
                except Exception:
                    pass
            raise
        finally:
            self._save()
        return [store.load(s) or _missing(s) for s in specs]

    def _finished(self, spec: RunSpec, ref, store: RunStore, seconds: float) -> None:
        entry = self.state["runs"][spec.key]
        try:
            out = self.ray.get(ref)
            entry.update(state="FINISHED", host=out.get("host"))
        except Exception as exc:  # the task failed for good: its worker/node died more than max_retries times
            msg = str(exc).strip().splitlines()
            entry.update(state="FAILED")
            rec = store.load(spec) or RunRecord.for_spec(spec, status=RunStatus.FAILED)
            if not rec.is_final:
                rec.status = RunStatus.FAILED
                rec.error = (f"Ray task {entry.get('task_id')} failed after {self.s.max_retries} retr"
                             f"{'y' if self.s.max_retries == 1 else 'ies'}: {type(exc).__name__}: "
                             + " ".join(m.strip() for m in msg if m.strip())[-1500:])
                rec.ended_at = driver.now()
                store.write(spec, rec)
        rec = store.load(spec) or _missing(spec)
        starts = driver.executor_info(rec).get("starts") or []
        self._count(f"{spec.label()}: {rec.status}" + (f" top1 {rec.top1:.2f}" if rec.top1 is not None else "")
                    + f" (ray task {str(entry.get('task_id'))[:12]}" + (f", {len(starts) - 1} retr"
                                                                       f"{'y' if len(starts) == 2 else 'ies'}"
                                                                       if len(starts) > 1 else "")
                    + f", {seconds:.1f}s)" + (f"\n    {rec.error.strip().splitlines()[-1]}" if rec.error else ""))

    def close(self) -> None:
        try:
            self.driver.stop()
        finally:
            if self._owns and self.ray.is_initialized():
                self.ray.shutdown()


def _missing(spec: RunSpec) -> RunRecord:
    return RunRecord.for_spec(spec, status=RunStatus.FAILED, error="no record was written")


def status(runs_dir: Path, runs: dict[str, dict], query: bool) -> dict:
    """What ``peftbench status`` shows of Ray: the live driver and each run's task."""
    from . import new_entry

    state = driver.DriverState.read(runs_dir, "ray")
    if not state.get("runs"):
        return {}
    for key, entry in state["runs"].items():
        r = runs.get(key)
        if r is None:
            r = runs[key] = new_entry(key, method=entry.get("method"), task=entry.get("task"),
                                      stage=entry.get("stage", ""), label=entry.get("label"))
        r["job"] = f"ray:{str(entry.get('task_id') or entry.get('job_id'))[:16]}"
        r["ray_state"] = entry.get("state")
    return {"driver": driver.DriverState.live_driver(runs_dir, "ray")}


@register_executor
class Ray(ExecutorPlugin):
    name = "ray"
    requires = extra = "ray"
    description = "one Ray task per run on a Ray cluster (RAY_ADDRESS / --executor-set address=...; KubeRay: ray://<head>:10001)"
    settings = SETTINGS
    generic = GENERIC

    def resolve(self, values):
        return resolve(values)

    def make(self, settings, *, env, runs_dir, total):
        s = RaySettings(**settings)
        print(f"peftbench: Ray: {s.describe()}", file=sys.stderr)
        return RayExecutor(s, runs_dir, quiet=env.quiet, total=total, tracking=env.tracking,
                           save_weights=env.save_weights)

    def status(self, runs_dir, runs, query):
        return status(runs_dir, runs, query)
