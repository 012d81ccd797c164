"""Summarise a demo hyper-parameter search into results/demo-hparam-search.csv.

The demo protocol trains every method with one fixed (lr, wd) per method (its recipe's demo_lr /
demo_wd). Those values were chosen on validation data only, by running a search
stage on the demo suite (train800 -> val200, the demo protocol's epochs and batch sizes) over a
small lr grid per method (with several --lr values the demo protocol searches before its final run):

    peftbench run --suite demo --num-seeds 1 --wd 0.0001 --runs-dir runs-demo-tune \\
        --methods <methods> --lr <grid>          (the grids are in the CSV)
    python scripts/demo_hparams.py runs-demo-tune results/demo-hparam-search.csv

For each method and lr this writes the mean last-epoch val200 top-1 over the demo tasks, and marks
the lr with the best mean (ties -> smaller lr): the value the method's recipe uses as demo_lr.
When the CSV exists, the rows of the methods found in the runs folder replace that method's rows and
the other methods' rows are kept, so a search for one more method adds to the table.
"""
from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from peftbench.store import RunStore


def main(runs_dir: str, out: str) -> int:
    scores: dict[tuple[str, float, float], dict[str, float]] = defaultdict(dict)
    for _, rec, err in RunStore(runs_dir).iter_records():
        if rec is None or rec["spec"]["stage"] != "search" or rec["spec"]["suite"] != "demo":
            continue
        spec = rec["spec"]
        key = (spec["method"], float(spec["hparams"]["lr"]), float(spec["hparams"]["wd"]))
        top1 = (rec.get("metrics") or {}).get("top1") if rec["status"] == "ok" else None
        scores[key][spec["task"]] = top1 if top1 is not None else 0.0  # diverged / failed count as 0
    tasks = sorted({t for d in scores.values() for t in d})
    rows = []
    for (method, lr, wd), per_task in sorted(scores.items()):
        complete = len(per_task) == len(tasks)
        rows.append({"method": method, "lr": lr, "wd": wd, "tasks": len(per_task),
                     "mean_val_top1": round(statistics.fmean(per_task.values()), 2) if complete else "",
                     **{t: round(per_task[t], 2) if t in per_task else "" for t in tasks}})
    for method in sorted({r["method"] for r in rows}):
        cand = [r for r in rows if r["method"] == method and r["mean_val_top1"] != ""]
        best = max(cand, key=lambda r: (r["mean_val_top1"], -r["lr"])) if cand else None
        for r in rows:
            if r["method"] == method:
                r["chosen"] = "yes" if r is best else ""
    if Path(out).exists():
        searched = {r["method"] for r in rows}
        with open(out, newline="") as fh:
            kept = [r for r in csv.DictReader(fh) if r["method"] not in searched]
        for r in kept:
            r["lr"], r["wd"] = float(r["lr"]), float(r["wd"])
        if kept and set(kept[0]) != {"method", "lr", "wd", "tasks", "mean_val_top1", *tasks, "chosen"}:
            raise SystemExit(f"{out}: its task columns differ from the searched tasks {tasks}")
        rows = sorted(kept + rows, key=lambda r: (r["method"], r["lr"], r["wd"]))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["method", "lr", "wd", "tasks", "mean_val_top1", *tasks, "chosen"],
                           lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        print(f"{r['method']:<14} lr={r['lr']:<8g} mean val top1 {r['mean_val_top1']!s:>6} {r['chosen']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*(sys.argv[1:] or ["runs-demo-tune", "results/demo-hparam-search.csv"])))
