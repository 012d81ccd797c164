"""How long N local workers take for an N-task demo sweep, against one worker (``peftbench run --workers``).

    nice -n 10 python scripts/workers_scaling.py [--workers 2] [--method vpt-shallow] [--epochs 10] [--threads-per-run 1]

Runs ``peftbench run --suite demo --methods METHOD --tasks <N tasks> --workers W`` for W = 1 and W = N, each
in a fresh run store, and prints the wall time of each command (start-up, data checks and the workers'
start included: what a user waits for) and the speed-up. One worker trains in the driver process with
torch's default threads (all cores); N workers get cores / N threads each. Meaningful only when N cores
are free: the machine's load average is printed beside the numbers.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ("demo_digits", "demo_animals", "demo_dsprites_loc", "demo_dsprites_ori", "demo_clevr_count")


def run(method: str, tasks: list[str], workers: int, epochs: int, data_root: str | None,
        threads: int | None = None) -> float:
    runs = Path(tempfile.mkdtemp(prefix=f"peftbench-workers{workers}-"))
    cmd = [sys.executable, "-m", "peftbench", "run", "--suite", "demo", "--methods", method, "--tasks", ",".join(tasks),
           "--epochs", str(epochs), "--device", "cpu", "--workers", str(workers), "--runs-dir", str(runs), "--quiet"]
    if data_root:
        cmd += ["--data-root", data_root]
    t0 = time.time()
    env = dict(os.environ)
    if threads:  # torch's threads of the one-worker driver; workers take OMP_NUM_THREADS when set
        env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    seconds = time.time() - t0
    shutil.rmtree(runs, ignore_errors=True)
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--method", default="vpt-shallow")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--data-root")
    p.add_argument("--threads-per-run", type=int, default=None,
                   help="torch threads of every run, one worker or N (default: one worker uses every core, "
                        "N workers cores/N each); 1 measures the executor's own scaling on N free cores")
    args = p.parse_args(argv)
    tasks = list(TASKS[:args.workers])
    # the data is materialised and verified once, outside the timings
    subprocess.run([sys.executable, "-m", "peftbench", "data", "verify", "--suite", "demo", "--tasks", ",".join(tasks)]
                   + (["--data-root", args.data_root] if args.data_root else []), check=True, capture_output=True)
    load = os.getloadavg()[0]
    one = run(args.method, tasks, 1, args.epochs, args.data_root, args.threads_per_run)
    many = run(args.method, tasks, args.workers, args.epochs, args.data_root, args.threads_per_run)
    threads = (f"{args.threads_per_run} torch thread(s) per run" if args.threads_per_run else
               f"one worker: every core's threads, {args.workers} workers: cores/{args.workers} each")
    print(f"{args.method}, {len(tasks)} demo tasks x 1 run of {args.epochs} epochs, {os.cpu_count()} cores, {threads}, "
          f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"1 worker: {one:.1f} s; {args.workers} workers: {many:.1f} s; speed-up {one / many:.2f}x "
          f"(ideal {args.workers}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
