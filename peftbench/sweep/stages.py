"""The stages a pipeline is built from: every protocol and every method with stages of its own composes these.

A pipeline is a generator (:mod:`peftbench.sweep.protocols`): it yields a stage (a list of
:class:`~peftbench.store.RunSpec`), receives the stage's records, and goes on. ``yield from`` one of these:

* :func:`job_stage`: runs that compute something other than a trained model (importance scores, gradients,
  sensitivities) and that later stages need: their records, or ``None`` in a dry run (nothing was computed:
  the caller plans with placeholders); a run that did not finish stops the pipeline with a
  :class:`~peftbench.errors.PipelineError` naming the stage.
* :func:`search_stage`: **the only way to emit a search** (lr × wd points, prompt-pruning candidates, SPT
  budgets...): one stage with every point (``--search grid``) or one stage per rung of successive halving
  (``--search halving``, :mod:`peftbench.sweep.search`). It returns the selected record. So every search
  strategy applies to every method.
* :func:`final_stage`: the chosen point, once per seed, on the final splits.
* :func:`search_then_final`: a search when there is more than one point, then the final runs.
* :func:`job_then_train`: one job run per training split, then :func:`search_then_final` whose runs load the job's
  artifact of their split (SCT's saliency, LST's Fisher pruning, GPS's gradients, DA-VPT's mapping).

:func:`chosen` is the chosen point of a search record (its lr and wd). ``ctx.dry_run`` is the one signal of
a dry run (records are then placeholders, :func:`peftbench.store.planned`).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Generator

from ..errors import PipelineError
from ..store import RunRecord, RunSpec, RunStatus
from .search import rung_epochs, survivors

if TYPE_CHECKING:
    from .protocols import PlanContext

SEARCHED = ("lr", "wd")  # the hyper-parameters a search point sets (what final runs take from the chosen record)

Stage = Generator[list[RunSpec], list[RunRecord], Any]
# (stage name, hyper-parameters, index of the point) -> the run spec
SpecMaker = Callable[[str, dict, int], RunSpec]


def rank(records: list[RunRecord], tie: Callable[[int], tuple] | None = None) -> list[int]:
    """Indices of the usable records, best first: last-epoch eval top-1, ties to ``tie(i)`` (default: the
    smaller lr), then to the earlier record (grid order)."""
    ok = [i for i, r in enumerate(records) if r.usable]
    if not ok:
        statuses = sorted({str(r.status) for r in records})
        raise PipelineError(f"no usable run to select from ({len(records)} runs: {', '.join(statuses)})")
    tie = tie or (lambda i: (float(records[i].hparams.get("lr", 0)),))
    return sorted(ok, key=lambda i: (-(records[i].top1 or 0.0), *tie(i), i))  # (usable: top1 is a number)


def select_best(records: list[RunRecord], tie: Callable[[int], tuple] | None = None) -> RunRecord:
    """Best last-epoch eval top-1 (ties: see :func:`rank`)."""
    return records[rank(records, tie)[0]]


def chosen(record: RunRecord) -> dict:
    """The point a search chose: the :data:`SEARCHED` hyper-parameters of its record."""
    return {k: record.hparams[k] for k in SEARCHED if k in record.hparams}


def job_stage(ctx: "PlanContext", specs: list[RunSpec], name: str) -> Stage:
    """Yield ``specs`` (jobs that do not train); return their records, or None in a dry run."""
    records = yield specs
    if ctx.dry_run:
        return None
    for rec in records:
        if rec.status != RunStatus.OK:
            raise PipelineError(f"stage {name} did not finish ({rec.status}): {rec.error}")
    return records


def search_stage(ctx: "PlanContext", points: list[dict], base: dict, make_spec: SpecMaker, *, name: str = "search",
                 tie: Callable[[int], tuple] | None = None) -> Stage:
    """The search over ``points`` (each a dict of hyper-parameters on top of ``base``; ``make_spec(stage, hp,
    i)`` makes point i's run, so a point may also differ in options or inputs), as one stage (``--search
    grid``) or one stage per rung of successive halving (``--search halving``); returns the selected record
    (ties: ``tie(i)`` of the point, default the smaller lr).

    Grid: stage ``name``, every point trains the whole schedule. Halving: rung r < R is stage
    ``<name>-rung<r>`` with ``hparams["stop_epoch"] = e_r`` (a different run); the last rung is stage ``name``
    without it, so its runs are the grid's runs (same key, same record: a store that holds the grid search
    needs no training for them). Runs of a rung after the first start from the end state of the same point's
    run at the rung before (``RunSpec.resume_from``). One point: nothing to search, stage ``name`` alone."""
    searched = ctx.search_used(points) if ctx.searched == "grid" else ctx.searched

    def spec(stage: str, hp: dict, i: int, **kw) -> RunSpec:
        return dataclasses.replace(make_spec(stage, hp, i), search=searched, **kw)

    def ties(order: list[int]) -> Callable[[int], tuple] | None:  # the tie rule on positions of a rung's records
        return (lambda j: tie(order[j])) if tie else None

    ctx.searched = searched  # the runs planned after this stage were chosen by it
    if ctx.search.kind != "halving" or len(points) <= 1:
        records = yield [spec(name, {**base, **p}, i) for i, p in enumerate(points)]
        return select_best(records, ties(list(range(len(points)))))
    epochs = int(base["epochs"])
    stops = rung_epochs(ctx.search.rungs, epochs)
    alive = list(range(len(points)))  # indices into points, in grid order
    before: dict[int, RunSpec] = {}
    for r, stop in enumerate(stops):
        last = stop == epochs
        specs = []
        for i in alive:
            hp = {**base, **points[i]}
            if not last:
                hp["stop_epoch"] = stop
            resume = {"key": before[i].key, "epoch": int(before[i].hparams["stop_epoch"])} if i in before else {}
            specs.append(spec(name if last else f"{name}-rung{r + 1}", hp, i, resume_from=resume))
        records = yield specs
        order = rank(records, ties(alive))
        if last:
            return records[order[0]]
        keep = survivors(len(alive), ctx.search.factor)
        if keep <= 1:  # the next rung would train one configuration: the selection is made
            return records[order[0]]
        kept = sorted(order[:keep])
        before = {alive[j]: specs[j] for j in kept}
        alive = [alive[j] for j in kept]
    raise AssertionError("unreachable: the last rung stops at the last epoch")


def final_stage(ctx: "PlanContext", hp: dict, make_spec: Callable[[str, dict, int], RunSpec]) -> Stage:
    """The final runs: ``hp`` (the final base with the chosen point) once per seed (``make_spec(stage, hp, seed)``)."""
    records = yield [make_spec("final", dict(hp), s) for s in ctx.seeds]
    return records


def search_then_final(ctx: "PlanContext", points: list[dict], base_search: dict, base_final: dict,
                      make_spec: Callable[[str, str, dict, int], RunSpec],
                      tie: Callable[[int], tuple] | None = None) -> Stage:
    """A search over ``points`` on the search splits (seed: the first) when there is more than one, then the chosen
    point (else the only one) for every seed on the final splits; ``make_spec(stage, role, hp, seed)``."""
    choice = dict(points[0])
    if len(points) > 1:
        best = yield from search_stage(ctx, points, base_search,
                                       lambda stage, hp, i: make_spec(stage, "search", hp, ctx.seeds[0]), tie=tie)
        choice = chosen(best)
    records = yield from final_stage(ctx, {**base_final, **choice},
                                     lambda stage, hp, seed: make_spec(stage, "final", hp, seed))
    return records


# what a job sees of the training runs' hyper-parameters: the images as they see them (a recipe's resampling and
# normalisation)
JOB_SEES = ("interpolation", "mean", "std")


def job_then_train(ctx: "PlanContext", points: list[dict], base_search: dict, base_final: dict, job: str,
                   artifact: str, sources: dict, job_hparams: Callable[[str], dict], *,
                   job_options: dict | None = None, sees: tuple[str, ...] = JOB_SEES, run_job: bool = True) -> Stage:
    """A method with a job before training: one ``job`` run per training split (the search splits when there is a
    search, and the final splits), seeded with the first seed, with ``job_hparams(role)`` and what it ``sees`` of the
    final runs' hyper-parameters (and ``job_options`` instead of the method's, when given); then
    :func:`search_then_final`, each run loading the ``artifact`` its split's job wrote (``extras.init_state``).
    ``run_job`` False: no job, the runs train without an artifact (DA-VPT with one prompt per class). Every spec
    carries ``sources`` as its option sources."""
    roles = ["search", "final"] if len(points) > 1 else ["final"]

    def spec(stage, role, hp, seed, **kw):
        return dataclasses.replace(ctx.spec(stage, role, hp, seed, **kw), option_sources=dict(sources))

    view = {k: base_final[k] for k in sees if k in base_final}
    jobs: dict[str, RunSpec] = {}
    if run_job:
        kw = {} if job_options is None else {"options": job_options}
        jobs = {role: spec(job, role, {**job_hparams(role), **view}, ctx.seeds[0], job=job, **kw) for role in roles}
        yield from job_stage(ctx, list(jobs.values()), job)

    def extras(role: str) -> dict:
        return {"init_state": f"{jobs[role].key}.{artifact}"} if jobs else {}

    records = yield from search_then_final(ctx, points, base_search, base_final, lambda stage, role, hp, seed: spec(
        stage, role, hp, seed, extras=extras(role)))
    return records
