"""``--executor ray``: every run as one Ray task on a Ray cluster (``pip install 'peftbench[ray]'``; docs/executors.md).

For cloud and Kubernetes users without SLURM. The driver (``peftbench run``) connects to the cluster
at ``--ray-address`` (or ``[executor.ray] address``, else ``$RAY_ADDRESS``, else Ray's default: a
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

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from ..errors import SettingsError
from ..store import RunRecord, RunSpec, RunStatus, RunStore
from ..store.leases import HEARTBEAT_S, _proc_start, lease_state
from ._base import ExecutorPlugin, register_executor

STATE_DIR = ".ray"
STATE_FILE = "state.json"

# key: (accepted types, help) of [executor.ray]
KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "address": ((str,), "the cluster: host:6379, ray://<head>:10001 (Ray client, e.g. KubeRay), auto, local "
                        "(default $RAY_ADDRESS, else Ray's default)"),
    "cpus_per_run": ((int, float), "CPUs a run asks for (default 1); also torch's thread count in the task"),
    "gpus_per_run": ((int, float, str), "GPUs a run asks for: a number (0.5 shares a GPU) or auto (default: 1 when "
                                        "the cluster has GPUs, else 0)"),
    "max_retries": ((int,), "Ray retries of a run whose worker or node dies (default 2)"),
    "max_in_flight": ((int,), "at most this many runs submitted at once (default 0: all of a stage)"),
    "runtime_env": ((dict,), "Ray runtime environment of the job: env_vars, pip, working_dir, py_modules, ..."),
    "namespace": ((str,), "Ray namespace (default peftbench)"),
    "device": ((str,), "device inside a task: auto (cuda when the task got a GPU), cpu, cuda"),
    "resources": ((dict,), "custom Ray resources a run asks for, e.g. {accelerator_type_H100 = 0.001}"),
}
FLAGS = {"ray_address": "address", "ray_cpus": "cpus_per_run", "ray_gpus": "gpus_per_run",
         "ray_max_retries": "max_retries"}


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


def _check(key: str, value: Any, where: str) -> Any:
    if key not in KEYS:
        raise SettingsError(f"{where}: executor 'ray' has no setting {key!r} (its settings: {', '.join(sorted(KEYS))})")
    types, _ = KEYS[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise SettingsError(f"{where}: ray setting {key!r} must be "
                            + " or ".join({"str": "a string", "int": "an integer", "float": "a number",
                                           "dict": "a table"}[t.__name__] for t in types) + f", got {value!r}")
    if key in ("cpus_per_run", "gpus_per_run") and not isinstance(value, str) and value < 0:
        raise SettingsError(f"{where}: ray setting {key!r} must not be negative, got {value!r}")
    if key == "gpus_per_run" and isinstance(value, str) and value != "auto":
        raise SettingsError(f"{where}: ray setting 'gpus_per_run' must be a number or auto, got {value!r}")
    if key in ("max_retries", "max_in_flight") and value < 0:
        raise SettingsError(f"{where}: ray setting {key!r} must be >= 0, got {value!r}")
    if key == "device" and value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
        raise SettingsError(f"{where}: ray setting 'device' must be auto, cpu, cuda or cuda:N, got {value!r}")
    return value


def configure(table: dict, args, where) -> dict:
    """Defaults < ``$RAY_ADDRESS`` < the sweep file's ``[executor.ray]`` < ``--ray-set`` < named flags."""
    values: dict[str, Any] = {}
    if os.environ.get("RAY_ADDRESS"):
        values["address"] = os.environ["RAY_ADDRESS"]
    for k, v in (table or {}).items():
        values[k] = _check(k, v, where(k))
    if args is not None:
        for item in getattr(args, "ray_set", None) or []:
            k, sep, raw = item.partition("=")
            if not sep:
                raise SettingsError(f"--ray-set {item!r}: expected KEY=VALUE")
            values[k.strip()] = _check(k.strip(), _toml_value(raw.strip()), f"--ray-set {item!r}")
        for dest, key in FLAGS.items():
            v = getattr(args, dest, None)
            if v is not None:
                if key == "gpus_per_run" and v != "auto":
                    try:
                        v = float(v)
                    except ValueError:
                        raise SettingsError(f"--ray-gpus {v!r}: a number or auto") from None
                values[key] = _check(key, v, f"--{dest.replace('_', '-')}")
    s = RaySettings(**values)
    return {k: v for k, v in asdict(s).items() if v is not None}


