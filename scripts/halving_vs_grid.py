"""Successive halving vs the full grid on the demo suite: does ``--search halving`` select the grid's
configuration, how far apart are the two on val200 and on test when not, and how many image-steps it saves.

    nice -n 10 python scripts/halving_vs_grid.py --runs-dir runs-halving
        [--methods linear,vpt-shallow,...] [--tasks demo_digits,...] [--factors 3,2] [--workers N] [--fuse K]

Per method, the grid is a small documented one around the method's demo-protocol lr (the demo protocol has
one lr per method): lr = demo lr x (0.25, 0.5, 1, 2), wd = (0.0001, 0) (the last two wd values of the VPT grid),
8 configurations, the demo protocol's epochs (10; linear 100), selection on train800 -> val200, one final
run (seed 42) on train800val200 -> test. Both searches run in one run store, so the halving's last rung (the
grid's own runs, the same keys) costs nothing to train here; the image-steps of each search are counted from
its run specs (what it would cost alone): training images x the epochs each run trains.

Writes results/demo-halving-vs-grid.csv (one row per method, task and halving factor) and prints the README
tables: per method, how often halving picked the grid's configuration, the val200 / test gaps when it did
not, the image-steps of the search stage; and the same ratio from the rung arithmetic for the real grids
(VPT: 10 lr x 4 wd, 100 epochs). The run store makes the script resumable: run it again after an interrupt.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

from peftbench.api.schema import Sweep
from peftbench.bench.estimate import trained_epochs
from peftbench.executors.local import LocalExecutor
from peftbench.methods import get_method
from peftbench.store import RunStore
from peftbench.sweep.drive import drive
from peftbench.sweep.plan import plan
from peftbench.sweep.protocols import DemoProtocol
from peftbench.sweep.search import DEFAULT_RUNGS, Search, budget
from peftbench.train.env import Env

METHODS = ("linear", "vpt-shallow", "bitfit", "lora", "adapter", "vpt-deep", "e2vpt", "full")  # cheap first
LR_FACTORS = (0.25, 0.5, 1.0, 2.0)
WD_GRID = (0.0001, 0.0)
OUT = Path(__file__).resolve().parents[1] / "results" / "demo-halving-vs-grid.csv"
FIELDS = ["method", "task", "halving", "configs", "epochs", "grid_lr", "grid_wd", "halving_lr", "halving_wd", "same",
          "grid_val200", "halving_val200", "val200_gap", "grid_test", "halving_test", "test_gap",
          "grid_search_image_steps", "halving_search_image_steps", "image_steps_ratio"]


def lr_grid(method: str) -> tuple[float, ...]:
    lr = float({**DemoProtocol.defaults, **get_method(method).recipe.protocol_values("demo")}["lr"])
    return tuple(round(lr * f, 10) for f in LR_FACTORS)


class Recording:
    """An executor that remembers the specs of every stage it runs."""

    def __init__(self, inner):
        self.inner, self.specs = inner, []

    def run(self, specs, store):
        self.specs += specs
        return self.inner.run(specs, store)


def search_cost(specs, store: RunStore) -> int:
    total = 0
    for s in specs:
        if s.stage.startswith("search"):
            rec = store.load(s)
            start, stop = trained_epochs(s)
            total += (stop - start) * int((rec.num_train if rec is not None else None) or 800)
    return total


def sweep(method, tasks, search, store, executor, data_root):
    settings = Sweep(methods=[method], suite="demo", tasks=tasks, data_root=data_root, lr=list(lr_grid(method)),
                     wd=list(WD_GRID), search=search.kind, halving_rungs=list(search.rungs) if search.kind == "halving"
                     else None, halving_factor=search.factor if search.kind == "halving" else None)
    contexts = plan(settings)
    rec = Recording(executor)
    outcomes = drive(contexts, rec, store)
    out = {}
    for o in outcomes:
        if o.error:
            raise SystemExit(f"{method} {o.ctx.task.name} ({search.describe()}): {o.error}")
        task = o.ctx.task.name
        out[task] = {"final": o.records[0], "specs": [s for s in rec.specs if s.task == task]}
    return out


def _f(x, digits=2):
    return "" if x is None else f"{x:.{digits}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs-dir", default="runs-halving")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tasks", help="comma-separated demo tasks (default: all)")
    p.add_argument("--factors", default="3,2", help="halving reduction factors to compare (rungs 0.1,0.33,1)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--fuse", type=int, default=1, help="train up to K runs of a stage fused (fusable methods; the "
                   "results equal separate runs', docs/fused.md: only the time it takes changes)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    tasks = args.tasks.split(",") if args.tasks else None
    factors = [float(f) for f in args.factors.split(",") if f]
    store = RunStore(args.runs_dir)
    env = Env(quiet=True, checkpoint_every=0, fuse=args.fuse)  # runs are short: resumable per run, not per epoch
    executor = LocalExecutor(env, workers=args.workers)
    rows = []
    t0 = time.time()
    try:
        for method in methods:
            grid = sweep(method, tasks, Search("grid"), store, executor, args.data_root)
            for factor in factors:
                halving = sweep(method, tasks, Search("halving", DEFAULT_RUNGS, factor), store, executor,
                                args.data_root)
                for task, g in grid.items():
                    h = halving[task]
                    gf, hf = g["final"], h["final"]
                    full = {(s.hparams["lr"], s.hparams["wd"]): store.load(s) for s in g["specs"]
                            if s.stage == "search"}
                    pick_g = (gf.hparams["lr"], gf.hparams["wd"])
                    pick_h = (hf.hparams["lr"], hf.hparams["wd"])
                    val_g, val_h = full[pick_g].top1, full[pick_h].top1
                    cost_g, cost_h = search_cost(g["specs"], store), search_cost(h["specs"], store)
                    rows.append({
                        "method": method, "task": task, "halving": f"rungs {','.join(map(str, DEFAULT_RUNGS))}, "
                        f"keep 1/{factor:g}", "configs": len(full), "epochs": int(gf.hparams["epochs"]),
                        "grid_lr": pick_g[0], "grid_wd": pick_g[1], "halving_lr": pick_h[0], "halving_wd": pick_h[1],
                        "same": "yes" if pick_g == pick_h else "no",
                        "grid_val200": _f(val_g), "halving_val200": _f(val_h), "val200_gap": _f(val_h - val_g),
                        "grid_test": _f(gf.top1), "halving_test": _f(hf.top1), "test_gap": _f(hf.top1 - gf.top1),
                        "grid_search_image_steps": cost_g, "halving_search_image_steps": cost_h,
                        "image_steps_ratio": _f(cost_g / cost_h),
                    })
            print(f"[{time.time() - t0:.0f} s] {method}: done", file=sys.stderr, flush=True)
            write(rows, Path(args.out))
    finally:
        executor.close()
    report(rows)
    return 0


def write(rows, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def report(rows) -> None:
    print("\n| method | halving | same choice | val200 gap when not (pts) | test gap when not (pts) | "
          "search image-steps grid / halving |")
    print("|---|---|---|---|---|---|")
    for key in dict.fromkeys((r["method"], r["halving"]) for r in rows):
        rs = [r for r in rows if (r["method"], r["halving"]) == key]
        diff = [r for r in rs if r["same"] == "no"]
        gaps = (", ".join(f"{r['val200_gap']} ({r['task'].replace('demo_', '')})" for r in diff) or "-")
        tgaps = ", ".join(r["test_gap"] for r in diff) or "-"
        g, h = sum(r["grid_search_image_steps"] for r in rs), sum(r["halving_search_image_steps"] for r in rs)
        print(f"| {key[0]} | {key[1]} | {len(rs) - len(diff)}/{len(rs)} | {gaps} | {tgaps} | "
              f"{g / 1e6:.2f}M / {h / 1e6:.2f}M = {g / h:.2f}x |")
    for halving in dict.fromkeys(r["halving"] for r in rows):
        rs = [r for r in rows if r["halving"] == halving]
        same = sum(r["same"] == "yes" for r in rs)
        g, h = sum(r["grid_search_image_steps"] for r in rs), sum(r["halving_search_image_steps"] for r in rs)
        tg = [float(r["test_gap"]) for r in rs]
        print(f"| all | {halving} | {same}/{len(rs)} | mean over all pairs: "
              f"{statistics.fmean(float(r['val200_gap']) for r in rs):+.2f} | {statistics.fmean(tg):+.2f} | "
              f"{g / 1e6:.2f}M / {h / 1e6:.2f}M = {g / h:.2f}x |")
    print("\nthe rung arithmetic for the real grids (100 epochs, rungs 0.1,0.33,1: stops 10, 33, 100):")
    print("| grid | configurations | factor | epoch-configurations grid / halving | ratio |")
    print("|---|---|---|---|---|")
    for name, method in (("VPT / E^2VPT", "vpt-deep"), ("full fine-tuning recipe", "full"), ("NOAH recipe", "lora")):
        r = get_method(method).recipe
        n = len(r.lr_grid) * len(r.wd_grid)
        name = f"{name} ({len(r.lr_grid)} lr x {len(r.wd_grid)} wd)"
        for factor in (3.0, 2.0):
            g, h = budget(n, 100, Search("halving", DEFAULT_RUNGS, factor))
            print(f"| {name} | {n} | {factor:g} | {g} / {h} | {g / h:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
