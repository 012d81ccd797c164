"""``peftbench bench``: per-method train/eval throughput, peak memory and FLOPs, written as a CSV table."""
from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT_METHODS = "linear,full,vpt-shallow,vpt-deep,e2vpt,e2vpt-prune,adapter,lora,bitfit"


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure train/eval speed, memory and FLOPs per method",
                       description="Writes <out>/bench-<device>-<backbone>.csv (medians after warm-up).")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    p.add_argument("--backbone", default="vit_base_patch16_224", help="architecture (random weights)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--compile", nargs="?", const="on", default="off", choices=("off", "on", "both"),
                   help="torch.compile the model: off (default), on (--compile alone), or both (one row each)")
    p.add_argument("--precision", help="numeric precision(s), comma-separated from fp32, tf32, bf16, fp16: one row "
                                       "per method and precision (default: bf16 autocast on CUDA, fp32 on CPU)")
    p.add_argument("--no-amp", action="store_true", help="the same as --precision fp32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--repeats", type=int, default=2,
                   help="measurement rounds, alternately in order and reversed, so that the baselines are measured first "
                        "and last (default 2): each timing is the median over the rounds, its spread a column; a "
                        "spread above 20 %% or a load above the cores is warned about")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="[METHOD.]OPTION=VALUE")
    p.add_argument("--out", default="bench", help="folder of the CSV (default ./bench; the tables shipped with "
                                                  "peftbench, which --dry-run reads, are in peftbench/bench/tables)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for the MFU columns (default: peftbench/bench/peaks.py)")
    p.add_argument("--no-variants", action="store_true",
                   help="skip the inference rows of merged / compacted models")
    p.add_argument("--no-probe", action="store_true", help="skip the cached-features linear-probe comparison")
    p.add_argument("--fuse", default="", metavar="K[,K...]",
                   help="also measure K configurations of each fusable method trained as one model (rows with variant "
                        "fused-<K>; images/s count configuration-images: K x batch per fused step), e.g. --fuse 4 or 2,4,8")
    p.set_defaults(func=main)


PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def main(args) -> int:
    from ..bench.speed import BenchSettings, cached_linear_probe, run_bench, table_path, targets, write_table
    from ..errors import SettingsError
    from ..methods import get_method
    from .run import check_device

    device = check_device(args.device)
    methods = [get_method(m).name for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise SettingsError("--methods: no method given")
    if args.no_amp:
        precisions = ["fp32"]
    elif args.precision:
        precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
        bad = [p for p in precisions if p not in PRECISIONS]
        if bad or not precisions:
            raise SettingsError(f"--precision: {', '.join(bad) or 'nothing given'} (choose from {', '.join(PRECISIONS)})")
    else:
        precisions = ["bf16" if device.startswith("cuda") else "fp32"]
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--steps", args.steps, 1),
                               ("--warmup", args.warmup, 0), ("--repeats", args.repeats, 1)):
        if value < least:
            raise SettingsError(f"{flag} must be at least {least}, not {value}")
    compiles = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]
    try:
        fuse = tuple(int(k) for k in args.fuse.split(",") if k.strip())
    except ValueError:
        raise SettingsError(f"--fuse {args.fuse!r}: expected comma-separated integers") from None
    if any(k < 2 for k in fuse):
        raise SettingsError(f"--fuse {args.fuse}: every K must be at least 2")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise SettingsError(f"--peak-tflops must be positive, not {args.peak_tflops:g}")
    s = BenchSettings(methods=methods, backbone=args.backbone, batch_size=args.batch_size, device=device,
                      warmup=args.warmup, steps=args.steps, compile=compiles[0], precision=precisions[0],
                      sets=tuple(args.sets), precisions=tuple(precisions), compiles=compiles,
                      variants=not args.no_variants, peak_tflops=args.peak_tflops, fuse=fuse, repeats=args.repeats)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    rows = run_bench(s, log)
    gpu = None
    if device.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name(torch.device(device))
    path = table_path(Path(args.out), device, args.backbone, gpu)
    write_table(rows, path)
    probe = None if args.no_probe else cached_linear_probe(s)
    result = {"table": str(path), "targets": targets(rows, probe), "linear_probe": probe}
    if probe:
        probe_path = path.with_name(path.stem + "-linear-probe.json")
        probe_path.write_text(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in probe.items()},
                                         indent=1, sort_keys=True) + "\n")
    print(f"{'method':<14} {'variant':<10} {'precision':<9} {'compile':<7} {'train img/s':>12} {'eval img/s':>11} "
          f"{'x full':>7} {'GFLOP/img':>10} {'MFU %':>6} {'tokens':>7}")
    for r in rows:
        print(f"{r['method']:<14} {r['variant'] or '-':<10} {r['precision']:<9} {r['compile']!s:<7} "
              f"{r.get('train_images_per_s', '')!s:>12} {r['eval_images_per_s']:>11} {r.get('train_time_vs_full', '')!s:>7} "
              f"{r.get('gflops_train_per_image') or r['gflops_forward_per_image']:>10} "
              f"{r.get('train_mfu_pct') or r.get('eval_mfu_pct') or '':>6} {r['tokens']:>7}")
    print("\ntargets:")
    for t in result["targets"]:
        print(f"  [{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['measured']}")
    print(f"\ntable: {path}")
    return 0
