"""Sweeps from Python: :class:`Sweep` (everything a sweep is), :func:`plan_sweep` (every input checked,
every run listed, nothing trained) and :func:`run_sweep` (the runs, through an executor, with
trackers). ``peftbench run`` is this module behind a command line (docs/api.md)."""
from __future__ import annotations

import hashlib
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import PeftbenchError, SettingsError, StoreError
from .schema import Sweep
from .sweepfile import dump_sweep, locate, merged_options

# ---------------------------------------------------------------------------------------------
# checks of where a sweep runs
# ---------------------------------------------------------------------------------------------


def check_requirements(executor, trackers) -> None:
    """One error naming every package the sweep's executor and trackers need and this environment lacks, with the
    one pip command that installs them all (not one at a time, and before the data check or any folder is made)."""
    import importlib.util

    from ..trackers import TRACKERS

    wanted = [(f"--executor {executor.name}", executor.requires, executor.extra)]
    for name in trackers:
        t = TRACKERS.get(name)
        wanted.append((f"--tracker {t.name}", t.requires, t.extra or t.requires))
    missing = [(who, module, extra) for who, module, extra in wanted if module and importlib.util.find_spec(module) is None]
    if missing:
        extras = ",".join(dict.fromkeys(extra for _, _, extra in missing))
        raise SettingsError("missing packages: " + "; ".join(f"{who} needs {module!r}" for who, module, _ in missing)
                            + f" (pip install 'peftbench[{extras}]')")


def check_device(device: str | None, flag: str = "--device") -> str:
    """The device to use (default: cuda when available); a device this machine lacks is an error."""
    from ..train.env import check_device as check  # (imports torch: only when a sweep is planned)

    return check(device, flag)


def check_runs_dir(path: str | Path) -> Path:
    """A folder the run records can be written to (created if needed)."""
    import tempfile

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


