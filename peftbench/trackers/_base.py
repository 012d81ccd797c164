"""What an experiment tracker is, the ``TRACKERS`` registry, and the run hook that feeds the trackers.

A tracker is a :class:`Tracker` subclass registered in :data:`TRACKERS` (built-ins: one module each in
this package; third-party packages declare a ``peftbench.trackers`` entry point). For every peftbench run
that trains, :meth:`Tracker.open` starts one tracker run (named after the run, grouped by the sweep) and
returns a :class:`TrackerRun` that receives every epoch (loss, accuracy, lr) and the final record.

What the trackers of a sweep are travels as plain data, :class:`Tracking` (``Env.tracking``): the local
executor, a SLURM job and a Ray worker make their own :class:`TrackerHooks` from it. It is never part
of a run key: choosing trackers changes no run.

Failures stay the tracker's: a tracker whose library is missing is an error before any compute
(:func:`check_tracking`); a tracker that raises while a run trains is reported once for that run on
stderr and switched off for it; the run goes on and its record is written as always.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from .._io import safe_component
from .._registry import Registry, instance_registry
from ..errors import SettingsError
from ..store import RunRecord, RunSpec


class TrackerRun:
    """One tracker run (one peftbench run): what a tracker receives while the run trains."""

    def epoch(self, entry: dict) -> None:
        """An epoch ended: ``epoch``, ``lr``, ``train_loss`` and ``eval_top1`` when evaluated."""

    def finish(self, record: RunRecord) -> None:
        """The run's final record (status ok, failed or diverged); close the tracker run."""


class Tracker:
    """An experiment tracker plugin."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    # keys of the sweep file's [trackers.<name>] table (and --tracker-set NAME.KEY=VALUE) -> help
    options: ClassVar[dict[str, str]] = {}
    requires: ClassVar[str] = ""  # the module it needs, e.g. "wandb" (checked before any compute)
    extra: ClassVar[str] = ""  # the pip extra that installs it: pip install peftbench[<extra>]

    def check(self, tracking: "Tracking") -> None:
        """Raise :class:`~peftbench.errors.SettingsError` when this tracker cannot work (before compute)."""
        if self.requires:
            import importlib.util

            if importlib.util.find_spec(self.requires) is None:
                raise SettingsError(f"--tracker {self.name}: the {self.requires!r} package is not installed "
                                    f"(pip install 'peftbench[{self.extra or self.requires}]')")

    def open(self, spec: RunSpec, run: "RunInfo", tracking: "Tracking") -> TrackerRun:
        """Start the tracker run of ``spec`` (resume it when the run resumes)."""
        raise NotImplementedError

    def where(self, tracking: "Tracking") -> str:
        """One line for the end of a sweep: where this tracker's runs are (a project, a folder, a URI)."""
        return ""


@dataclass
class RunInfo:
    """What a tracker knows of a run when it starts: names and the config to log."""

    key: str
    name: str  # e.g. "vpt-deep demo_digits final lr=0.01 wd=0.0 seed=42"
    group: str  # the sweep
    config: dict  # the run spec (method, task, options, hparams, seed, ...) as plain data
    tags: dict  # method, task, stage, seed, protocol, suite, backbone, key, sweep
    attempt: int = 1
    resume_epoch: int = 0


@dataclass
class Tracking:
    """The trackers of a sweep, as plain data (it travels to SLURM jobs and Ray workers)."""

    trackers: list[str] = field(default_factory=list)
    sweep: str = "peftbench"  # what tracker runs are grouped by (W&B group, MLflow experiment, TensorBoard folder)
    runs_dir: str = "runs"  # absolute; default places of local tracker files (<runs-dir>/tensorboard, ...)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # tracker -> its settings
    verbose: bool = False  # trackers print their own banners only when the sweep is verbose

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Tracking":
        d = dict(d or {})
        return cls(trackers=list(d.get("trackers") or []), sweep=str(d.get("sweep") or "peftbench"),
                   runs_dir=str(d.get("runs_dir") or "runs"), options={k: dict(v) for k, v in (d.get("options") or {}).items()},
                   verbose=bool(d.get("verbose")))

    def option(self, tracker: str, key: str, default: Any = None) -> Any:
        return (self.options.get(tracker) or {}).get(key, default)


TRACKERS: Registry[Tracker]
TRACKERS, register_tracker = instance_registry("tracker", Tracker, builtin="peftbench.trackers", group="peftbench.trackers")


def check_sweep_name(name: str | None) -> str | None:
    """The sweep's name (``--sweep-name``, a sweep file's ``name``), checked to be one file name: it names
    folders (TensorBoard's ``<dir>/<sweep>/``) and files; a one-line SettingsError otherwise. None and ""
    (a name made from the runs later) pass."""
    if name:
        safe_component(name, "--sweep-name (or the sweep file's name)")
    return name


def check_tracking(tracking: Tracking) -> Tracking:
    """Resolve the tracker names (aliases, spellings), check their settings' keys and that each can work,
    and the sweep's name (:func:`check_sweep_name`); an error names the tracker, the key or --sweep-name,
    before any compute."""
    check_sweep_name(tracking.sweep)
    names = []
    for n in tracking.trackers:
        name = TRACKERS.canonical(n)
        if name in names:
            raise SettingsError(f"--tracker lists {name!r} twice")
        names.append(name)
    options = {}
    for n, table in tracking.options.items():
        name = TRACKERS.canonical(n)
        if name not in names:  # settings of a tracker that is not used are a mistake, never silently ignored
            raise SettingsError(f"settings of tracker {name!r} given (--tracker-set {name}.KEY=VALUE, [tracking.{name}]), "
                                f"but {name!r} is not among the trackers: add --tracker {name} (trackers = "
                                f"[\"{name}\"] in [tracking]), or leave its settings out")
        known = TRACKERS.get(name).options
        for key in table:
            if key not in known:
                raise SettingsError(f"tracker {name!r} has no setting {key!r} (its settings: "
                                    f"{', '.join(sorted(known)) or 'none'})")
        options[name] = dict(table)
    out = Tracking(names, tracking.sweep, tracking.runs_dir, options)
    for name in names:
        TRACKERS.get(name).check(out)
    return out


