"""``peftbench status``: pending, running, done, failed and diverged runs per method and task, with
their job ids: the run records, and what every executor knows (SLURM: the driver's state file in
``<runs-dir>/.slurm/`` and sacct/squeue for the jobs that are not finished;
:mod:`peftbench.executors.status`)."""
from __future__ import annotations

import json
import sys
from collections import Counter

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


def _print(*parts, file=None) -> None:
    """print, with control characters from records (ANSI escapes, bells) made visible (peftbench._text)."""
    from .._text import terminal

    print(*(terminal(p) for p in parts), file=file or sys.stdout)


def main(args) -> int:
    from ..executors import collect

    info = collect(args.runs_dir, query=not args.no_query)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    out = sys.stdout
    drv = info["driver"]
    _print(f"runs dir: {info['runs_dir']}", file=out)
    if drv:
        _print(f"driver: running (pid {drv.get('pid')} on {drv.get('host')}, since {drv.get('since')})", file=out)
    elif info["state_updated_at"]:
        _print(f"driver: not running (SLURM state last updated {info['state_updated_at']})", file=out)
    for d in info.get("drivers", []):
        _print(f"sweep running: pid {d.get('pid')} on {d.get('host')}: {' '.join(d.get('argv') or [])[:200]}", file=out)
    runs = info["runs"]
    if not runs:
        _print("no runs yet", file=out)
        return 0
    table: dict[tuple, Counter] = {}
    for r in runs:
        table.setdefault((r["method"], r["task"]), Counter())[r["status"]] += 1
    for r in runs:
        if r.get("stale"):
            table[(r["method"], r["task"])]["stale"] += 1
    cols = [c for c in COLUMNS if c != "interrupted" or any(r["status"] == c for r in runs)]
    if any(r.get("stale") for r in runs):
        cols.append("stale")
    head = f"{'method':<20} {'task':<24} " + " ".join(f"{c:>{max(7, len(c))}}" for c in cols)
    _print(head, file=out)
    _print("-" * len(head), file=out)
    total = Counter()
    for (method, task), c in sorted(table.items(), key=lambda kv: (kv[0][0] or "", kv[0][1] or "")):
        total.update(c)
        _print(f"{method or '?':<20} {task or '?':<24} " + " ".join(f"{c[k]:>{max(7, len(k))}}" for k in cols), file=out)
    _print(f"{'total':<20} {'':<24} " + " ".join(f"{total[k]:>{max(7, len(k))}}" for k in cols), file=out)
    shown = [r for r in runs if args.all or r["status"] != "done"]
    if shown:
        _print("\nruns" + ("" if args.all else " not done") + ":", file=out)
        for r in shown:
            label = r.get("label") or (f"{r['method']} {r['task']} {r['stage']} lr={r['hparams'].get('lr')} "
                                       f"wd={r['hparams'].get('wd')} seed={r['seed']}")
            bits = [f"{r['status']:<11}", str(r.get("key") or "")[:10], label]  # a key prefix: `peftbench export --run`
            if r.get("holder"):
                bits.append(f"[{r['holder']}]")
            if r.get("stale"):
                bits.append("stale (produced by other code)")
            if r["job"]:
                job = f"job {r['job']}" + (f" {r.get('slurm_state')}" if r.get("slurm_state") else "")
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
            _print("  " + "  ".join(bits), file=out)
            if r["status"] in ("failed", "diverged") and r["error"]:
                _print(f"      {r['error'].splitlines()[-1][:160]}", file=out)
        if any(r["status"] == "interrupted" for r in runs):
            _print("\ninterrupted: the process (or job) that ran it is gone, without a result; the next "
                  "`peftbench run` resumes it from its checkpoint", file=out)
    stale = Counter(r["method"] for r in runs if r.get("stale"))
    for method, n in sorted(stale.items()):
        _print(f"\nwarning: {n} finished run(s) of {method!r} were produced by other code than the installed one: "
              "results may be stale (`peftbench run ... --rerun-stale` reruns them)", file=out)
    for err in info["unreadable"]:
        _print(f"warning: {err}", file=out)
    return 0
