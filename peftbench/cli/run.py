"""``peftbench run``: a sweep of methods × tasks under a protocol; the command line of
:func:`peftbench.run_sweep` (docs/api.md). ``--config sweep.toml`` reads a sweep file
(docs/sweep-files.md); flags given on the command line override the file's values."""
from __future__ import annotations

import argparse
import sys
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
    """The arguments that define a sweep. Their defaults are None: a flag that is not given leaves the
    sweep file's value (or the default of :class:`peftbench.Sweep`)."""
    p.add_argument("--config", metavar="SWEEP.toml",
                   help="a sweep file (docs/sweep-files.md); flags given here override its values")
    p.add_argument("--methods", type=_names, help="comma-separated method names (peftbench list methods)")
    p.add_argument("--suite", help="task suite: demo (default, offline), vtab, fgvc")
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
    p.add_argument("--search", choices=("grid", "halving"), default=None,
                   help="how a search stage picks its lr x wd point: grid (default, the papers' protocol: every point "
                        "trains every epoch) or halving (successive halving on the same schedule; docs/sweeps.md)")
    p.add_argument("--halving-rungs", type=_floats, metavar="F1,F2,...,1",
                   help="--search halving: the rungs as fractions of the epochs, increasing, the last 1 "
                        "(default 0.1,0.33,1)")
    p.add_argument("--halving-factor", type=float, metavar="ETA",
                   help="--search halving: keep the best 1/ETA of the configurations after each rung (default 3)")
    p.add_argument("--precision", choices=("fp32", "tf32", "bf16", "fp16"),
                   help="numeric precision of training and evaluation (part of the run key; default: the "
                        "protocol's: fp32 for vpt, bf16 on CUDA for fixed and demo, fp32 on CPU)")
    p.add_argument("--no-verify-data", dest="verify_data", action="store_const", const=False, default=None,
                   help="do not verify the data (split sizes, classes, every image decodes) before the sweep")


def sweep_from_args(args):
    """The :class:`peftbench.Sweep` of the command line: the ``--config`` file's, with every flag that was
    given over it."""
    from ..api import Sweep, load_sweep

    sweep = load_sweep(args.config) if getattr(args, "config", None) else Sweep()
    changes = {}
    for field in ("methods", "suite", "tasks", "protocol", "backbone", "checkpoint", "data_root", "precision",
                  "runs_dir", "device", "verify_data"):
        value = getattr(args, field, None)
        if value is not None:
            changes[field] = list(value) if isinstance(value, tuple) else value
    if "methods" in changes and sweep.options:  # --methods narrows the file's: its options of other methods go
        from ..methods import get_method

        chosen = [get_method(m) for m in changes["methods"]]
        names = {m.name for m in chosen}
        options = {}
        for scope, table in sweep.options.items():
            if scope == "*":
                table = {k: v for k, v in table.items() if any(k in m.options for m in chosen)}
            elif scope not in names:
                continue
            if table:
                options[scope] = dict(table)
        changes["options"] = options
    if getattr(args, "seeds", None):
        changes.update(seeds=list(args.seeds), num_seeds=None)
    if getattr(args, "num_seeds", None) is not None:
        changes.update(num_seeds=args.num_seeds, seeds=None if not getattr(args, "seeds", None) else list(args.seeds))
    search = dict(sweep.search)
    for flag, key in (("lr", "lr"), ("wd", "wd"), ("epochs", "epochs"), ("batch_size", "batch_size"),
                      ("search", "kind"), ("halving_rungs", "halving_rungs"), ("halving_factor", "halving_factor")):
        value = getattr(args, flag, None)
        if value is not None:
            search[key] = list(value) if isinstance(value, tuple) else value
    changes["search"] = search
    changes["sets"] = list(sweep.sets) + list(getattr(args, "sets", None) or [])
    if getattr(args, "executor", None):
        changes["executor"] = args.executor
        if args.executor != sweep.executor:
            changes["executor_settings"] = {}  # the file's settings are another executor's
    if getattr(args, "tracker", None) is not None:
        changes["trackers"] = list(args.tracker)
    settings = {k: dict(v) for k, v in sweep.tracker_settings.items()}
    for item in getattr(args, "tracker_set", None) or []:
        from ..errors import SettingsError

        key, sep, raw = item.partition("=")
        name, dot, opt = key.strip().partition(".")
        if not sep or not dot:
            raise SettingsError(f"--tracker-set {item!r}: expected TRACKER.KEY=VALUE, e.g. wandb.project=vit-peft")
        settings.setdefault(name, {})[opt] = _toml_value(raw.strip())
    changes["tracker_settings"] = settings
    if getattr(args, "sweep_name", None):
        changes["name"] = args.sweep_name
    return sweep.replace(**changes)


def _toml_value(raw: str):
    """A TOML literal (10, 2.5, true, "x", ["a"]); anything else is a plain string."""
    from ..api.sweepfile import _tomllib

    tomllib = _tomllib()
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def settings_from_args(args, device: str = "cpu"):
    """The :class:`peftbench.sweep.plan.SweepSettings` of the command line (``--config`` included)."""
    return sweep_from_args(args).settings(device)