def run_info(spec: RunSpec, tracking: Tracking, info: dict) -> RunInfo:
    tags = {"sweep": tracking.sweep, "key": spec.key, "method": spec.method, "config": spec.config or spec.method,
            "task": spec.task, "suite": spec.suite, "protocol": spec.protocol, "stage": spec.stage,
            "seed": str(spec.seed), "backbone": spec.backbone}
    config = {k: v for k, v in spec.to_dict().items() if k not in ("data_root", "checkpoint")}
    config["key"] = spec.key
    return RunInfo(key=spec.key, name=spec.label(), group=tracking.sweep, config=config, tags=tags,
                   attempt=int(info.get("attempt") or 1), resume_epoch=int(info.get("resume_epoch") or 0))


class TrackerHooks:
    """The run hook (:class:`peftbench.train.loop.RunHooks`) that feeds every tracker of a sweep.

    One tracker run per peftbench run; a tracker that raises is reported once per run and switched off
    for that run (the others and the run itself go on)."""

    def __init__(self, tracking: Tracking, warn=None):
        self.tracking = tracking
        self.trackers = [(n, TRACKERS.get(n)) for n in tracking.trackers]
        self._open: dict[str, list[tuple[str, TrackerRun]]] = {}
        self._warn = warn or (lambda m: print(m, file=sys.stderr, flush=True))
        self.failures: list[str] = []  # "<tracker> <event> <run key>: <error>" (tests, summaries)

    def _fail(self, name: str, event: str, spec: RunSpec, exc: BaseException) -> None:
        msg = f"{name} {event} {spec.key}: {type(exc).__name__}: {exc}"
        self.failures.append(msg)
        self._warn(f"peftbench: warning: tracker {name!r} failed at {event} of {spec.label()} "
                   f"({type(exc).__name__}: {exc}); it is off for this run, the run goes on")

    def run_start(self, spec: RunSpec, info: dict) -> None:
        self.close(spec)  # a run started again in this process (a retry): its old tracker runs end
        meta = run_info(spec, self.tracking, info)
        opened = []
        for name, tracker in self.trackers:
            try:
                opened.append((name, tracker.open(spec, meta, self.tracking)))
            except Exception as exc:
                self._fail(name, "start", spec, exc)
        self._open[spec.key] = opened

    def epoch(self, spec: RunSpec, entry: dict) -> None:
        runs = self._open.get(spec.key, [])
        for item in list(runs):
            name, run = item
            try:
                run.epoch(dict(entry))
            except Exception as exc:
                self._fail(name, "epoch", spec, exc)
                runs.remove(item)

    def run_end(self, spec: RunSpec, record: RunRecord) -> None:
        for name, run in self._open.pop(spec.key, []):
            try:
                run.finish(record)
            except Exception as exc:
                self._fail(name, "finish", spec, exc)

    def close(self, spec: RunSpec | None = None) -> None:
        """End tracker runs left open (a run interrupted in this process), without a final record."""
        keys = [spec.key] if spec is not None else list(self._open)
        for key in keys:
            for name, run in self._open.pop(key, []):
                try:
                    close = getattr(run, "close", None)
                    if close is not None:
                        close()
                except Exception:
                    pass


def where_lines(tracking: Tracking) -> list[str]:
    """The trackers' one line each saying where the sweep's runs are (printed once at the end of ``run``)."""
    out = []
    for name in tracking.trackers:
        try:
            line = TRACKERS.get(name).where(tracking)
        except Exception:  # noqa: BLE001 - a tracker's report never fails the sweep's summary
            line = ""
        if line:
            out.append(f"{name}: {line}")
    return out


def hooks_for(tracking: dict | Tracking | None) -> list:
    """The run hooks of ``tracking`` (plain data from ``Env.tracking``): ``[]`` when it names no tracker."""
    t = tracking if isinstance(tracking, Tracking) else Tracking.from_dict(tracking)
    return [TrackerHooks(t)] if t.trackers else []


def final_numbers(record) -> tuple[dict, dict]:
    """(hyper-parameters, metrics) of a finished run for a tracker's summary of it: the configuration, the base lr
    and the effective one (× batch / 256 where the recipe scales it), weight decay, batch, epochs; the top-1 and the
    parameter counts."""
    spec, hp = record.spec, (record.spec.get("hparams") or {})
    params, eff = record.params or {}, record.hparams_effective or {}
    hparams = {"method": str(spec.get("method")), "config": str(spec.get("config") or spec.get("method")),
               "task": str(spec.get("task")), "stage": str(spec.get("stage")), "seed": int(spec.get("seed") or 0),
               "lr": float(hp.get("lr", 0.0)), "lr_effective": float(eff.get("lr", hp.get("lr", 0.0))),
               "wd": float(hp.get("wd", 0.0)), "batch_size": int(hp.get("batch_size", 0)),
               "epochs": int(hp.get("epochs", 0))}
    metrics = {k: float(v) for k, v in (("top1", record.top1), ("params/trainable", params.get("trainable")),
                                         ("params/tuned", params.get("tuned")),
                                         ("params/tuned_total_pct", params.get("tuned_total_pct"))) if v is not None}
    return hparams, metrics

