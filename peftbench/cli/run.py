"""``peftbench run``: a sweep of methods × tasks under a protocol."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    from ..tasks import parse_names  # commas inside VPT task names (`dsprites(a="x",b=16)`) do not split

    return parse_names(text)


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments that define a sweep (shared by run and the commands that plan one)."""
    p.add_argument("--methods", type=_names, required=True, help="comma-separated method names (peftbench list methods)")
    p.add_argument("--suite", default="demo", help="task suite: demo (default, offline), vtab, fgvc")
    p.add_argument("--tasks", type=_names, help="comma-separated subset of the suite's tasks")
    p.add_argument("--protocol", help="vpt | fixed | demo (default: the suite's)")
    p.add_argument("--seeds", type=_ints, help="comma-separated seeds of the final runs")
    p.add_argument("--num-seeds", type=int, help="number of final seeds (default: the protocol's: 5 for vpt, 1 for demo)")
    p.add_argument("--backbone", help="timm model name with tag, or a preset (default: the suite's)")
    p.add_argument("--checkpoint", help="local weights for the backbone: .npz, .safetensors or .pth")
    p.add_argument("--data-root", help="data folder (default: $PEFTBENCH_DATA, or ~/.cache/peftbench/data for the demo)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="[METHOD.]OPTION=VALUE",
                   help="a method option, e.g. --set e2vpt.prompt_tokens=10 (repeatable)")
    p.add_argument("--lr", type=_floats, help="base learning rate(s): replaces the search grid")
    p.add_argument("--wd", type=_floats, help="weight decay value(s): replaces the search grid")
    p.add_argument("--epochs", type=int, help="override the number of epochs")
    p.add_argument("--batch-size", type=int, help="override the batch size")
    p.add_argument("--precision", choices=("fp32", "tf32", "bf16", "fp16"),
                   help="numeric precision of training and evaluation (part of the run key; default: the "
                        "protocol's: fp32 for vpt, bf16 on CUDA for fixed and demo, fp32 on CPU)")
    p.add_argument("--no-verify-data", dest="verify_data", action="store_false",
                   help="do not verify the data (split sizes, classes, every image decodes) before the sweep")


def settings_from_args(args, device: str = "cpu"):
    from ..sweep.plan import SweepSettings

    overrides = {"epochs": args.epochs, "batch_size": args.batch_size,
                 "lr_grid": args.lr, "wd_grid": args.wd}
    return SweepSettings(methods=args.methods, suite=args.suite, tasks=args.tasks, protocol=args.protocol,
                         seeds=list(args.seeds) if args.seeds else None, num_seeds=args.num_seeds,
                         backbone=args.backbone, checkpoint=args.checkpoint, data_root=args.data_root,
                         sets=args.sets, verify_data=getattr(args, "verify_data", True),
                         overrides={k: v for k, v in overrides.items() if v is not None},
                         precision=getattr(args, "precision", None), device=device)


def register(sub) -> None:
    p = sub.add_parser("run", help="run a sweep: methods × tasks under a protocol",
                       description="Run methods × tasks. Finished runs are skipped, unfinished ones resume.")
    add_sweep_arguments(p)
    p.add_argument("--runs-dir", default="runs", help="where run records go (default ./runs)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the runs the sweep needs and their estimated GPU-hours, run nothing")
    p.add_argument("--bench-table", help="bench CSV for --dry-run estimates (default: the table shipped with "
                                         "peftbench for the backbone, CUDA first: peftbench/bench/tables/)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    from ..executors import EXECUTORS

    p.add_argument("--executor", choices=EXECUTORS.names(), default="local",
                   help="where runs happen: " + "; ".join(f"{n}: {e.description}" for n, e in EXECUTORS.items()))
    for _, plugin in EXECUTORS.items():
        plugin.add_arguments(p)
    p.set_defaults(func=main)


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def main(args) -> int:
    from ..bench.estimate import print_plan
    from ..executors import EXECUTORS
    from ..results.write import write_leaderboard
    from ..store import RunStore
    from ..sweep.drive import count_runs, drive, print_summary, summary_rows
    from ..sweep.plan import plan
    from ..train.env import Env

    t0 = time.time()
    device = _device(args)
    settings = settings_from_args(args, device)
    chosen = EXECUTORS.get(args.executor)
    for name, plugin in EXECUTORS.items():  # another executor's flags are a mistake, reported before planning
        given = plugin.given_flags(args) if plugin is not chosen else []
        if given:
            from ..errors import SettingsError

            raise SettingsError(f"{', '.join(given)} only apply with --executor {name}")
    contexts = plan(settings, check_data=not args.dry_run)  # a dry run needs no data and no weights
    specs = count_runs(contexts)
    store = RunStore(args.runs_dir)
    done = sum(store.is_done(s) for s in specs)
    print(f"peftbench: {len(contexts)} method×task pairs, {len(specs)} runs "
          f"({done} done already) under protocol {contexts[0].protocol.name!r}; runs in {Path(args.runs_dir).resolve()}",
          file=sys.stderr)
    if args.dry_run:
        print_plan(specs, contexts, Path(args.bench_table) if args.bench_table else None)
        return 0
    env = Env(device=device, quiet=args.quiet)
    executor = chosen.create(args, env=env, runs_dir=Path(args.runs_dir), total=len(specs))
    try:
        outcomes = drive(contexts, executor, store)
    finally:
        executor.close()
    rows = summary_rows(outcomes)
    print()
    print_summary(rows)
    board = Path(args.runs_dir) / "leaderboard"
    write_leaderboard(args.runs_dir, board, contexts[0].suite.name)
    print(f"\nrun records: {Path(args.runs_dir).resolve()}")
    print(f"leaderboard: {(board / f'{contexts[0].suite.name}-leaderboard.csv').resolve()} "
          f"(report: {contexts[0].suite.name}-report.html beside it)  [{time.time() - t0:.0f} s]")
    return 0 if all(r["error"] is None for r in rows) else 1