def _toml_value(raw: str) -> Any:
    """A TOML literal (10, 2.5, true, "x", {a = 1}); anything else is a plain string."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray", "with --executor ray (docs/executors.md)")
    g.add_argument("--ray-address", metavar="ADDRESS",
                   help="the Ray cluster: host:6379 or ray://<head>:10001 (default $RAY_ADDRESS, else Ray's default)")
    g.add_argument("--ray-cpus", type=float, metavar="N", help="CPUs per run (default 1)")
    g.add_argument("--ray-gpus", metavar="N", help="GPUs per run: a number or auto (default auto: 1 when the cluster has GPUs)")
    g.add_argument("--ray-max-retries", type=int, metavar="N", help="retries of a run whose worker dies (default 2)")
    g.add_argument("--ray-set", action="append", default=[], metavar="KEY=VALUE",
                   help="any [executor.ray] setting, e.g. --ray-set 'runtime_env={pip=[\"timm\"]}' (repeatable)")


# ---------------------------------------------------------------------------------------------
# inside a Ray task
# ---------------------------------------------------------------------------------------------


def mark_start(store: RunStore, spec: RunSpec, info: dict) -> None:
    """This task's start, in the run's record (``ray``), before the engine starts (the engine keeps it)."""
    rec = store.load(spec) or RunRecord.for_spec(spec, status=RunStatus.RUNNING)
    ray_info = dict(rec.get("ray") or {})
    starts = list(ray_info.get("starts") or [])[-19:]
    start = dict(info, at=time.strftime("%Y-%m-%dT%H:%M:%S"), resume_epoch=store.checkpoint_epoch(spec))
    ray_info.update({k: v for k, v in info.items() if k != "pid"})
    ray_info["starts"] = starts + [start]
    rec.extra["ray"] = ray_info
    store.write(spec, rec)


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
        self.state = self._read_state()
        self.state["driver"] = {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": _proc_start(os.getpid()),
                                "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "heartbeat": time.time(),
                                "address": settings.address, "argv": list(sys.argv)}
        self._save()
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
                                "--ray-cpus / --ray-gpus (or [executor.ray] cpus_per_run / gpus_per_run)")

    # -- state --------------------------------------------------------------------------------
    def _read_state(self) -> dict:
        return read_state(self.root)

    def _save(self) -> None:
        self.state["driver"]["heartbeat"] = time.time()
        atomic_write_text(self.root / STATE_DIR / STATE_FILE, json.dumps(self.state, indent=1, sort_keys=True) + "\n",
                          fsync=False)

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
                    self.state["runs"][s.key] = {"method": s.method, "task": s.task, "stage": s.stage, "label": s.label(),
                                                 "task_id": ref.task_id().hex(), "state": "SUBMITTED",
                                                 "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
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
                rec.ended_at = time.strftime("%Y-%m-%dT%H:%M:%S")
                store.write(spec, rec)
        rec = store.load(spec) or _missing(spec)
        starts = (rec.get("ray") or {}).get("starts") or []
        self._count(f"{spec.label()}: {rec.status}" + (f" top1 {rec.top1:.2f}" if rec.top1 is not None else "")
                    + f" (ray task {str(entry.get('task_id'))[:12]}" + (f", {len(starts) - 1} retr"
                                                                       f"{'y' if len(starts) == 2 else 'ies'}"
                                                                       if len(starts) > 1 else "")
                    + f", {seconds:.1f}s)" + (f"\n    {rec.error.strip().splitlines()[-1]}" if rec.error else ""))

    def close(self) -> None:
        try:
            self.state["driver"]["ended_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            self.state["driver"]["heartbeat"] = 0  # a driver that ended is not live
            atomic_write_text(self.root / STATE_DIR / STATE_FILE, json.dumps(self.state, indent=1, sort_keys=True) + "\n",
                              fsync=False)
        finally:
            if self._owns and self.ray.is_initialized():
                self.ray.shutdown()


def _missing(spec: RunSpec) -> RunRecord:
    return RunRecord.for_spec(spec, status=RunStatus.FAILED, error="no record was written")


def read_state(runs_dir: str | Path) -> dict:
    try:
        data = json.loads((Path(runs_dir) / STATE_DIR / STATE_FILE).read_text())
        if isinstance(data, dict):
            data.setdefault("runs", {})
            return data
    except (OSError, ValueError):
        pass
    return {"runs": {}}


def status(runs_dir: Path, runs: dict[str, dict], query: bool) -> dict:
    """What ``peftbench status`` shows of Ray: the live driver and each run's task."""
    from ._status import new_entry  # (train's code fingerprints, torch: not when the CLI parses)

    state = read_state(runs_dir)
    if not state.get("runs"):
        return {}
    for key, entry in state["runs"].items():
        r = runs.get(key)
        if r is None:
            r = runs[key] = new_entry(key, method=entry.get("method"), task=entry.get("task"),
                                      stage=entry.get("stage", ""), label=entry.get("label"))
        r["job"] = f"ray:{str(entry.get('task_id'))[:16]}"
        r["ray_state"] = entry.get("state")
        rec_path = r.get("record")
        if rec_path:
            try:
                ray_info = json.loads(Path(rec_path).read_text()).get("ray") or {}
                starts = ray_info.get("starts") or []
                r["node"] = (starts[-1] if starts else ray_info).get("host")
                r["restart_count"] = max(0, len(starts) - 1)
            except (OSError, ValueError, AttributeError):
                pass
    drv = state.get("driver") or {}
    live = drv and lease_state(drv) == "live"
    return {"driver": {"pid": drv.get("pid"), "host": drv.get("host"), "since": drv.get("since")} if live else None}


@register_executor
class Ray(ExecutorPlugin):
    name = "ray"
    description = "one Ray task per run on a Ray cluster (RAY_ADDRESS / --ray-address; KubeRay: ray://<head>:10001)"
    settings_keys = {k: h for k, (_, h) in KEYS.items()}

    def add_arguments(self, parser):
        add_arguments(parser)

    def given_flags(self, args):
        given = [f"--{d.replace('_', '-')}" for d in FLAGS if getattr(args, d, None) is not None]
        return given + (["--ray-set"] if getattr(args, "ray_set", None) else [])

    def configure(self, table, args, where):
        return configure(table, args, where)

    def create(self, args, *, env, runs_dir, total):
        return self.make(configure({}, args, lambda k: k), env=env, runs_dir=runs_dir, total=total)

    def make(self, settings, *, env, runs_dir, total, args=None):
        s = RaySettings(**settings)
        print(f"peftbench: Ray: {s.describe()}", file=sys.stderr)
        return RayExecutor(s, runs_dir, quiet=env.quiet, total=total, tracking=env.tracking,
                           save_weights=env.save_weights)

    def status(self, runs_dir, runs, query):
        return status(runs_dir, runs, query)
