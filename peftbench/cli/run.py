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
    p.add_argument("--save-weights", choices=("final", "all", "none"), default="final",
                   help="keep the trained tensors beside the record (<key>.final.safetensors, for `peftbench "
                        "export`): of the runs evaluated on the final split (default), of all runs, or none. "
                        "Not part of the run key")
    p.add_argument("--fuse", type=int, default=1, metavar="K",
                   help="train up to K runs of one method on one task that differ only in lr / wd together, as one "
                        "model (frozen backbone once, the K sets of trained tensors stacked; methods that cannot fuse "
                        "run alone; docs/fused.md). Each run keeps its own record; not part of the run key")
    p.add_argument("--rerun-stale", action="store_true",
                   help="rerun finished runs whose records were produced by other code (the old records are kept "
                        "as <key>.stale.json)")
    from ..executors import EXECUTORS

    p.add_argument("--executor", choices=EXECUTORS.names(), default="local",
                   help="where runs happen: " + "; ".join(f"{n}: {e.description}" for n, e in EXECUTORS.items()))
    for _, plugin in EXECUTORS.items():
        plugin.add_arguments(p)
    p.set_defaults(func=main)


def check_device(device: str | None, flag: str = "--device") -> str:
    """The device to use (default: cuda when available); a device this machine lacks is an error."""
    import torch

    from ..errors import SettingsError

    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SettingsError(f"{flag} {device!r}: not a device (cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(f"{flag} {device}: no CUDA device on this machine (torch.cuda.is_available() "
                                "is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SettingsError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise SettingsError(f"{flag} {device}: peftbench trains on cpu or cuda")
    return device


def check_runs_dir(path: str) -> Path:
    """A folder the run records can be written to (created if needed)."""
    import tempfile

    from ..errors import SettingsError

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SettingsError(f"--runs-dir {path}: is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".peftbench-write-test-"):
            pass
    except OSError as exc:
        raise SettingsError(f"--runs-dir {path}: cannot write there ({exc.strerror or exc})") from None
    return p


def main(args) -> int:
    from ..bench.estimate import print_plan
    from ..executors import EXECUTORS
    from ..results.write import write_leaderboard
    from ..store import RunStore
    from ..store.journal import Journal
    from ..sweep import freshness
    from ..sweep.drive import count_runs, drive, print_summary, summary_rows
    from ..sweep.plan import plan
    from ..train.env import Env
    from ..train.hparams import parse_hparams

    t0 = time.time()
    if args.fuse < 1:
        from ..errors import SettingsError

        raise SettingsError(f"--fuse {args.fuse}: must be at least 1 (1: no fusing)")
    device = check_device(args.device)
    settings = settings_from_args(args, device)
    chosen = EXECUTORS.get(args.executor)
    for name, plugin in EXECUTORS.items():  # another executor's flags are a mistake, reported before planning
        given = plugin.given_flags(args) if plugin is not chosen else []
        if given:
            from ..errors import SettingsError

            raise SettingsError(f"{', '.join(given)} only apply with --executor {name}")
    contexts = plan(settings, check_data=not args.dry_run)  # a dry run needs no data and no weights
    specs = count_runs(contexts)
    for spec in specs:  # every run's hyper-parameters, typed and checked before anything runs
        if spec.job == "train":
            parse_hparams(spec.hparams, where=spec.label())
    if not args.dry_run:
        check_runs_dir(args.runs_dir)
    store = RunStore(args.runs_dir)
    fresh = freshness.check(specs, store)
    for line in fresh.lines():
        print(f"peftbench: warning: {line}", file=sys.stderr)
    if args.rerun_stale and fresh.stale:
        n = freshness.set_aside([s for ss in fresh.stale.values() for s in ss], store)
        fresh.done -= n
        print(f"peftbench: --rerun-stale: {n} stale record(s) set aside as <key>.stale.json; they run again",
              file=sys.stderr)
    print(f"peftbench: {len(contexts)} method×task pairs, {len(specs)} runs ({fresh.done} done already) under "
          f"protocol {contexts[0].protocol.name!r}; runs in {Path(args.runs_dir).resolve()}", file=sys.stderr)
    if args.fuse > 1:
        from ..train.fused import plan_groups

        groups = plan_groups(specs, args.fuse)
        fused = [g for g in groups if len(g) > 1]
        print(f"peftbench: --fuse {args.fuse}: {sum(map(len, fused))} of the {len(specs)} runs train in {len(fused)} "
              f"fused group(s), {len(groups) - len(fused)} alone", file=sys.stderr)
    if args.dry_run:
        done = {s.key for s in specs if store.is_done(s)}
        print_plan(specs, contexts, Path(args.bench_table) if args.bench_table else None, done)
        return 0
    env = Env(device=device, quiet=args.quiet, save_weights=args.save_weights, fuse=args.fuse)
    executor = chosen.create(args, env=env, runs_dir=Path(args.runs_dir), total=len(specs))
    journal = Journal(args.runs_dir)
    try:
        outcomes = drive(contexts, executor, store, journal)
    finally:
        executor.close()
        journal.close()
    rows = summary_rows(outcomes)
    print()
    print_summary(rows)
    board = Path(args.runs_dir) / "leaderboard"
    write_leaderboard(args.runs_dir, board, contexts[0].suite.name)
    print(f"\nrun records: {Path(args.runs_dir).resolve()}")
    print(f"leaderboard: {(board / f'{contexts[0].suite.name}-leaderboard.csv').resolve()} "
          f"(report: {contexts[0].suite.name}-report.html beside it)  [{time.time() - t0:.0f} s]")
    failed, diverged = sum(o.failed for o in outcomes), sum(o.diverged for o in outcomes)
    stopped = [r for r in rows if r["error"]]
    if failed or diverged or stopped:
        print(f"peftbench: {failed} run(s) failed, {diverged} diverged"
              + (f", {len(stopped)} method×task pipeline(s) could not finish" if stopped else "")
              + " (their records say why; `peftbench status` lists them)", file=sys.stderr)
        return 1
    return 0
