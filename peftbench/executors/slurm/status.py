"""What ``peftbench status`` shows of SLURM: the driver, the job of every run, and the run's state
from the job's (a queued retry, a job that ended without a result)."""
from __future__ import annotations

from pathlib import Path

from ...store import RunStatus
from .. import new_entry
from .._driver import show
from .queue import is_active, query_states, slurm_available
from .state import driver_lock_holder, read_state


def status(runs_dir: Path, runs: dict[str, dict], query: bool) -> dict:
    state = read_state(runs_dir)
    for key, entry in state.get("runs", {}).items():
        r = runs.get(key)
        if r is None:
            r = runs[key] = new_entry(key, method=entry.get("method"), task=entry.get("task"),
                                      stage=entry.get("stage", ""))
        r["label"] = entry.get("label")
        r["submitted_job"] = entry.get("job_id")
    live: dict[str, dict] = {}
    if query and slurm_available():  # ask SLURM about the jobs of unfinished runs
        ids = {j for r in runs.values() if r["record_status"] not in (RunStatus.OK, RunStatus.DIVERGED)
               and r.get("executor") in (None, "slurm") for j in (r.get("submitted_job"), r.get("job_id")) if j}
        live = query_states(sorted(ids), timeout=30)
    for r in runs.values():
        if r.get("executor") not in (None, "slurm") and r.get("submitted_job") is None:
            continue  # another executor's run
        job = r.get("submitted_job") or (r["job_id"] if r.get("executor") == "slurm" else None)
        info = live.get(job) or {}
        r["slurm_state"] = info.get("state")
        job_state = info.get("state")
        started_here = r.get("submitted_job") is None or r.get("submitted_job") == r["job_id"]
        if job_state is not None:  # SLURM knows the job: its state decides (else the record and lease did)
            r["status"] = show(r["record_status"], r.get("lease", "none"), job_state, is_active(job_state),
                               started_here)
        if job or not r.get("job"):  # (another executor's job id is left alone)
            r["job"] = job
    return {"driver": driver_lock_holder(runs_dir), "state_updated_at": state.get("updated_at")}
