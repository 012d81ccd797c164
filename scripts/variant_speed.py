"""Inference speed of each method's model and its inference variants, measured interleaved.

``peftbench bench`` measures one model after the other (medians), which is fine on a quiet device. On a
shared, loaded machine the load changes between measurements; this script alternates the forward
passes of all the models round by round, so every model sees the same load, and reports the fastest
round (closest to the uncontended speed) and the median, with the exact FLOPs and token counts:

    python scripts/variant_speed.py --methods linear,vpt-deep,e2vpt,e2vpt-prune --rounds 15 --batch-size 8

Output: one line per (method, variant) and a CSV (--out). The models are built exactly as the bench
builds them (random weights, ``Method.bench_options``, ``--set``).
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time

import torch

from peftbench.backbones import image_size
from peftbench.bench.speed import BenchSettings, _flops, _tokens, build


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="linear,vpt-deep,e2vpt,e2vpt-prune")
    p.add_argument("--backbone", default="vit_base_patch16_224")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    s = BenchSettings(methods=a.methods.split(","), backbone=a.backbone, batch_size=a.batch_size, device=a.device,
                      sets=tuple(a.sets))
    dev = torch.device(a.device)
    models = []
    for name in s.methods:
        method, model = build(name, s)
        model.eval()
        models.append((method.name, "", model.to(dev)))
        for vname, v in model.inference_variants().items():
            models.append((method.name, vname, v.to(dev).eval()))
    size = image_size(models[0][2].backbone if hasattr(models[0][2], "backbone") else models[0][2])
    x = torch.randn(a.batch_size, 3, size, size, device=dev)
    times = {i: [] for i in range(len(models))}
    with torch.no_grad():
        for _, _, m in models:  # warm-up
            m(x)
        for _ in range(a.rounds):
            for i, (_, _, m) in enumerate(models):
                t = time.perf_counter()
                m(x)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times[i].append(time.perf_counter() - t)
    rows = []
    base = None
    for i, (method, variant, m) in enumerate(models):
        best, med = min(times[i]), statistics.median(times[i])
        row = {"method": method, "variant": variant, "tokens": _tokens(m, x[:1]),
               "gflops_forward_per_image": round(_flops(lambda: m(x)) / a.batch_size / 1e9, 3),
               "best_images_per_s": round(a.batch_size / best, 2), "median_images_per_s": round(a.batch_size / med, 2)}
        if method == "linear" and variant == "merged":
            base = row
        rows.append(row)
    for r in rows:
        r["best_vs_plain"] = round(r["best_images_per_s"] / base["best_images_per_s"], 3) if base else ""
        print(f"{r['method']:<14} {r['variant'] or '(as trained)':<13} tokens {r['tokens']:>4}  "
              f"{r['gflops_forward_per_image']:>8} GFLOP/img  best {r['best_images_per_s']:>7} img/s  "
              f"median {r['median_images_per_s']:>7} img/s  vs plain {r['best_vs_plain']}")
    if a.out:
        with open(a.out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
