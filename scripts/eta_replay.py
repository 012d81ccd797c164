"""Replay a finished sweep's runs to measure the sweep ETA: after each run, the seconds left that the
estimator says against the seconds the remaining runs really took (their ``wall_s``).

    python scripts/eta_replay.py results/demo-runs.csv [--orders 200] [--per-method]

Two estimators: ``per-run mean`` (the mean time of the finished runs × the runs left: what
peftbench printed before issue 18) and ``sized`` (peftbench.sweep.progress.Eta: seconds per unit of
run size, see docs/results.md). The first order is the CSV's own (by configuration, task, stage,
seed: the order of a sweep's waves is close to it); the others are random permutations (fixed seed).
Prints, per estimator, the ratio estimate / truth after the first run (the CSV order's, then the
median, 10th and 90th percentiles and the worst over the orders) and the median over the sweep of
|log2(estimate / truth)|.
"""
from __future__ import annotations

import argparse
import csv
import math
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peftbench.store import RunSpec  # noqa: E402
from peftbench.sweep.progress import Eta, run_size  # noqa: E402


def read(path: Path) -> list[tuple[RunSpec, float]]:
    out = []
    for r in csv.DictReader(open(path, newline="", encoding="utf-8")):
        if r["status"] != "ok" or not r["wall_s"]:
            continue
        hp = {"lr": float(r["lr"] or 0), "wd": float(r["wd"] or 0), "batch_size": int(r["batch_size"] or 0)}
        if r["epochs"]:
            hp["epochs"] = int(r["epochs"])
        spec = RunSpec(method=r["method"], task=r["task"], suite=r["suite"], protocol=r["protocol"], stage=r["stage"],
                       train_split=r["train_split"], eval_split=r["eval_split"], hparams=hp, seed=int(r["seed"]),
                       backbone=r["backbone"], config=r["config"], job=r["job"] or "train")
        out.append((spec, float(r["wall_s"])))
    return out


def replay(runs: list[tuple[RunSpec, float]]) -> dict[str, list[float]]:
    """Per estimator: estimate / truth after each run (but the last)."""
    eta = Eta.plan([s for s, _ in runs])
    out: dict[str, list[float]] = {"per-run mean": [], "sized": []}
    spent = 0.0
    for k, (spec, wall) in enumerate(runs[:-1], start=1):
        eta.start(spec)
        eta.finish(wall, ran=True)
        spent += wall
        truth = sum(w for _, w in runs[k:])
        out["per-run mean"].append(spent / k * (len(runs) - k) / truth)
        out["sized"].append(eta.seconds_left() / truth)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs_csv", type=Path)
    ap.add_argument("--orders", type=int, default=200, help="random orders besides the CSV's own (default 200)")
    ap.add_argument("--per-method", action="store_true", help="also: seconds per 1000 size units, per method")
    args = ap.parse_args()
    runs = read(args.runs_csv)
    if args.per_method:
        by: dict[str, list[float]] = {}
        for spec, wall in runs:
            by.setdefault(f"{spec.method} ({spec.stage})", []).append(1000 * wall / run_size(spec))
        for name, v in sorted(by.items(), key=lambda kv: statistics.fmean(kv[1])):
            print(f"  {name:<28} {statistics.fmean(v):6.2f} s per 1000 image passes ({len(v)} runs)")
    orders = [runs]
    rng = random.Random(0)
    for _ in range(args.orders):
        o = runs[:]
        rng.shuffle(o)
        orders.append(o)
    total = sum(w for _, w in runs)
    print(f"{args.runs_csv}: {len(runs)} runs, {total / 60:.1f} min of run time; {len(orders)} orders")
    print(f"{'estimator':<14} {'first ETA/truth: CSV order':>27} {'median':>7} {'p10':>6} {'p90':>6} {'worst':>7} "
          f"{'median |log2 err| over the sweep':>34}")
    results = [replay(o) for o in orders]
    for name in ("per-run mean", "sized"):
        firsts = [r[name][0] for r in results]
        worst = max(firsts, key=lambda x: abs(math.log2(x)))
        err = statistics.median(abs(math.log2(x)) for r in results for x in r[name])
        q = statistics.quantiles(firsts, n=10)
        print(f"{name:<14} {results[0][name][0]:>27.2f} {statistics.median(firsts):>7.2f} {q[0]:>6.2f} {q[-1]:>6.2f} "
              f"{worst:>7.2f} {err:>34.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
