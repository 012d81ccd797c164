"""A sweep: methods × tasks under one protocol, planned and checked before any compute is spent.

``plan(settings)`` resolves every name, parses every option, checks the backbone checkpoint and
reads every split list (so a bad line or a missing file stops the sweep before the first epoch).
``drive(contexts, executor, store)`` advances all pipelines stage by stage; an executor runs one
stage (a list of specs) and returns their records.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol as TypingProtocol

from .backbone import checkpoint_id, create_backbone, resolve_checkpoint
from .method import METHODS, Method, OptionError, get_method
from .protocols import PipelineError, PlanContext, get_protocol
from .store import RunSpec, RunStore
from .task import DataError, Task, default_data_root, fingerprint, get_suite, get_task, read_split


class SettingsError(ValueError):
    """Bad command-line input, reported before any compute."""


@dataclass
class SweepSettings:
    methods: list[str]
    suite: str = "demo"
    tasks: list[str] | None = None
    protocol: str | None = None
    seeds: list[int] | None = None
    num_seeds: int | None = None
    backbone: str | None = None
    checkpoint: str | None = None
    data_root: str | None = None
    sets: list[str] = field(default_factory=list)  # "--set [method.]key=value"
    overrides: dict = field(default_factory=dict)  # hyper-parameter overrides
    verify_data: bool = True


def parse_sets(sets: list[str], methods: list[Method]) -> dict[str, dict[str, str]]:
    """``[method.]key=value`` → {method name: {key: raw value}}. Unqualified keys go to every selected
    method that has the option; a key no selected method knows is an error."""
    per: dict[str, dict[str, str]] = {m.name: {} for m in methods}
    for item in sets:
        if "=" not in item:
            raise SettingsError(f"--set {item!r}: expected [method.]option=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if "." in key:
            mname, opt = key.rsplit(".", 1)
            m = get_method(mname)
            if m.name not in per:
                raise SettingsError(f"--set {item!r}: method {m.name!r} is not in --methods")
            if opt not in m.options:
                raise SettingsError(f"--set {item!r}: method {m.name!r} has no option {opt!r} "
                                    f"(its options: {', '.join(sorted(m.options)) or 'none'})")
            per[m.name][opt] = value
        else:
            owners = [m for m in methods if key in m.options]
            if not owners:
                raise SettingsError(f"--set {item!r}: none of the selected methods has an option {key!r}")
            for m in owners:
                per[m.name][key] = value
    return per


def config_label(method: Method, raw: dict[str, str]) -> str:
    if not raw:
        return method.name
    return method.name + "(" + ",".join(f"{k}={raw[k]}" for k in sorted(raw)) + ")"


def plan(settings: SweepSettings, *, check_data: bool = True) -> list[PlanContext]:
    """Every (method, task) context of the sweep, after checking all input."""
    suite = get_suite(settings.suite)
    protocol = get_protocol(settings.protocol or suite.protocol)
    methods = [get_method(m) for m in settings.methods]
    if len({m.name for m in methods}) != len(methods):
        raise SettingsError("--methods lists a method twice")
    tasks: list[Task] = [get_task(t) for t in (settings.tasks or suite.tasks)]
    for t in tasks:
        if t.suite != suite.name:
            raise SettingsError(f"task {t.name!r} belongs to suite {t.suite!r}, not {suite.name!r}")
    raw = parse_sets(settings.sets, methods)
    parsed = {}
    for m in methods:
        try:
            parsed[m.name] = m.parse_options(raw[m.name])
        except OptionError as exc:
            raise SettingsError(f"--set: {exc}") from None
    if settings.seeds:
        seeds = tuple(settings.seeds)
    else:
        n = settings.num_seeds or len(protocol.default_seeds)
        base = protocol.default_seeds if n <= len(protocol.default_seeds) else \
            tuple(protocol.default_seeds) + tuple(range(1000, 1000 + n - len(protocol.default_seeds)))
        seeds = tuple(base[:n])
    backbone = settings.backbone or suite.backbone
    resolve_checkpoint(backbone, settings.checkpoint)  # a missing file fails here
    if check_data:
        create_backbone(backbone, settings.checkpoint)  # weights that do not fit fail here, not mid-sweep
    ck_id = checkpoint_id(backbone, settings.checkpoint)
    try:
        data_root = Path(settings.data_root) if settings.data_root else default_data_root(suite)
    except DataError:
        if check_data:
            raise
        data_root = Path("DATA-ROOT-UNSET")  # planning only (--dry-run)
    if check_data and settings.verify_data:  # every defect of every task, before any compute
        from .verify import require_verified

        require_verified(tasks, data_root)
    contexts = []
    for t in tasks:
        fp = None
        if check_data:
            for split in sorted({s for pair in t.splits.values() for s in pair}):
                read_split(t, data_root, split)  # raises DataError naming the file/line
            fp = fingerprint(t, data_root)
        for m in methods:
            opts, sources = m.resolve_options(parsed[m.name], t)
            contexts.append(PlanContext(
                method=m, task=t, suite=suite, protocol=protocol, options=opts, option_sources=sources,
                config=config_label(m, raw[m.name]) + ("" if backbone == suite.backbone else f"@{backbone}"),
                seeds=seeds, backbone=backbone,
                checkpoint=str(Path(settings.checkpoint).resolve()) if settings.checkpoint else None,
                checkpoint_id=ck_id, data_root=str(data_root.resolve()), fingerprint=fp,
                overrides=dict(settings.overrides)))
    return contexts


class Executor(TypingProtocol):
    def run(self, specs: list[RunSpec], store: RunStore) -> list[dict]: ...


@dataclass
class Outcome:
    ctx: PlanContext
    records: list[dict] = field(default_factory=list)  # records of the last stage
    error: str | None = None
    runs: int = 0


def drive(contexts: list[PlanContext], executor: Executor, store: RunStore) -> list[Outcome]:
    """Advance every pipeline stage by stage until all are done."""
    outcomes = [Outcome(ctx) for ctx in contexts]
    gens = {}
    pending: dict[int, list[RunSpec]] = {}
    for i, ctx in enumerate(contexts):
        gen = ctx.method.pipeline(ctx, ctx.protocol)
        gens[i] = gen
        _advance(i, gen, None, pending, outcomes)
    while pending:
        wave = [(i, s) for i in sorted(pending) for s in pending[i]]
        records = executor.run([s for _, s in wave], store)
        by_ctx: dict[int, list[dict]] = {}
        for (i, _), rec in zip(wave, records):
            by_ctx.setdefault(i, []).append(rec)
        pending = {}
        for i, recs in by_ctx.items():
            outcomes[i].records = recs
            outcomes[i].runs += len(recs)
            _advance(i, gens[i], recs, pending, outcomes)
    return outcomes


def _advance(i, gen, sent, pending, outcomes) -> None:
    try:
        specs = gen.send(sent) if sent is not None else next(gen)
        if not specs:
            raise PipelineError("a pipeline stage yielded no runs")
        pending[i] = list(specs)
    except StopIteration:
        pass
    except (PipelineError, DataError) as exc:
        outcomes[i].error = str(exc)


# ---------------------------------------------------------------------------------------------
# executors
# ---------------------------------------------------------------------------------------------


class DryExecutor:
    """Counts runs without running them; selection sees placeholder metrics."""

    def __init__(self):
        self.specs: list[RunSpec] = []

    def run(self, specs, store):
        self.specs.extend(specs)
        return [{"status": "planned", "spec": s.to_dict(), "metrics": {"top1": 0.0}} for s in specs]


class LocalExecutor:
    """Runs specs one after the other in this process."""

    def __init__(self, env, total: int | None = None):
        self.env = env
        self.total = total
        self.done = 0
        self.trained = 0  # runs executed (not skipped) by this process, and their time
        self.trained_s = 0.0

    def _prefix(self) -> str:
        left = ""
        if self.total and self.trained:
            from .engine import _fmt_s

            left = f", sweep left ~{_fmt_s(self.trained_s / self.trained * (self.total - self.done + 1))}"
        return f"[run {self.done}/{self.total or '?'}{left}]"

    def run(self, specs, store):
        from .engine import execute

        out = []
        for spec in specs:
            self.done += 1
            self.env.prefix = self._prefix()
            if store.is_done(spec):
                self.env.log(f"{self.env.prefix} {spec.label()}: done already, skipped")
                out.append(store.load(spec))
                continue
            t0 = time.time()
            rec = execute(spec, store, self.env)
            self.trained += 1
            self.trained_s += time.time() - t0
            top1 = (rec.get("metrics") or {}).get("top1")
            self.env.log(f"{self.env.prefix} {spec.label()}: {rec['status']}"
                         + (f" top1 {top1:.2f}" if top1 is not None else "")
                         + f" ({time.time() - t0:.1f}s)"
                         + (f"\n    {rec['error'].strip().splitlines()[-1]}" if rec.get("error") else ""))
            out.append(rec)
        return out


def count_runs(contexts: list[PlanContext]) -> list[RunSpec]:
    """All runs a sweep needs (stages that depend on results use placeholder selections)."""
    dry = DryExecutor()
    for ctx in contexts:
        ctx.dry_run = True
    try:
        drive(contexts, dry, RunStore("/nonexistent"))
    finally:
        for ctx in contexts:
            ctx.dry_run = False
    return dry.specs


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------


def summary_rows(outcomes: list[Outcome]) -> list[dict]:
    rows = []
    for o in outcomes:
        ok = [r for r in o.records if r.get("status") == "ok" and r.get("metrics")]
        accs = [r["metrics"]["top1"] for r in ok]
        pct = [r["params"]["tuned_total_pct"] for r in ok if r.get("params")]
        rows.append({
            "config": o.ctx.config, "task": o.ctx.task.name, "stage": (o.records[0]["spec"]["stage"] if o.records else ""),
            "top1": statistics.fmean(accs) if accs else None,
            "std": statistics.stdev(accs) if len(accs) > 1 else None,
            "n": len(accs),
            "tuned_pct": statistics.fmean(pct) if pct else None,
            "failed": sum(r.get("status") in ("failed", "diverged") for r in o.records),
            "error": o.error,
        })
    return rows


def print_summary(rows: list[dict], file=None) -> None:
    file = file or sys.stdout
    mw = max([len("method")] + [len(r["config"]) for r in rows])
    tw = max([len("task")] + [len(r["task"]) for r in rows])
    head = f"{'method':<{mw}} {'task':<{tw}} {'top1':>7} {'±std':>6} {'seeds':>5} {'tuned%':>8}  notes"
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in rows:
        top1 = f"{r['top1']:.2f}" if r["top1"] is not None else "-"
        std = f"{r['std']:.2f}" if r["std"] is not None else ""
        pct = f"{r['tuned_pct']:.3f}" if r["tuned_pct"] is not None else "-"
        notes = r["error"] or (f"{r['failed']} failed/diverged" if r["failed"] else "")
        print(f"{r['config']:<{mw}} {r['task']:<{tw}} {top1:>7} {std:>6} {r['n']:>5} {pct:>8}  {notes}".rstrip(),
              file=file)


__all__ = ["SweepSettings", "SettingsError", "plan", "drive", "LocalExecutor", "DryExecutor", "count_runs",
           "summary_rows", "print_summary", "METHODS"]
