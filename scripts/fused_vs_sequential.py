"""Fused vs sequential training of the lr grid on the demo suite (issue 16, docs/fused.md).

For every method and task: the same demo sweep (an lr grid on train800 -> val200, then the chosen lr on
train800val200 -> test) run twice in this process, on fresh run stores, once with every run alone and
once with ``--fuse K`` (the grid trains as one model); the order of the two alternates from one pair to
the next. Times are seconds of each stage (the grid stage is the one fusing changes; the final stage
is one run either way), both wall-clock and CPU time of this process (all its threads): on a machine
shared with other work the CPU time is the steadier measure of the work done. Also checked: every
grid run's losses and top-1 are equal both ways, and the same lr is selected.

    nice -n 10 python scripts/fused_vs_sequential.py --out results/fused-vs-sequential.csv

Writes the CSV (one row per method x task, then an ``all`` row) and prints it as a markdown table.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

METHODS = "linear,vpt-shallow,vpt-deep,e2vpt,adapter,lora,bitfit,partial-1,mlp-3"
TASKS = "demo_digits,demo_animals"
FACTORS = "0.25,0.5,1,2"  # the grid: the method's demo lr times these


class TimedExecutor:
    """The local executor, timing each stage."""

    def __init__(self, inner):
        self.inner = inner
        self.stages: dict[str, tuple[float, float]] = {}  # stage -> (wall s, CPU s)

    def run(self, specs, store):
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.inner.run(specs, store)
        self.stages[specs[0].stage] = (time.perf_counter() - t0, time.process_time() - c0)
        return out

    def close(self):
        self.inner.close()


def one_sweep(method: str, task: str, lrs: tuple[float, ...], epochs: int | None, fuse: int, runs: Path,
              device: str = "cpu"):
    from peftbench.api.schema import Sweep
    from peftbench.executors.local import LocalExecutor
    from peftbench.store import RunStore
    from peftbench.sweep.drive import count_runs, drive
    from peftbench.sweep.plan import plan
    from peftbench.train.env import Env

    overrides = {"lr": lrs, **({"epochs": epochs} if epochs else {})}
    contexts = plan(Sweep(methods=[method], suite="demo", tasks=[task], **overrides, verify_data=False))
    env = Env(device=device, quiet=True, save_weights="none", fuse=fuse)
    ex = TimedExecutor(LocalExecutor(env, len(count_runs(contexts))))
    store = RunStore(runs)
    drive(contexts, ex, store)
    recs = {r.key: r for _, r, _ in store.iter_records()}
    return ex.stages, recs


def compare(a: dict, b: dict) -> tuple[float, bool, bool]:
    """(max relative train-loss difference, every top-1 equal, the same final lr) of two sweeps' records."""
    worst, tops = 0.0, True
    for key, ra in a.items():
        rb = b[key]
        for ha, hb in zip(ra.history, rb.history):
            worst = max(worst, abs(ha["train_loss"] - hb["train_loss"]) / max(1e-12, abs(ha["train_loss"])))
        tops &= ra.status == rb.status and ra.top1 == rb.top1
    final = lambda recs: sorted(r.hparams["lr"] for r in recs.values() if r.spec["stage"] == "final")  # noqa: E731
    return worst, tops, final(a) == final(b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--factors", default=FACTORS, help="the lr grid: each method's demo lr times these")
    ap.add_argument("--epochs", type=int, default=None, help="override the demo protocol's epochs")
    ap.add_argument("--fuse", type=int, default=None, help="K (default: the grid's size)")
    ap.add_argument("--out", default="results/fused-vs-sequential.csv")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from peftbench.methods import get_method
    from peftbench.sweep.protocols import get_protocol

    demo = get_protocol("demo")
    factors = tuple(float(f) for f in args.factors.split(","))
    k = args.fuse or len(factors)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="fused-vs-seq-"))
    pair = 0
    try:
        for name in args.methods.split(","):
            method = get_method(name)
            base_lr = float({**demo.defaults, **method.recipe.protocol_values("demo")}["lr"])
            lrs = tuple(round(base_lr * f, 10) for f in factors)
            for task in args.tasks.split(","):
                order = ("sequential", "fused") if pair % 2 == 0 else ("fused", "sequential")
                pair += 1
                got = {}
                for way in order:
                    runs = tmp / f"{name}-{task}-{way}"
                    got[way] = one_sweep(name, task, lrs, args.epochs, k if way == "fused" else 1, runs, args.device)
                    shutil.rmtree(runs, ignore_errors=True)
                (s_st, s_recs), (f_st, f_recs) = got["sequential"], got["fused"]
                worst, tops, same = compare(s_recs, f_recs)
                fused_runs = sum(1 for r in f_recs.values() if r.extra.get("fused"))
                row = {"method": method.name, "task": task, "configs": len(lrs), "fuse": k, "fused_runs": fused_runs}
                for i, unit in ((0, "s"), (1, "cpu_s")):
                    gs, gf = s_st.get("search", (0.0, 0.0))[i], f_st.get("search", (0.0, 0.0))[i]
                    ws, wf = sum(v[i] for v in s_st.values()), sum(v[i] for v in f_st.values())
                    row.update({f"grid_sequential_{unit}": round(gs, 2), f"grid_fused_{unit}": round(gf, 2),
                                f"grid_speedup{'' if i == 0 else '_cpu'}": round(gs / gf, 3) if gf else "",
                                f"sweep_sequential_{unit}": round(ws, 2), f"sweep_fused_{unit}": round(wf, 2),
                                f"sweep_speedup{'' if i == 0 else '_cpu'}": round(ws / wf, 3) if wf else ""})
                row.update({"max_rel_loss_diff": f"{worst:.1e}", "top1_equal": tops, "same_selection": same})
                rows.append(row)
                print(f"{method.name} {task}: grid {row['grid_sequential_s']} s -> {row['grid_fused_s']} s "
                      f"(x{row['grid_speedup']}; CPU x{row['grid_speedup_cpu']}), losses within "
                      f"{row['max_rel_loss_diff']}, top-1 equal {tops}",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = {"method": "all", "task": "all", "configs": "", "fuse": k, "fused_runs": sum(r["fused_runs"] for r in rows)}
    for unit, sfx in (("s", ""), ("cpu_s", "_cpu")):
        for col in ("grid_sequential", "grid_fused", "sweep_sequential", "sweep_fused"):
            total[f"{col}_{unit}"] = round(sum(r[f"{col}_{unit}"] for r in rows), 2)
        for what in ("grid", "sweep"):
            total[f"{what}_speedup{sfx}"] = round(total[f"{what}_sequential_{unit}"] / total[f"{what}_fused_{unit}"], 3)
    total["max_rel_loss_diff"] = f"{max(float(r['max_rel_loss_diff']) for r in rows):.1e}"
    total["top1_equal"] = all(r["top1_equal"] for r in rows)
    total["same_selection"] = all(r["same_selection"] for r in rows)
    rows.append(total)
    cols = ["method", "task", "configs", "fuse", "fused_runs", "grid_sequential_s", "grid_fused_s", "grid_speedup",
            "grid_sequential_cpu_s", "grid_fused_cpu_s", "grid_speedup_cpu", "sweep_sequential_s", "sweep_fused_s",
            "sweep_speedup", "sweep_sequential_cpu_s", "sweep_fused_cpu_s", "sweep_speedup_cpu", "max_rel_loss_diff",
            "top1_equal", "same_selection"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
