"""``peftbench status``: pending, running, done, failed and diverged runs per method and task, with
their SLURM job ids; reads the run records and the SLURM driver's state file (``<runs-dir>/.slurm/``)
and asks SLURM (sacct/squeue) for the state of the jobs that are not finished."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

COLUMNS = ("pending", "running", "done", "failed", "diverged", "interrupted")


def register(sub) -> None:
    p = sub.add_parser("status", help="progress of a sweep: runs per method and task, SLURM job ids",
                       description="Pending, running, done, failed and diverged runs per method and task, read "
                                   "from the run records and the SLURM driver's state file; safe while a sweep runs.")
    p.add_argument("--runs-dir", default="runs", help="where run records go (default ./runs)")
    p.add_argument("--all", action="store_true", help="list every run, finished ones too")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument("--no-query", action="store_true", help="do not ask SLURM (sacct/squeue) for job states")
    p.set_defaults(func=main)


def collect(runs_dir: str | Path, query: bool = True) -> dict:
    """Every run of ``runs_dir`` with its status and job, as plain data."""
    from ..slurm import driver_lock_holder, is_active, query_states, read_state, slurm_available
    from ..store import RunStore

    root = Path(runs_dir)
    state = read_state(root)
    runs: dict[str, dict] = {}
    unreadable = []
    for path, rec, err in RunStore(root).iter_records():
        if rec is None:
            unreadable.append(err)
            continue
        spec = rec.get("spec") or {}
        key = rec.get("key") or path.stem
        slurm = rec.get("slurm") or {}
        runs[key] = {
            "key": key, "method": spec.get("method", path.parent.parent.name), "task": spec.get("task", path.parent.name),
            "stage": spec.get("stage", ""), "seed": spec.get("seed"), "hparams": spec.get("hparams") or {},
            "record_status": rec.get("status"), "job_id": slurm.get("job_id"), "node": slurm.get("node"),
            "restart_count": slurm.get("restart_count", 0), "retries": len(rec.get("retries") or []),
            "top1": (rec.get("metrics") or {}).get("top1"), "error": (rec.get("error") or "").strip(),
            "checkpoint": path.with_name(f"{key}.ckpt.pt").exists(), "record": str(path),
        }
    for key, entry in state.get("runs", {}).items():
        r = runs.get(key)
        if r is None:
            r = runs[key] = {"key": key, "method": entry.get("method"), "task": entry.get("task"),
                             "stage": entry.get("stage", ""), "seed": None, "hparams": {}, "record_status": None,
                             "job_id": None, "node": None, "restart_count": 0, "retries": 0, "top1": None,
                             "error": "", "checkpoint": False, "record": None}
        r["label"] = entry.get("label")
        r["submitted_job"] = entry.get("job_id")
    # ask SLURM about the jobs of unfinished runs
    live: dict[str, dict] = {}
    if query and slurm_available():
        ids = {j for r in runs.values() if r["record_status"] not in ("ok", "diverged")
               for j in (r.get("submitted_job"), r.get("job_id")) if j}
        live = query_states(sorted(ids), timeout=30)
    for r in runs.values():
        job = r.get("submitted_job") or r["job_id"]
        info = live.get(job) or {}
        r["slurm_state"] = info.get("state")
        r["status"] = _classify(r, info.get("state"), is_active)
        r["job"] = job
    return {"runs_dir": str(root.resolve()), "driver": driver_lock_holder(root),
            "state_updated_at": state.get("updated_at"), "runs": sorted(runs.values(), key=_order),
            "unreadable": unreadable}


def _classify(r: dict, job_state: str | None, is_active) -> str:
    rs = r["record_status"]
    if rs == "ok":
        return "done"
    if rs == "diverged":
        return "diverged"
    started_here = r.get("submitted_job") is None or r.get("submitted_job") == r["job_id"]
    if job_state is not None and is_active(job_state):
        # a job is queued or running for this run (a retry's job has not written the record yet)
        if job_state == "RUNNING" and rs == "running" and started_here:
            return "running"
        return "pending"
    if rs == "failed":
        return "failed"
    if job_state is not None:
        # its job is over, without a result (the record says running, or there is none)
        return "interrupted"
    return "running" if rs == "running" else "pending"  # local run, or SLURM not asked / not knowing


def _order(r: dict):
    return (r["method"] or "", r["task"] or "", r["stage"] or "", str(r.get("seed")), r["key"])


def main(args) -> int:
    info = collect(args.runs_dir, query=not args.no_query)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    out = sys.stdout
    drv = info["driver"]
    print(f"runs dir: {info['runs_dir']}", file=out)
    if drv:
        print(f"driver: running (pid {drv.get('pid')} on {drv.get('host')}, since {drv.get('since')})", file=out)
    elif info["state_updated_at"]:
        print(f"driver: not running (SLURM state last updated {info['state_updated_at']})", file=out)
    runs = info["runs"]
    if not runs:
        print("no runs yet", file=out)
        return 0
    table: dict[tuple, Counter] = {}
    for r in runs:
        table.setdefault((r["method"], r["task"]), Counter())[r["status"]] += 1
    cols = [c for c in COLUMNS if c != "interrupted" or any(r["status"] == c for r in runs)]
    head = f"{'method':<20} {'task':<24} " + " ".join(f"{c:>{max(7, len(c))}}" for c in cols)
    print(head, file=out)
    print("-" * len(head), file=out)
    total = Counter()
    for (method, task), c in sorted(table.items(), key=lambda kv: (kv[0][0] or "", kv[0][1] or "")):
        total.update(c)
        print(f"{method or '?':<20} {task or '?':<24} " + " ".join(f"{c[k]:>{max(7, len(k))}}" for k in cols), file=out)
    print(f"{'total':<20} {'':<24} " + " ".join(f"{total[k]:>{max(7, len(k))}}" for k in cols), file=out)
    shown = [r for r in runs if args.all or r["status"] != "done"]
    if shown:
        print("\nruns" + ("" if args.all else " not done") + ":", file=out)
        for r in shown:
            label = r.get("label") or (f"{r['method']} {r['task']} {r['stage']} lr={r['hparams'].get('lr')} "
                                       f"wd={r['hparams'].get('wd')} seed={r['seed']}")
            bits = [f"{r['status']:<11}", label]
            if r["job"]:
                job = f"job {r['job']}" + (f" {r['slurm_state']}" if r["slurm_state"] else "")
                if r["node"]:
                    job += f" on {r['node']}"
                bits.append(f"[{job}]")
            if r["restart_count"]:
                bits.append(f"restarts {r['restart_count']}")
            if r["retries"]:
                bits.append(f"retries {r['retries']}")
            if r["checkpoint"] and r["status"] != "done":
                bits.append("has checkpoint")
            if r["top1"] is not None:
                bits.append(f"top1 {r['top1']:.2f}")
            print("  " + "  ".join(bits), file=out)
            if r["status"] in ("failed", "diverged") and r["error"]:
                print(f"      {r['error'].splitlines()[-1][:160]}", file=out)
        if any(r["status"] == "interrupted" for r in runs):
            print("\ninterrupted: its job is over but the run has no result; the next `peftbench run` resumes it "
                  "from its checkpoint", file=out)
    for err in info["unreadable"]:
        print(f"warning: {err}", file=out)
    return 0
