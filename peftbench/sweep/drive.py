"""Driving a sweep: every (method, task) pipeline advanced stage by stage through an executor.

A stage of the whole sweep is the union of the next stage of every pipeline: one batch of
independent runs (one SLURM job array). An executor is anything with ``run(specs, store) ->
records`` (the :class:`Executor` protocol; the built-in ones are in :mod:`peftbench.executors`).
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import DataError, PipelineError, SettingsError
from ..store import RunRecord, RunSpec, RunStatus, RunStore, planned
from ..store.journal import Journal
from .protocols import PlanContext


class Executor(Protocol):
    """Runs one stage: the records of ``specs``, in the same order (finished runs are not rerun)."""

    def run(self, specs: list[RunSpec], store: RunStore | None) -> list[RunRecord]: ...


@dataclass
class Outcome:
    ctx: PlanContext
    records: list[RunRecord] = field(default_factory=list)  # records of the last stage
    error: str | None = None
    runs: int = 0
    failed: int = 0  # runs of every stage that ended failed
    diverged: int = 0


def drive(contexts: list[PlanContext], executor: Executor, store: RunStore | None,
          journal: Journal | None = None) -> list[Outcome]:
    """Advance every pipeline stage by stage until all are done (``journal``: where each stage's runs
    are written down before they start, for ``peftbench status``; ``store`` None: a dry run, nothing is
    read or written)."""
    outcomes = [Outcome(ctx) for ctx in contexts]
    gens = {}
    pending: dict[int, list[RunSpec]] = {}
    for i, ctx in enumerate(contexts):
        ctx = dataclasses.replace(ctx, searched="grid")  # the pipeline's own state (a context can be driven again)
        gen = ctx.method.pipeline(ctx, ctx.protocol)
        gens[i] = gen
        _advance(i, gen, None, pending, outcomes)
    while pending:
        wave = [(i, s) for i in sorted(pending) for s in pending[i]]
        if journal is not None:
            journal.stage([s for _, s in wave])
        records = executor.run([s for _, s in wave], store)
        by_ctx: dict[int, list[RunRecord]] = {}
        for (i, spec), rec in zip(wave, records):
            by_ctx.setdefault(i, []).append(note_search(spec, rec, store))
        pending = {}
        for i, recs in by_ctx.items():
            outcomes[i].records = recs
            outcomes[i].runs += len(recs)
            outcomes[i].failed += sum(r.status == RunStatus.FAILED for r in recs)
            outcomes[i].diverged += sum(r.status == RunStatus.DIVERGED for r in recs)
            _advance(i, gens[i], recs, pending, outcomes)
    return outcomes


def searches_of(rec: RunRecord) -> list[str]:
    """The searches whose sweeps used a run: ``searches`` when a second sweep reused it, else the spec's."""
    return list(rec.get("searches") or [str(rec.spec.get("search") or "grid")])


def note_search(spec: RunSpec, rec: RunRecord, store: RunStore | None) -> RunRecord:
    """A finished run that another search planned first (the same key: a grid run that a halving sweep
    reuses as its last rung or final run) gets this sweep's search added to its ``searches``."""
    if store is None or not rec.is_final or spec.search in searches_of(rec):
        return rec

    def add(r: RunRecord) -> bool:
        have = searches_of(r)
        if spec.search in have:
            return False
        r.extra["searches"] = sorted({*have, spec.search})
        return True

    return store.update(spec, add) or rec


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


def too_many_runs(runs: int, limit: int, how: str = "") -> SettingsError:
    """The one-line refusal of a sweep that plans at least ``runs`` runs, more than ``limit`` (its ``max_runs``)."""
    return SettingsError(f"the sweep plans at least {runs:,} runs{how}, more than its limit of {limit:,} (--max-runs, "
                         "max_runs in a sweep file): narrow the methods, tasks, seeds or lr / wd lists, or raise the "
                         "limit if you mean it")


class DryExecutor:
    """Counts runs without running them; selection sees placeholder metrics. ``limit``: more runs than this
    stop the count (a :class:`~peftbench.errors.SettingsError` with the number counted so far)."""

    def __init__(self, limit: int | None = None):
        self.specs: list[RunSpec] = []
        self.limit = limit

    def run(self, specs: list[RunSpec], store: RunStore | None) -> list[RunRecord]:
        self.specs.extend(specs)
        if self.limit is not None and len(self.specs) > self.limit:
            raise too_many_runs(len(self.specs), self.limit)
        return [planned(s) for s in specs]


def count_runs(contexts: list[PlanContext], limit: int | None = None) -> list[RunSpec]:
    """All runs a sweep needs (stages that depend on results use placeholder selections); more than
    ``limit`` is an error, raised as soon as a stage passes it."""
    dry = DryExecutor(limit)
    drive([dataclasses.replace(ctx, dry_run=True) for ctx in contexts], dry, None)
    return dry.specs


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------


def summary_rows(outcomes: list[Outcome]) -> list[dict]:
    rows = []
    for o in outcomes:
        ok = [r for r in o.records if r.status == RunStatus.OK and r.metrics]
        accs = [r.metrics["top1"] for r in ok]
        pct = [r.params["tuned_total_pct"] for r in ok if r.params]
        rows.append({
            "config": o.ctx.config, "task": o.ctx.task.name, "stage": (o.records[0].spec["stage"] if o.records else ""),
            "top1": statistics.fmean(accs) if accs else None,
            "std": statistics.stdev(accs) if len(accs) > 1 else None,
            "n": len(accs),
            "tuned_pct": statistics.fmean(pct) if pct else None,
            "failed": sum(r.status in (RunStatus.FAILED, RunStatus.DIVERGED) for r in o.records),
            "error": o.error,
        })
    return rows


def print_summary(rows: list[dict], file=None) -> None:
    """The summary table of a sweep; every text from the records (configs, tasks, errors) on one line with its
    control characters made visible (:func:`peftbench._text.printable`: no ANSI escape reaches the terminal)."""
    from .._text import printable

    file = file or sys.stdout
    rows = [{**r, "config": printable(r["config"]), "task": printable(r["task"]),
             "error": printable(" ".join(str(r["error"]).splitlines())) if r["error"] else r["error"]} for r in rows]
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
