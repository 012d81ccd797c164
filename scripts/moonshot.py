"""The moonshot's arithmetic: one method's complete VTAB-1k sweep under the VPT protocol (selection + 5 final
seeds, 19 tasks) in H100-hours, for the grid and for successive halving, from the planned runs.

    python scripts/moonshot.py [--method e2vpt] [--mfu 0.3,0.4,0.5,0.6]

Image-steps and evaluated images come from the runs ``peftbench run --suite vtab --dry-run`` plans (the real
VTAB-1k split sizes: train800 / val200 for the search, train800val200 / test for the final runs; every search
run evaluates val200 after each epoch, every final run evaluates test once). FLOPs per image come from the
bench table's FLOP counter for ViT-B/16 (``gflops_train_per_image``: forward + backward of the method's
model, the frozen backbone's weight gradients not computed; ``gflops_forward_per_image`` for evaluation).
The H100's peak is the dense bf16 datasheet rate (peftbench/bench/peaks.py); the model-FLOPs utilisation
(MFU) is an assumption, printed as such: fusing configurations (``--fuse K``) does not remove FLOPs (each
configuration's prompts or adapters change every activation), it raises the utilisation of small batches.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from peftbench.api.schema import Sweep
from peftbench.bench.estimate import TABLES, evaluations, split_size, trained_epochs
from peftbench.bench.peaks import peak_tflops
from peftbench.bench.speed import read_table
from peftbench.sweep.drive import count_runs
from peftbench.sweep.plan import plan
from peftbench.sweep.search import Search
from peftbench.tasks import get_task


def work(method: str, search: Search) -> dict:
    contexts = plan(Sweep(methods=[method], suite="vtab", search=search.kind), check_data=False)
    specs = count_runs([dataclasses.replace(c, search=search) for c in contexts])
    out = {"runs": len(specs), "train": 0, "search_train": 0, "eval": 0}
    for s in specs:
        task = get_task(s.task)
        n_train, n_eval = split_size(task, "", s.train_split), split_size(task, "", s.eval_split)
        start, stop = trained_epochs(s)
        out["train"] += (stop - start) * n_train
        if s.stage.startswith("search"):
            out["search_train"] += (stop - start) * n_train
        out["eval"] += evaluations(s) * n_eval
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="e2vpt")
    p.add_argument("--mfu", default="0.3,0.4,0.5,0.6", help="assumed model-FLOPs utilisations")
    args = p.parse_args(argv)
    table = read_table(TABLES / "bench-cpu-vit_base_patch16_224.csv")
    row = table[args.method]
    g_train, g_eval = float(row["gflops_train_per_image"]), float(row["gflops_forward_per_image"])
    peak = peak_tflops("NVIDIA H100 80GB HBM3", "bf16")
    mfus = [float(x) for x in args.mfu.split(",")]
    print(f"{args.method} on VTAB-1k, ViT-B/16 ({row['tokens']} tokens): {g_train:.1f} GFLOP per training image, "
          f"{g_eval:.1f} GFLOP per evaluated image (bench table FLOP counter); H100 SXM dense bf16 peak {peak:g} TFLOP/s")
    print("| search | runs | search image-steps | all image-steps | evaluated images | PFLOP | "
          + " | ".join(f"H100-h at {m:.0%} MFU" for m in mfus) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(mfus))
    for search in (Search("grid"), Search("halving"), Search("halving", (0.05, 0.2, 1.0), 4.0)):
        w = work(args.method, search)
        flops = w["train"] * g_train * 1e9 + w["eval"] * g_eval * 1e9
        hours = [flops / (peak * 1e12 * m) / 3600 for m in mfus]
        print(f"| {search.describe()} | {w['runs']} | {w['search_train'] / 1e6:.2f}M | {w['train'] / 1e6:.2f}M | "
              f"{w['eval'] / 1e6:.2f}M | {flops / 1e15:.0f} | " + " | ".join(f"{h:.2f}" for h in hours) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