# ---------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """A planned sweep: every run it needs (stages that depend on results are planned with placeholder
    selections), which are done already, and the resolved sweep (what ``<runs-dir>/sweeps/<name>.toml``
    holds). ``table()`` lists the runs as a DataFrame."""

    sweep: Sweep  # resolved: canonical names, seeds, protocol, backbone, precision, absolute paths
    contexts: list  # peftbench.sweep.protocols.PlanContext, one per (method, task)
    runs: list  # peftbench.store.RunSpec
    done: set[str]  # keys of the runs already finished in the store
    executor_settings: dict
    tracking: Any  # peftbench.trackers.Tracking
    device: str
    stale: Any = None  # peftbench.sweep.freshness.Freshness
    notes: list[str] = field(default_factory=list)  # warnings about the plan itself (e.g. workers sharing a device)

    @property
    def protocol(self) -> str:
        return self.contexts[0].protocol.name

    @property
    def suite(self) -> str:
        return self.contexts[0].suite.name

    def warnings(self) -> list[str]:
        """Lines about the plan (workers that share a device) and about finished runs whose records other code
        produced (stale results)."""
        return list(self.notes) + (list(self.stale.lines()) if self.stale is not None else [])

    def table(self):
        import pandas as pd

        return pd.DataFrame([{"key": s.key, "method": s.method, "config": s.config, "task": s.task, "stage": s.stage,
                              "job": s.job, "seed": s.seed, "lr": s.hparams.get("lr"), "wd": s.hparams.get("wd"),
                              "epochs": s.hparams.get("epochs"), "done": s.key in self.done} for s in self.runs])

    def __repr__(self) -> str:
        return (f"Plan({self.sweep.name!r}: {len(self.contexts)} method×task pairs, {len(self.runs)} runs, "
                f"{len(self.done)} done, protocol {self.protocol!r}, executor {self.sweep.executor!r})")


def plan_sweep(sweep: Sweep, *, check_data: bool = True) -> Plan:
    """Check every input of ``sweep`` (names, options, numbers, the backbone, the data unless
    ``check_data`` is False, the executor's and the trackers' settings) and list its runs; nothing
    trains and nothing is written."""
    from ..executors import EXECUTORS
    from ..methods import get_method
    from ..store import RunStore
    from ..sweep import freshness
    from ..sweep.drive import count_runs
    from ..sweep.plan import plan
    from ..tasks import get_suite
    from ..trackers import Tracking, check_tracking
    from ..train.hparams import parse_hparams

    if not isinstance(sweep, Sweep):
        raise SettingsError(f"plan_sweep: expected a peftbench.Sweep, got {type(sweep).__name__}")
    if not sweep.methods:
        raise SettingsError("--methods names no method (give --methods, or `methods` in the sweep file; "
                            "peftbench list methods)")
    plugin = EXECUTORS.get(sweep.executor)
    executor_name = EXECUTORS.canonical(sweep.executor)
    check_requirements(plugin, sweep.trackers)  # every missing package at once, before anything is planned
    for other in sweep.executor_settings:  # settings of another executor are a mistake
        if EXECUTORS.canonical(other) != executor_name:
            raise SettingsError(f"settings of executor {other!r} given, but the executor is {executor_name!r}")
    table = next((v for k, v in sweep.executor_settings.items() if EXECUTORS.canonical(k) == executor_name), {})
    where = _where(sweep, ("executor", executor_name))
    executor_settings = plugin.configure(dict(table), sweep.generic_executor_settings(), where)
    if sweep.device and "device" in plugin.settings:  # where the runs train (a job's, a Ray task's device)
        executor_settings["device"] = sweep.device
    if sweep.fuse > 1 and not plugin.fuses:
        raise SettingsError(f"--fuse {sweep.fuse}: executor {executor_name!r} trains runs one at a time (fused groups: "
                            f"{', '.join(n for n, e in EXECUTORS.items() if e.fuses)})")
    devices = executor_settings.get("devices") if isinstance(executor_settings, dict) else None
    if devices and sweep.device:
        raise SettingsError("device and the local executor's devices: give one of them (devices: one worker per device)")
    device = check_device(sweep.device or (devices[0] if devices else None))  # (the first worker's plans the precision)
    notes = plugin.check_workers(executor_settings, device)  # workers bounded by this machine's cores and devices
    runs_dir = Path(sweep.runs_dir).resolve()
    tracking = check_tracking(Tracking(list(sweep.trackers), sweep.name or "", str(runs_dir),
                                       {k: dict(v) for k, v in sweep.tracker_settings.items()}))
    contexts = plan(sweep, device=device, check_data=check_data)
    specs = count_runs(contexts, limit=sweep.max_runs)
    for spec in specs:  # every run's hyper-parameters, typed and checked before anything runs
        if spec.job == "train":
            parse_hparams(spec.hparams, where=spec.label())
    store = RunStore(runs_dir)
    fresh = freshness.check(specs, store)
    done = {s.key for s in specs if store.is_done(s)}
    ctx = contexts[0]
    name = sweep.name or f"{ctx.suite.name}-{hashlib.sha256(' '.join(sorted({s.key for s in specs})).encode()).hexdigest()[:8]}"
    tracking.sweep = name
    resolved = sweep.replace(
        methods=[get_method(m).name for m in sweep.methods], suite=get_suite(sweep.suite).name,
        tasks=list(dict.fromkeys(c.task.name for c in contexts)), protocol=ctx.protocol.name, seeds=list(ctx.seeds),
        num_seeds=None, backbone=ctx.backbone, checkpoint=ctx.checkpoint, data_root=ctx.data_root,
        # the device and the precision as the user asked (None: this machine's default, so a sweep resolved on a
        # laptop trains on the GPU node's device at its default precision; the plan's own are Plan.device and the
        # runs' keys)
        precision=sweep.precision, runs_dir=str(runs_dir), device=sweep.device, executor=executor_name,
        executor_settings={executor_name: executor_settings} if executor_settings else {},
        trackers=list(tracking.trackers), tracker_settings={k: dict(v) for k, v in tracking.options.items()},
        name=name, options=merged_options(sweep), sets=[], **{k: None for k in sweep.generic_executor_settings()})
    return Plan(resolved, contexts, specs, done, executor_settings, tracking, device, fresh, notes)


def _where(sweep: Sweep, table: tuple[str, ...]) -> Callable[[str], str]:
    if sweep.source:
        return lambda key: locate(sweep.source, (*table, key))
    return lambda key: f"executor setting {key!r}"


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """What :func:`run_sweep` did: the plan, each (method, task) pipeline's outcome, its summary rows."""

    plan: Plan
    outcomes: list  # peftbench.sweep.drive.Outcome
    rows: list[dict]  # one per (method, task): config, task, stage, top1, std, n, tuned_pct, failed, error
    runs_dir: Path
    sweep_file: Path | None
    leaderboard: Path | None
    seconds: float
    leaderboard_error: str | None = None  # why the leaderboard could not be written (the runs are recorded)

    @property
    def failed(self) -> int:
        return sum(o.failed for o in self.outcomes)

    @property
    def diverged(self) -> int:
        return sum(o.diverged for o in self.outcomes)

    @property
    def stopped(self) -> list[dict]:
        """Summary rows of the pipelines that could not finish."""
        return [r for r in self.rows if r["error"]]

    @property
    def ok(self) -> bool:
        return not (self.failed or self.diverged or self.stopped or self.leaderboard_error)

    def __repr__(self) -> str:
        """One line: what ran, how it ended and where the records and the leaderboard are (the plan and the
        outcomes are attributes, the rows are :meth:`summary`)."""
        state = "ok" if self.ok else ", ".join(x for x in (
            f"{self.failed} failed" if self.failed else "", f"{self.diverged} diverged" if self.diverged else "",
            f"{len(self.stopped)} stopped" if self.stopped else "",
            "no leaderboard" if self.leaderboard_error else "") if x)
        return (f"SweepResult({len(self.plan.runs)} runs of {len(self.rows)} method x task pipelines, {state}, "
                f"{self.seconds:.0f} s; runs_dir={str(self.runs_dir)!r}, leaderboard="
                f"{str(self.leaderboard) if self.leaderboard else None!r})")

    def summary(self):
        """The summary rows as a DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def runs(self):
        """This sweep's run records as a DataFrame (:func:`peftbench.load_runs`, only this sweep's runs)."""
        from .runs import load_runs

        df = load_runs(self.runs_dir, warn=lambda m: None)
        keys = {s.key for s in self.plan.runs}
        return df[df["key"].isin(keys)].reset_index(drop=True) if len(df) else df


def write_resolved(plan: Plan, argv: list[str] | None = None) -> Path:
    """``<runs-dir>/sweeps/<name>.toml``: the resolved sweep; ``peftbench run --config`` on it runs the same
    runs (the same keys)."""
    from .._io import atomic_write_text
    from .._version import __version__

    path = Path(plan.sweep.runs_dir) / "sweeps" / f"{_safe(plan.sweep.name)}.toml"
    cmd = ("peftbench " + " ".join(shlex.quote(a) for a in argv[1:])) if argv else "peftbench.run_sweep(...)"
    header = (f"# The resolved sweep {plan.sweep.name!r}: {len(plan.contexts)} method×task pairs, {len(plan.runs)} runs\n"
              f"# written by peftbench {__version__} for: {cmd}\n"
              f"# run it again exactly: peftbench run --config {path}\n")
    try:
        atomic_write_text(path, dump_sweep(plan.sweep, header), fsync=False)
    except OSError as exc:  # a full disk, a read-only store: one line naming the file, before any run starts
        raise StoreError(f"cannot write the resolved sweep file {path}: {exc.strerror or exc}") from None
    return path


def _estimates(specs, contexts, device: str, bench_table: str | Path | None) -> dict[str, float] | None:
    """Per run key: seconds from the bench table of this device type (the ETA's prior), None without one."""
    from ..bench.estimate import TABLES, estimate_each
    from ..bench.speed import read_table, table_path

    if bench_table:
        path = Path(bench_table)
    else:
        backbone = contexts[0].backbone
        path = next((p for p in (table_path(TABLES, device, backbone), table_path(TABLES, device, backbone.split(".")[0]))
                     if p.is_file()), None)
    if path is None or not path.is_file():
        return None
    try:
        return estimate_each(specs, contexts, read_table(path))[0]
    except (OSError, KeyError, ValueError):
        return None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "sweep"


def run_sweep(sweep: Sweep | Plan, *, dry_run: bool = False, rerun_stale: bool = False, quiet: bool = False,
              verbose: bool = False, bench_table: str | Path | None = None, leaderboard: bool = True,
              argv: list[str] | None = None, hooks: list | None = None,
              log: Callable[[str], None] | None = None) -> SweepResult | Plan:
    """Run a sweep (a :class:`Sweep`, or the :class:`Plan` of one): finished runs are skipped, unfinished
    ones resume. Writes the resolved sweep to ``<runs-dir>/sweeps/<name>.toml`` and the leaderboard to
    ``<runs-dir>/leaderboard`` (``leaderboard=False``: not). ``dry_run``: only plan (returns the Plan).
    ``hooks``: extra run hooks (:class:`peftbench.train.loop.RunHooks`) of this process. ``quiet`` /
    ``verbose``: no progress output / also a line per epoch (default: a bar with the sweep's ETA on a
    terminal, a line per run in a file; ETA priors from ``bench_table`` or the shipped bench table). How runs
    execute (executor, ``fuse``, ``save_weights``, ...) is part of the :class:`Sweep`."""
    from ..executors import EXECUTORS
    from ..store import RunStore
    from ..store.journal import Journal
    from ..sweep import freshness
    from ..sweep.drive import drive, summary_rows
    from ..sweep.progress import SweepProgress
    from ..trackers import hooks_for
    from ..train.env import Env

    if quiet and verbose:
        raise SettingsError("quiet and verbose: choose one")
    if not isinstance(sweep, (Sweep, Plan)):
        raise SettingsError(f"run_sweep: expected a peftbench.Sweep or a Plan, got {type(sweep).__name__}")
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    t0 = time.time()
    p = sweep if isinstance(sweep, Plan) else plan_sweep(sweep, check_data=not dry_run)
    if dry_run:
        return p
    runs_dir = check_runs_dir(p.sweep.runs_dir)
    store = RunStore(runs_dir)
    if not isinstance(sweep, Plan):
        for line in p.warnings():
            say(f"peftbench: warning: {line}")
    if rerun_stale and p.stale is not None and p.stale.stale:
        stale = [s for ss in p.stale.stale.values() for s in ss]
        n = freshness.set_aside(stale, store)
        p.done -= {s.key for s in stale}
        p.stale.done -= n
        say(f"peftbench: --rerun-stale: {n} stale record(s) set aside as <key>.stale.json; they run again")
    sweep_file = write_resolved(p, argv)
    progress = SweepProgress(p.runs, estimates=_estimates(p.runs, p.contexts, p.device, bench_table),
                             mode="quiet" if quiet else "auto", verbose=verbose)
    p.tracking.verbose = bool(verbose)
    env = Env(device=p.device, quiet=quiet, tracking=p.tracking.to_dict() if p.tracking.trackers else None,
              hooks=hooks_for(p.tracking) + list(hooks or []), progress=progress, save_weights=p.sweep.save_weights,
              fuse=p.sweep.fuse)
    env.hooks.append(progress)  # its epoch(spec, entry): the per-epoch view
    executor = EXECUTORS.get(p.sweep.executor).make(p.executor_settings, env=env, runs_dir=runs_dir,
                                                    total=len(p.runs))
    journal = Journal(runs_dir, argv=argv)
    try:
        outcomes = drive(p.contexts, executor, store, journal)
    finally:
        progress.close()
        executor.close()
        journal.close()
        for h in env.hooks:
            close = getattr(h, "close", None)
            if close is not None:
                close()
    board, board_error = None, None
    if leaderboard:
        from ..results.write import write_leaderboard

        folder = runs_dir / "leaderboard"
        try:  # the runs are recorded whatever happens here: a failed write (a full disk) is reported, not raised
            # the store's own folder (its stamp always says ".."): force, or drivers finishing together race on the stamp
            write_leaderboard(runs_dir, folder, p.suite, force=True)
            board = folder / f"{p.suite}-leaderboard.csv"
        except PeftbenchError as exc:
            board_error = f"{exc} (the run records are kept; `peftbench leaderboard --runs-dir {runs_dir}` writes it again)"
            say(f"peftbench: error: {board_error}")
    return SweepResult(p, outcomes, summary_rows(outcomes), runs_dir, sweep_file, board, time.time() - t0, board_error)
