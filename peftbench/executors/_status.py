"""What ``peftbench status`` shows: every run of a runs dir with its status, from the run records and
from what each executor knows (SLURM: its state file and the queue)."""
from __future__ import annotations

from pathlib import Path

from ..store import RunStatus, RunStore
from ._base import EXECUTORS


def _entry(key: str, **kw) -> dict:
    base = {"key": key, "method": None, "task": None, "stage": "", "seed": None, "hparams": {}, "record_status": None,
            "job_id": None, "node": None, "restart_count": 0, "retries": 0, "top1": None, "error": "",
            "checkpoint": False, "record": None}
    base.update(kw)
    return base


def _classify(record_status: str | None) -> str:
    return {RunStatus.OK: "done", RunStatus.DIVERGED: "diverged", RunStatus.FAILED: "failed",
            RunStatus.RUNNING: "running"}.get(record_status, "pending")


def collect(runs_dir: str | Path, query: bool = True) -> dict:
    """Every run of ``runs_dir`` with its status and job, as plain data."""
    root = Path(runs_dir)
    store = RunStore(root)
    runs: dict[str, dict] = {}
    unreadable = []
    for path, rec, err in store.iter_records():
        if rec is None:
            unreadable.append(err)
            continue
        spec = rec.spec
        key = rec.key or path.stem
        slurm = rec.get("slurm") or {}
        runs[key] = _entry(
            key, method=spec.get("method", path.parent.parent.name), task=spec.get("task", path.parent.name),
            stage=spec.get("stage", ""), seed=spec.get("seed"), hparams=spec.get("hparams") or {},
            record_status=str(rec.status), job_id=slurm.get("job_id"), node=slurm.get("node"),
            restart_count=slurm.get("restart_count", 0), retries=len(rec.get("retries") or []), top1=rec.top1,
            error=(rec.error or "").strip(), checkpoint=path.with_name(f"{key}.ckpt.safetensors").exists(),
            record=str(path))
    for r in runs.values():
        r["status"] = _classify(r["record_status"])
        r.setdefault("job", None)
    out = {"runs_dir": str(root.resolve()), "driver": None, "state_updated_at": None, "unreadable": unreadable}
    for _, plugin in EXECUTORS.items():
        info = plugin.status(root, runs, query) or {}
        for k in ("driver", "state_updated_at"):
            if info.get(k) is not None:
                out[k] = info[k]
    for r in runs.values():
        r.setdefault("status", _classify(r["record_status"]))
        r.setdefault("job", r.get("job_id"))
    out["runs"] = sorted(runs.values(), key=_order)
    return out


def new_entry(key: str, **kw) -> dict:
    """An entry for a run that has no record yet (an executor knows of it)."""
    e = _entry(key, **kw)
    e["status"] = "pending"
    return e


def _order(r: dict):
    return (r["method"] or "", r["task"] or "", r["stage"] or "", str(r.get("seed")), r["key"])
