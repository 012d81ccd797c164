"""What every executor's driver shares, written once: the driver's state file and its liveness, the record of
where a run started (``record.executor``), the one timestamp format, and how a run's state is shown.

* :func:`now` / :func:`parse_time`: ISO 8601 in UTC with its offset (``2026-12-06T19:02:03+00:00``), and read
  back as an aware ``datetime`` (older local-time strings without a zone are read as UTC, never compared as
  strings).
* :class:`DriverState`: ``<runs-dir>/.<executor>/state.json``, the driver (host, pid, process start, heartbeat:
  live exactly as a run lease is, :func:`peftbench.store.leases.lease_state`) and every run it submitted (its
  job, task or pid, the backend's state of it, when). A new executor writes none of this again.
* :func:`mark_start`: a run starting somewhere is written into its record as ``record.executor``: ``name`` (the
  executor), ``job_id``, ``node``, ``restart_count``, ``attempt`` and the last 20 ``starts`` (each with ``at``,
  ``pid``, the epoch it resumed from), plus whatever the backend adds (array task, partition, GPUs, task id).
  ``peftbench status`` reads it the same way for every executor.
* :func:`show`: the one classification of a run for ``peftbench status`` (done, diverged, failed, running,
  interrupted, pending), from its record, its lease and, when the executor knows it, its job's state.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from ..provenance import now, parse_time
from ..store import RunRecord, RunSpec, RunStatus, RunStore
from ..store.leases import holder, lease_state

__all__ = ["now", "parse_time", "DriverState", "mark_start", "executor_info", "show"]


class DriverState:
    """The state file of one executor's driver (see the module doc). ``runs``: key -> what the driver knows."""

    def __init__(self, runs_dir: str | Path, executor: str):
        self.path = Path(runs_dir) / f".{executor}" / "state.json"
        self.data = self.read(runs_dir, executor)

    @staticmethod
    def read(runs_dir: str | Path, executor: str) -> dict:
        path = Path(runs_dir) / f".{executor}" / "state.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("runs"), dict):
                return data
        except (OSError, ValueError):
            pass
        return {"version": 2, "runs": {}}

    @property
    def runs(self) -> dict[str, dict]:
        return self.data["runs"]

    def start(self, **extra: Any) -> None:
        """This process is the driver from now on (its heartbeat is refreshed at every :meth:`save`)."""
        self.data["driver"] = {**holder(), "since": now(), "argv": list(sys.argv), **extra}
        self.save()

    def track(self, spec: RunSpec, job: str, state: str = "SUBMITTED", **extra: Any) -> dict:
        """Note that ``job`` (a job id, a task id) now runs ``spec``; returns the run's entry."""
        entry = self.runs.setdefault(spec.key, {})
        entry.update({"method": spec.method, "task": spec.task, "stage": spec.stage, "label": spec.label(),
                      "record": f"{spec.method}/{spec.task}/{spec.key}.json", "job_id": job, "state": state,
                      "state_at": now(), **extra})
        entry.setdefault("submitted_at", now())
        jobs = entry.setdefault("jobs", [])
        if job not in jobs:
            jobs.append(job)
            del jobs[:-10]
        return entry

    def save(self) -> None:
        self.data["updated_at"] = now()
        if "driver" in self.data and self.data["driver"].get("heartbeat") != 0:
            self.data["driver"]["heartbeat"] = time.time()
        atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n", fsync=False)

    def stop(self) -> None:
        """The driver ended: it is no longer live."""
        if "driver" in self.data:
            self.data["driver"].update(ended_at=now(), heartbeat=0)
        self.save()

    @staticmethod
    def live_driver(runs_dir: str | Path, executor: str) -> dict | None:
        """The driver of ``runs_dir``'s executor if it is alive (its heartbeat fresh, its process there)."""
        drv = DriverState.read(runs_dir, executor).get("driver") or {}
        if drv and drv.get("heartbeat") and lease_state(drv) == "live":
            return {"pid": drv.get("pid"), "host": drv.get("host"), "since": drv.get("since")}
        return None


def executor_info(rec: RunRecord | dict | None) -> dict:
    """``record.executor`` (records written before it have ``slurm`` or ``ray`` instead: read as the same)."""
    if rec is None:
        return {}
    get = rec.get
    info = get("executor")
    if isinstance(info, dict):
        return info
    for name in ("slurm", "ray"):
        old = get(name)
        if isinstance(old, dict):
            starts = old.get("starts") or []
            node = old.get("node") or (starts[-1].get("host") if starts else None)
            restarts = old.get("restart_count", max(0, len(starts) - 1))
            return {"name": name, **old, "job_id": old.get("job_id") or old.get("task_id"), "node": node,
                    "restart_count": restarts}
    return {}


def mark_start(store: RunStore, spec: RunSpec, executor: str, info: dict, *, restart_count: int | None = None) -> None:
    """Write this start of ``spec`` on ``executor`` into its record (``record.executor``, see the module doc)
    before the engine starts; the engine keeps the field. ``info``: ``job_id``, ``node`` and whatever the backend
    adds; ``restart_count``: how often the backend restarted the same job (default: the starts before this one)."""
    rec = store.load(spec) or RunRecord.for_spec(spec, status=RunStatus.RUNNING)
    old = executor_info(rec)
    starts = list(old.get("starts") or [])[-19:] if old.get("name") == executor else []
    restarts = len(starts) if restart_count is None else restart_count
    start = {"job_id": info.get("job_id"), "node": info.get("node"), "pid": os.getpid(), "at": now(),
             "restart_count": restarts, "resume_epoch": store.checkpoint_epoch(spec)}
    entry = {**{k: v for k, v in old.items() if k not in ("starts",)}, **info, "name": executor,
             "restart_count": restarts, "attempt": len(starts) + 1, "starts": starts + [start]}
    rec.extra["executor"] = entry
    for legacy in ("slurm", "ray"):
        rec.extra.pop(legacy, None)
    store.write(spec, rec)


def show(record_status: str | None, lease: str = "none", job_state: str | None = None,
         job_active: bool | None = None, started_by_this_job: bool = True) -> str:
    """How ``peftbench status`` shows a run: from its record's status, its lease (``live`` / ``dead`` / ``none``)
    and, when the executor knows it, its job's state (``job_active``: queued or running)."""
    if record_status == RunStatus.OK:
        return "done"
    if record_status == RunStatus.DIVERGED:
        return "diverged"
    if job_state is not None and job_active:
        # a job is queued or running for this run (a retry's job may not have written the record yet)
        if job_state == "RUNNING" and record_status == RunStatus.RUNNING and started_by_this_job:
            return "running"
        return "pending"
    if record_status == RunStatus.FAILED:
        return "failed"
    if job_state is not None:
        return "interrupted"  # its job is over, without a result
    if record_status == RunStatus.RUNNING:
        return "running" if lease == "live" else "interrupted"
    return "pending"