def register(sub) -> None:
    p = sub.add_parser("run", help="run a sweep: methods × tasks under a protocol",
                       description="Run methods × tasks. Finished runs are skipped, unfinished ones resume. "
                                   "The resolved sweep is written to <runs-dir>/sweeps/<name>.toml "
                                   "(run it again exactly with --config).")
    add_sweep_arguments(p)
    p.add_argument("--runs-dir", help="where run records go (default ./runs)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--sweep-name", help="the sweep's name: groups its tracker runs and names "
                                        "<runs-dir>/sweeps/<name>.toml (default: the sweep file's name, else "
                                        "<suite>-<hash of its runs>)")
    p.add_argument("--tracker", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                   help="experiment trackers, comma-separated: tensorboard, wandb, mlflow (peftbench list trackers; "
                        "docs/trackers.md)")
    p.add_argument("--tracker-set", action="append", default=[], metavar="TRACKER.KEY=VALUE",
                   help="a tracker setting, e.g. --tracker-set wandb.project=vit-peft (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the runs the sweep needs and their estimated GPU-hours, run nothing")
    p.add_argument("--bench-table", help="bench CSV for --dry-run estimates (default: the table shipped with "
                                         "peftbench for the backbone, CUDA first: peftbench/bench/tables/)")
    p.add_argument("--save-weights", choices=("final", "all", "none"), default="final",
                   help="keep the trained tensors beside the record (<key>.final.safetensors, for `peftbench "
                        "export`): of the runs evaluated on the final split (default), of all runs, or none. "
                        "Not part of the run key")
    p.add_argument("--quiet", action="store_true",
                   help="no progress output (no bar, no per-run lines): warnings, errors and the final summary only")
    p.add_argument("--verbose", action="store_true",
                   help="also a line per epoch (and per run found done already); default: a live bar with the "
                        "sweep's ETA on a terminal, one line per finished run plus a status line every minute in a file")
    p.add_argument("--fuse", type=int, default=1, metavar="K",
                   help="train up to K runs of one method on one task that differ only in lr / wd together, as one "
                        "model (frozen backbone once, the K sets of trained tensors stacked; methods that cannot fuse "
                        "run alone; docs/fused.md). Each run keeps its own record; not part of the run key")
    p.add_argument("--rerun-stale", action="store_true",
                   help="rerun finished runs whose records were produced by other code (the old records are kept "
                        "as <key>.stale.json)")
    from ..executors import EXECUTORS

    p.add_argument("--executor", choices=EXECUTORS.names(), default=None,
                   help="where runs happen (default local): "
                        + "; ".join(f"{n}: {e.description}" for n, e in EXECUTORS.items()))
    for _, plugin in EXECUTORS.items():
        plugin.add_arguments(p)
    p.set_defaults(func=main)


def check_device(device: str | None, flag: str = "--device") -> str:
    from ..api import check_device as check

    return check(device, flag)


def check_runs_dir(path: str) -> Path:
    from ..api import check_runs_dir as check

    return check(path)


def main(args) -> int:
    from ..api import plan_sweep, run_sweep
    from ..bench.estimate import print_costs, print_plan
    from ..errors import SettingsError
    from ..executors import EXECUTORS
    from ..sweep.drive import print_summary

    if args.quiet and args.verbose:
        raise SettingsError("--quiet and --verbose: choose one")
    if args.fuse < 1:
        raise SettingsError(f"--fuse {args.fuse}: must be at least 1 (1: no fusing)")
    sweep = sweep_from_args(args)
    chosen = EXECUTORS.get(sweep.executor)
    for name, plugin in EXECUTORS.items():  # another executor's flags are a mistake, reported before planning
        given = plugin.given_flags(args) if plugin is not chosen else []
        if given:
            raise SettingsError(f"{', '.join(given)} only apply with --executor {name}")
    if args.fuse > 1 and not chosen.fuses:
        raise SettingsError(f"--fuse {args.fuse}: executor {chosen.name!r} trains runs one at a time (fused groups: "
                            f"{', '.join(n for n, e in EXECUTORS.items() if e.fuses)})")
    plan = plan_sweep(sweep, check_data=not args.dry_run, args=args)  # a dry run needs no data and no weights
    for line in plan.warnings():
        print(f"peftbench: warning: {line}", file=sys.stderr)
    stale = sum(len(v) for v in plan.stale.stale.values()) if args.rerun_stale and plan.stale else 0
    print(f"peftbench: {len(plan.contexts)} method×task pairs, {len(plan.runs)} runs ({plan.stale.done - stale} done "
          f"already) under protocol {plan.protocol!r}; runs in {plan.sweep.runs_dir}", file=sys.stderr)
    if args.fuse > 1:
        from ..train.fused import plan_groups

        groups = plan_groups(plan.runs, args.fuse)
        fused = [g for g in groups if len(g) > 1]
        print(f"peftbench: --fuse {args.fuse}: {sum(map(len, fused))} of the {len(plan.runs)} runs train in "
              f"{len(fused)} fused group(s), {len(groups) - len(fused)} alone", file=sys.stderr)
    if args.dry_run:
        table = Path(args.bench_table) if args.bench_table else None
        print_plan(plan.runs, plan.contexts, table, plan.done)
        print_costs(plan.contexts, table, plan.done, fuse=getattr(args, "fuse", None))
        return 0
    result = run_sweep(plan, rerun_stale=args.rerun_stale, quiet=args.quiet, verbose=args.verbose,
                       save_weights=args.save_weights, fuse=args.fuse,
                       bench_table=args.bench_table, args=args, argv=list(sys.argv))
    print()
    print_summary(result.rows)
    print(f"\nrun records: {result.runs_dir}")
    print(f"sweep file:  {result.sweep_file} (peftbench run --config {result.sweep_file} runs it again)")
    print(f"leaderboard: {result.leaderboard} (report: {plan.suite}-report.html beside it)  [{result.seconds:.0f} s]")
    if not result.ok:
        print(f"peftbench: {result.failed} run(s) failed, {result.diverged} diverged"
              + (f", {len(result.stopped)} method×task pipeline(s) could not finish" if result.stopped else "")
              + " (their records say why; `peftbench status` lists them)", file=sys.stderr)
        return 1
    return 0
