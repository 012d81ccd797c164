"""``peftbench run``: a sweep of methods × tasks under a protocol; the command line of
:func:`peftbench.run_sweep` (docs/api.md). Its flags are derived from the sweep's declaration
(:mod:`peftbench.api.schema`); ``--config sweep.toml`` reads a sweep file (docs/sweep-files.md) and flags
given on the command line override the file's values."""
from __future__ import annotations

import sys
from pathlib import Path


def sweep_from_args(args):
    """The :class:`peftbench.Sweep` of the command line: the ``--config`` file's, with every flag that was
    given over it."""
    from ..api import load_sweep
    from ..api.schema import from_args

    base = load_sweep(args.config) if getattr(args, "config", None) else None
    return from_args(args, base)


def register(sub) -> None:
    from ..api import schema

    p = sub.add_parser("run", help="run a sweep: methods × tasks under a protocol",
                       description="Run methods × tasks. Finished runs are skipped, unfinished ones resume. "
                                   "The resolved sweep is written to <runs-dir>/sweeps/<name>.toml "
                                   "(run it again exactly with --config). Every sweep setting is a key of a "
                                   "sweep file too (docs/sweep-files.md).")
    p.add_argument("--config", metavar="SWEEP.toml",
                   help="a sweep file (docs/sweep-files.md); flags given here override its values")
    schema.add_arguments(p)
    g = p.add_argument_group("this invocation")
    g.add_argument("--dry-run", action="store_true",
                   help="print the runs the sweep needs and their estimated GPU-hours, run nothing")
    g.add_argument("--bench-table", help="bench CSV for --dry-run estimates and the ETA (default: the table shipped "
                                         "with peftbench for the backbone, CUDA first: peftbench/bench/tables/)")
    g.add_argument("--rerun-stale", action="store_true",
                   help="rerun finished runs whose records were produced by other code (the old records are kept "
                        "as <key>.stale.json)")
    g.add_argument("--quiet", action="store_true",
                   help="no progress output (no bar, no per-run lines): warnings, errors and the final summary only")
    g.add_argument("--verbose", action="store_true",
                   help="also a line per epoch (and per run found done already); default: a live bar with the "
                        "sweep's ETA on a terminal, one line per finished run plus a status line every minute in a file")
    p.set_defaults(func=main)


def check_device(device: str | None, flag: str = "--device") -> str:
    from ..api import check_device as check

    return check(device, flag)


def check_runs_dir(path: str) -> Path:
    from ..api import check_runs_dir as check

    return check(path)


def compare_protocols(plan, table: Path | None) -> None:
    """A dry run under a protocol other than the suite's own: the same sweep's runs and device-hours under the
    suite's protocol too, side by side (what a paper's recipe costs against the unified protocol)."""
    import dataclasses

    from ..api import plan_sweep
    from ..bench.estimate import estimate_seconds, speeds_for
    from ..tasks import get_suite

    unified = get_suite(plan.suite).protocol
    if plan.protocol == unified:
        return
    from ..errors import PeftbenchError

    try:
        other = plan_sweep(dataclasses.replace(plan.sweep, protocol=unified, seeds=None, num_seeds=None,
                                               name=None), check_data=False)
    except PeftbenchError as exc:  # e.g. more runs than this sweep's --max-runs: a comparison is no reason to fail
        print(f"protocols side by side: the suite's protocol {unified!r} cannot plan this sweep ({exc})")
        return
    speeds = speeds_for(plan.contexts[0].backbone, table)
    rows = []
    for p in (plan, other):
        hours = "-" if speeds is None else f"{estimate_seconds(p.runs, p.contexts, speeds.rows)[0] / 3600:.1f}"
        rows.append((p.protocol, len(p.runs), hours))
    print(f"protocols side by side ({', '.join(sorted({c.method.name for c in plan.contexts}))} on "
          f"{len(plan.contexts) // max(1, len({c.method.name for c in plan.contexts}))} task(s); device-hours from "
          f"{speeds.describe() if speeds is not None else 'no bench table'}):")
    for name, runs, hours in rows:
        print(f"  {name:<10} {runs:>7} runs {hours:>10} device-hours")


def main(args) -> int:
    from ..api import plan_sweep, run_sweep
    from ..bench.estimate import print_costs, print_plan
    from ..errors import SettingsError
    from ..sweep.drive import print_summary

    if args.quiet and args.verbose:
        raise SettingsError("--quiet and --verbose: choose one")
    sweep = sweep_from_args(args)
    plan = plan_sweep(sweep, check_data=not args.dry_run)  # a dry run needs no data and no weights
    for line in plan.warnings():
        print(f"peftbench: warning: {line}", file=sys.stderr)
    stale = sum(len(v) for v in plan.stale.stale.values()) if args.rerun_stale and plan.stale else 0
    print(f"peftbench: {len(plan.contexts)} method×task pairs, {len(plan.runs)} runs ({plan.stale.done - stale} done "
          f"already) under protocol {plan.protocol!r}; runs in {plan.sweep.runs_dir}", file=sys.stderr)
    fuse = plan.sweep.fuse
    if fuse > 1:
        from ..train.fused import plan_groups

        groups = plan_groups(plan.runs, fuse)
        fused = [g for g in groups if len(g) > 1]
        print(f"peftbench: --fuse {fuse}: {sum(map(len, fused))} of the {len(plan.runs)} runs train in "
              f"{len(fused)} fused group(s), {len(groups) - len(fused)} alone", file=sys.stderr)
    if args.dry_run:
        table = Path(args.bench_table) if args.bench_table else None
        for line in plan.contexts[0].protocol.describe(plan.contexts):
            print(line)
        on_gpu = plan.device.startswith("cuda") or int(plan.executor_settings.get("gpus_per_node") or 0) > 0
        print_plan(plan.runs, plan.contexts, table, plan.done, on_gpu=on_gpu)
        print_costs(plan.contexts, table, plan.done, fuse=fuse)
        compare_protocols(plan, table)
        return 0
    result = run_sweep(plan, rerun_stale=args.rerun_stale, quiet=args.quiet, verbose=args.verbose,
                       bench_table=args.bench_table, argv=list(sys.argv))
    print()
    print_summary(result.rows)
    if result.leaderboard is not None and not args.quiet:
        from ..results.write import leaderboard_tables

        for text in leaderboard_tables(result.runs_dir, "terminal", plan.suite, warn=lambda msg: None).values():
            print("\n" + text, end="")
    print(f"\nrun records: {result.runs_dir}")
    from ..trackers._base import where_lines

    for line in where_lines(plan.tracking):
        print(f"tracker {line}")
    print(f"sweep file:  {result.sweep_file} (peftbench run --config {result.sweep_file} runs it again)")
    if result.leaderboard is not None:
        print(f"leaderboard: {result.leaderboard} (report: {plan.suite}-report.html beside it)  [{result.seconds:.0f} s]")
    else:
        print(f"leaderboard: not written  [{result.seconds:.0f} s]")
    if result.failed or result.diverged or result.stopped:
        print(f"peftbench: {result.failed} run(s) failed, {result.diverged} diverged"
              + (f", {len(result.stopped)} method×task pipeline(s) could not finish" if result.stopped else "")
              + " (their records say why; `peftbench status` lists them)", file=sys.stderr)
        return 1
    if result.leaderboard_error:  # said on stderr by run_sweep, in one line naming the file
        return 2
    return 0
