"""Replay a finished sweep's runs to measure the sweep ETA: after each run, the seconds left that the
estimator says against the seconds the remaining runs really took (their ``wall_s``).

    python scripts/eta_replay.py results/demo-runs.csv [--orders 200] [--per-method] [--first-extra 80]

Two estimators: ``per-run mean`` (the mean time of the finished runs × the runs left: what
peftbench printed before issue 18) and ``sized`` (peftbench.sweep.progress.Eta: seconds per unit of
run size, see docs/results.md). The first order is the CSV's own (by configuration, task, stage,
seed: the order of a sweep's waves is close to it); the others are random permutations (fixed seed).
Prints, per estimator, the ratio estimate / truth of the first estimate shown (after the first run,
or the second when the first cannot give one: the CSV order's, then the median, 10th and 90th
percentiles and the worst over the orders) and the median over the sweep of |log2(estimate / truth)|.
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

from peftbench.data.splits import split_size  # noqa: E402
from peftbench.store import RunSpec  # noqa: E402
from peftbench.sweep.progress import Eta, run_size, separable_setup  # noqa: E402
from peftbench.tasks import get_task  # noqa: E402


def read(path: Path) -> list[tuple[RunSpec, float, float | None]]:
    """(spec, wall_s, setup_s) per ok run; setup = wall − training time (epochs × train images /
    train images per s) where that is setup (training through the backbone), else None."""
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
        wall = float(r["wall_s"])
        setup = None
        if separable_setup(spec) and r["train_images_per_s"] and hp.get("epochs"):
            n_train = split_size(get_task(spec.task), spec.data_root, spec.train_split) or 0
            setup = max(0.0, wall - hp["epochs"] * n_train / float(r["train_images_per_s"]))
        out.append((spec, wall, setup))
    return out


def replay(runs, first_extra: float = 0.0) -> dict[str, list[float]]:
    """Per estimator: estimate / truth after each run (but the last). ``first_extra``: one-time seconds
    the first run pays before its first epoch (what a cold process spends: backbone, cache, warm-up)."""
    eta = Eta.plan([s for s, _, _ in runs])
    out: dict[str, list[float]] = {"per-run mean": [], "sized": []}
    spent = 0.0
    for k, (spec, wall, setup) in enumerate(runs[:-1], start=1):
        if k == 1:
            wall += first_extra
            setup = None if setup is None else setup + first_extra
        eta.start(spec)
        eta.finish(wall, ran=True, setup=setup)
        spent += wall
        truth = sum(w for _, w, _ in runs[k:])
        out["per-run mean"].append(spent / k * (len(runs) - k) / truth)
        left = eta.seconds_left()  # None: "estimating" (a first run whose setup is not separable)
        out["sized"].append(None if left is None else left / truth)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs_csv", type=Path)
    ap.add_argument("--orders", type=int, default=200, help="random orders besides the CSV's own (default 200)")
    ap.add_argument("--per-method", action="store_true", help="also: seconds per 1000 size units, per method")
    ap.add_argument("--first-extra", type=float, default=0.0, metavar="S",
                    help="one-time seconds added before the first run's first epoch (a cold process)")
    args = ap.parse_args()
    runs = read(args.runs_csv)
    if args.per_method:
        by: dict[str, list[float]] = {}
        for spec, wall, _ in runs:
            by.setdefault(f"{spec.method} ({spec.stage})", []).append(1000 * wall / run_size(spec))
        for name, v in sorted(by.items(), key=lambda kv: statistics.fmean(kv[1])):
            print(f"  {name:<28} {statistics.fmean(v):6.2f} s per 1000 image passes ({len(v)} runs)")
    orders = [runs]
    rng = random.Random(0)
    for _ in range(args.orders):
        o = runs[:]
        rng.shuffle(o)
        orders.append(o)
    total = sum(w for _, w, _ in runs)
    print(f"{args.runs_csv}: {len(runs)} runs, {total / 60:.1f} min of run time; {len(orders)} orders"
          + (f"; the first run pays {args.first_extra:g} s of one-time setup" if args.first_extra else ""))
    print(f"{'estimator':<14} {'first ETA/truth: CSV order':>27} {'median':>7} {'p10':>6} {'p90':>6} {'worst':>7} "
          f"{'median |log2 err| over the sweep':>34}")
    results = [replay(o, args.first_extra) for o in orders]
    for name in ("per-run mean", "sized"):
        firsts = [next(x for x in r[name] if x is not None) for r in results]  # the first estimate shown
        late = sum(r[name][0] is None for r in results)
        worst = max(firsts, key=lambda x: abs(math.log2(x)))
        err = statistics.median(abs(math.log2(x)) for r in results for x in r[name] if x is not None)
        q = statistics.quantiles(firsts, n=10)
        print(f"{name:<14} {firsts[0]:>27.2f} {statistics.median(firsts):>7.2f} {q[0]:>6.2f} {q[-1]:>6.2f} "
              f"{worst:>7.2f} {err:>34.3f}" + (f"   (first shown after run 2 in {late} orders)" if late else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
