"""What ``peftbench status`` shows: every run of a runs dir with its status, from the run records and
from what each executor knows (SLURM: its state file and the queue)."""
from __future__ import annotations

from pathlib import Path

from ..errors import PeftbenchError
from ..store import RunStore
from ..store.journal import live_journals
from ..store.leases import lease_state, read_lease
from ._base import EXECUTORS
from ._driver import executor_info, show


def _entry(key: str, **kw) -> dict:
    base = {"key": key, "method": None, "task": None, "stage": "", "seed": None, "hparams": {}, "record_status": None,
            "job_id": None, "node": None, "restart_count": 0, "retries": 0, "top1": None, "error": "",
            "checkpoint": False, "record": None, "stale": False, "lease": "none", "executor": None}
    base.update(kw)
    return base


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
        ex = executor_info(rec)  # record.executor: where the run started (every executor writes it the same way)
        runs[key] = _entry(
            key, method=spec.get("method", path.parent.parent.name), task=spec.get("task", path.parent.name),
            stage=spec.get("stage", ""), seed=spec.get("seed"), hparams=spec.get("hparams") or {},
            record_status=str(rec.status), executor=ex.get("name"), job_id=ex.get("job_id"), node=ex.get("node"),
            restart_count=ex.get("restart_count", 0), retries=len(rec.get("retries") or []), top1=rec.top1,
            error=(rec.error or "").strip(), checkpoint=path.with_name(f"{key}.ckpt.safetensors").exists(),
            record=str(path), stale=_stale(rec, spec.get("method")))
        lease_path = path.with_name(f"{key}.lease")
        state = lease_state(read_lease(lease_path), lease_path) if lease_path.exists() else "none"
        runs[key]["lease"] = state
        if state == "live":
            holder = read_lease(lease_path) or {}
            runs[key]["holder"] = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    drivers = live_journals(root, warn=unreadable.append)  # a corrupt journal is set aside, with a warning
    for d in drivers:  # runs a live driver has queued that have no record yet
        for key, info in d.get("runs", {}).items():
            if key not in runs:
                runs[key] = new_entry(key, method=info.get("method"), task=info.get("task"), stage=info.get("stage"),
                                      seed=info.get("seed"), label=info.get("label"),
                                      holder=f"queued by pid {d.get('pid')} on {d.get('host')}")
    for r in runs.values():
        r["status"] = show(r["record_status"], r.get("lease", "none"))
        r.setdefault("job", None)
    out = {"runs_dir": str(root.resolve()), "driver": None, "state_updated_at": None, "unreadable": unreadable,
           "drivers": [{k: d.get(k) for k in ("host", "pid", "argv", "started_at")} for d in drivers]}
    for _, plugin in EXECUTORS.items():
        info = plugin.status(root, runs, query) or {}
        for k in ("driver", "state_updated_at"):
            if info.get(k) is not None:
                out[k] = info[k]
    for r in runs.values():
        r.setdefault("status", show(r["record_status"]))
        r.setdefault("job", r.get("job_id"))
    out["runs"] = sorted(runs.values(), key=_order)
    return out


_CURRENT: dict[str, dict] = {}


def _stale(rec, method: str | None) -> bool:
    """Whether a finished record was produced by other code than the installed one."""
    if not rec.is_final or not rec.code or not method:
        return False
    from ..fingerprint import code_fingerprint, staleness  # (the methods import torch: only when a record is final)
    from ..methods import get_method

    if method not in _CURRENT:
        try:
            _CURRENT[method] = code_fingerprint(get_method(method))
        except PeftbenchError:  # a method whose plugin is not installed here
            _CURRENT[method] = {}
    return bool(_CURRENT[method]) and bool(staleness(rec.code, _CURRENT[method]))


def new_entry(key: str, **kw) -> dict:
    """An entry for a run that has no record yet (an executor knows of it)."""
    e = _entry(key, **kw)
    e["status"] = "pending"
    return e


def _order(r: dict):
    return (r["method"] or "", r["task"] or "", r["stage"] or "", str(r.get("seed")), r["key"])
