"""Measure what kill -9 and concurrent drivers do to a run store (docs/reliability.md).

1. Concurrency: M `peftbench run` processes start at once on one runs dir with the same demo sweep.
   Counted: trainings (each process logs the runs it trained), records, corrupt records, runs trained
   more than once (attempts > 1).
2. Kills: a driver is killed with SIGKILL at a random moment, N times in a row, each time started
   again on the same runs dir; then a last driver finishes the sweep. Counted: finished records lost
   or changed by a later kill, corrupt records, runs whose final result differs from an
   uninterrupted reference sweep (it must not: a resumed run equals an uninterrupted one).

    python scripts/reliability.py --drivers 4 --kills 8 --out /tmp/reliability

Prints a markdown table. Needs the demo data (built on first use) and a few CPU-minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SWEEP = ["--methods", "linear,vpt-shallow", "--suite", "demo", "--tasks", "demo_digits,demo_dsprites_loc",
         "--seeds", "1,2", "--epochs", "6", "--backbone", "demo-vit-random"]


def cli() -> list[str]:
    script = Path(sys.executable).with_name("peftbench")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "peftbench"]


def records(runs: Path) -> tuple[dict[str, dict], int]:
    good, corrupt = {}, 0
    for p in sorted(runs.glob("*/*/*.json")):
        if "." in p.stem or p.parent.parent.name.startswith("."):
            continue
        try:
            r = json.loads(p.read_text())
            good[r["key"]] = r
        except (ValueError, KeyError):
            corrupt += 1
    return good, corrupt


def run(runs: Path, env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen(cli() + ["run", *SWEEP, "--runs-dir", str(runs)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drivers", type=int, default=4, help="concurrent drivers")
    ap.add_argument("--kills", type=int, default=8, help="SIGKILLs of a driver in a row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("reliability-runs"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)

    # reference: one uninterrupted sweep
    ref_dir = args.out / "reference"
    p = run(ref_dir, env)
    err = p.communicate()[1]
    assert p.returncode == 0, err[-2000:]
    ref, _ = records(ref_dir)
    n_runs = len(ref)

    # 1. concurrent drivers
    conc = args.out / "concurrent"
    procs = [run(conc, env) for _ in range(args.drivers)]
    errs = [q.communicate()[1] for q in procs]
    recs, corrupt = records(conc)
    trained = sum(e.count(": ok top1") + e.count(": diverged") + e.count(": failed") for e in errs)
    twice = sum(int(r.get("attempts") or 0) > 1 for r in recs.values())
    same = sum(recs[k]["metrics"]["top1"] == ref[k]["metrics"]["top1"] for k in ref if k in recs)

    # 2. kill -9, again and again
    kill = args.out / "killed"
    lost = changed = corrupt_k = 0
    seen: dict[str, str] = {}
    kills_done = 0
    for _ in range(args.kills):
        q = run(kill, env)
        time.sleep(rng.uniform(2.0, 8.0))
        if q.poll() is None:
            q.send_signal(signal.SIGKILL)
            kills_done += 1
        q.wait()
        now, bad = records(kill)
        corrupt_k += bad
        for k, text in seen.items():
            if k not in now:
                lost += 1
            elif json.dumps(now[k], sort_keys=True) != text:
                changed += 1
        seen = {k: json.dumps(r, sort_keys=True) for k, r in now.items() if r["status"] in ("ok", "diverged")}
    q = run(kill, env)
    err = q.communicate()[1]
    assert q.returncode == 0, err[-2000:]
    final, bad = records(kill)
    corrupt_k += bad
    equal = sum(final[k]["metrics"]["top1"] == ref[k]["metrics"]["top1"] and
                [h["train_loss"] for h in final[k]["history"]] == [h["train_loss"] for h in ref[k]["history"]]
                for k in ref if k in final)
    resumed = sum(int(r.get("attempts") or 0) > 1 for r in final.values())

    print(f"sweep: {' '.join(SWEEP)} ({n_runs} runs)\n")
    print("| experiment | runs | trainings | records | corrupt records | runs trained twice | finished records lost "
          "or changed | results equal to the uninterrupted sweep |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.drivers} concurrent drivers | {n_runs} | {trained} | {len(recs)} | {corrupt} | {twice} | 0 | "
          f"{same}/{n_runs} |")
    print(f"| {kills_done} kill -9 + restart, then a last driver | {n_runs} | - | {len(final)} | {corrupt_k} | "
          f"{resumed} resumed | {lost + changed} | {equal}/{n_runs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
