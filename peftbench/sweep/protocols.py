"""Protocols: which runs a (method, task) pair needs, in which stages, and how the stages connect.

A pipeline is a generator: it yields a list of :class:`RunSpec` (one stage), receives their records
(in the same order), and yields the next stage or returns. The driver advances every (method, task)
pipeline of a sweep in lock-step, so a stage of the whole sweep is one batch of independent runs (one
SLURM job array). The run store is the truth: replaying a pipeline skips finished runs.

* ``vpt``   (VPT / E^2VPT): lr × wd grid on train800 → val200, selection by last-epoch val top-1
  (tie → smaller lr), then final runs on train800val200 → test for every seed; fp32. With
  ``--search halving`` the grid is searched by successive halving (:func:`search_stage`,
  :mod:`peftbench.sweep.search`, docs/sweeps.md).
* ``fixed`` (NOAH style): given hyper-parameters, train800val200 → test for every seed.
* ``demo``  : the demo suite's protocol: fixed per-method hyper-parameters, few epochs.

docs/protocols.md describes each. A protocol is an :class:`EvalProtocol` subclass registered with
:func:`register_protocol`; third-party packages add protocols through the ``peftbench.protocols``
entry-point group. What a protocol needs from a method is data on the method's recipe
(``Recipe.protocols[<protocol name>]``, ``Recipe.suites[<suite name>]``), never a test of its name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Generator

from .._registry import Registry, instance_registry
from ..errors import PipelineError
from ..store import RunSpec
from ..tasks import Suite, Task
from .search import Search
from .stages import chosen, final_stage, job_stage, rank, search_stage, search_then_final, select_best  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # (no runtime import: listing the protocols, e.g. in `run --help`, needs no torch)
    from ..methods import Method

VPT_SEEDS = (42, 44, 82, 100, 800)
RECIPE_KEYS = ("optimizer", "batch_size", "epochs", "warmup_epochs", "lr_grid", "wd_grid")

@dataclass
class PlanContext:
    """One (method, task) pair of a sweep, with everything needed to make its run specs."""

    method: Method
    task: Task
    suite: Suite
    protocol: "EvalProtocol"
    options: dict  # resolved for this task
    option_sources: dict
    config: str
    seeds: tuple[int, ...]
    backbone: str
    checkpoint: str | None
    checkpoint_id: str | None
    data_root: str | None  # None: not given (planning only, e.g. a dry run of a suite without its data)
    fingerprint: str | None
    overrides: dict = field(default_factory=dict)  # hyper-parameters given on the command line
    precision: str = "fp32"
    dry_run: bool = False
    search: Search = field(default_factory=Search)  # how search stages pick their configuration
    # what the command line gave itself (a protocol's own defaults, e.g. a paper's, give way to them):
    # "seeds" (--seeds), "num_seeds" (--num-seeds) or ""; and the options set with --set
    seeds_given: str = ""
    given_options: frozenset = frozenset()
    protocol_data: dict = field(default_factory=dict)  # what a protocol's adapt() resolved for this pair
    card: str | None = None  # the sweep's card file (--protocol card), absolute
    # pipeline state: the search that chose the points of the runs planned from here on (grid until a search
    # with more than one point is made: peftbench.sweep.stages.search_stage sets it); the runs record it
    searched: str = "grid"

    def spec(self, stage: str, role: str, hparams: dict, seed: int, *, job: str = "train",
             extras: dict | None = None, options: dict | None = None, search: str | None = None) -> RunSpec:
        """A run of ``stage`` on the splits the task uses for ``role`` (search | final)."""
        train_split, eval_split = self.task.splits[role]
        return RunSpec(
            method=self.method.name, task=self.task.name, suite=self.suite.name, protocol=self.protocol.name,
            stage=stage, train_split=train_split, eval_split=eval_split, hparams=dict(hparams), seed=int(seed),
            options=dict(self.options if options is None else options), backbone=self.backbone,
            checkpoint=self.checkpoint, checkpoint_id=self.checkpoint_id, data_fingerprint=self.fingerprint,
            job=job, extras=dict(extras or {}), config=self.config, option_sources=dict(self.option_sources),
            data_root=self.data_root or "", method_version=int(self.method.version), search=search or self.searched,
        )

    def search_used(self, points: list) -> str:
        """The search that picks among ``points``: ``--search``, or grid when there is nothing to pick."""
        return self.search.kind if len(points) > 1 else "grid"


class EvalProtocol:
    """How the runs of one (method, task) pair are planned: stages, splits, hyper-parameters, seeds."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    default_seeds: ClassVar[tuple[int, ...]] = VPT_SEEDS
    # a cheap variant of each method's own search (methods with their own pipelines shrink their grids)
    reduced_search: ClassVar[bool] = False
    # the numeric precision of runs on CUDA unless --precision says otherwise (fp32 elsewhere)
    cuda_precision: ClassVar[str] = "fp32"
    uses_card: ClassVar[bool] = False  # trains the card file the sweep names (--card)

    def default_precision(self, device_type: str) -> str:
        """The numeric precision runs use unless --precision says otherwise."""
        return self.cuda_precision if device_type == "cuda" else "fp32"

    def adapt(self, ctx: PlanContext) -> PlanContext:
        """The context a pair is planned with (e.g. a recipe's per-suite values applied)."""
        return ctx

    def _precision(self, ctx: PlanContext, hp: dict) -> dict:
        if ctx.precision != "fp32":  # absent means fp32 (the keys of fp32 runs predate the field)
            hp["precision"] = ctx.precision
        return hp

    def base_hparams(self, ctx: PlanContext, stage_role: str) -> dict:
        raise NotImplementedError

    def search_points(self, ctx: PlanContext) -> list[dict]:
        """The (lr, wd) points of the search stage."""
        raise NotImplementedError

    def pipeline(self, ctx: PlanContext) -> Generator[list[RunSpec], list[dict], None]:
        raise NotImplementedError

    def describe(self, contexts: list[PlanContext]) -> list[str]:
        """Lines a dry run prints about how this protocol planned ``contexts`` (e.g. a paper's recipe with its
        sources); nothing by default."""
        return []

    def least_runs(self, grid: int, seeds: int) -> int:
        """At least how many runs one (method, task) pair plans under this protocol, from the sweep's numbers
        alone: ``grid`` lr × wd points given (1 when none are) and ``seeds`` final seeds. Planning refuses a sweep
        whose pairs × this exceed its ``max_runs`` before it builds anything (the runs it plans are counted
        exactly afterwards); a protocol that cannot say returns 1."""
        return 1


def _override(hp: dict, overrides: dict) -> dict:
    out = dict(hp)
    for k in ("epochs", "batch_size", "warmup_epochs", "optimizer", "eval_every"):
        if overrides.get(k) is not None:
            out[k] = overrides[k]
    return out


PROTOCOLS: Registry[EvalProtocol]
# built-in protocols: this module's, and --protocol paper (peftbench.sweep.paper, imported when the registry is
# first used: it builds on this module)
PROTOCOLS, register_protocol = instance_registry("protocol", EvalProtocol, group="peftbench.protocols", article="an",
                                                 builtin="peftbench.sweep.paper")


class SearchThenFinal(EvalProtocol):
    """A search over :meth:`search_points` on the search splits (seed: the first), then the chosen point for
    every seed on the final splits: the stages of :mod:`peftbench.sweep.stages`."""

    def pipeline(self, ctx):
        yield from search_then_final(ctx, self.search_points(ctx), self.base_hparams(ctx, "search"),
                                     self.base_hparams(ctx, "final"), ctx.spec)

    def least_runs(self, grid: int, seeds: int) -> int:
        return (grid if grid > 1 else 0) + seeds  # every point of the search (its first rung), every final seed


@register_protocol
class VptProtocol(SearchThenFinal):
    name = "vpt"
    description = "lr x wd grid on train800->val200, select by last-epoch val top-1, final seeds on train800val200->test"

    def adapt(self, ctx: PlanContext) -> PlanContext:
        """The recipe's per-suite values (e.g. E^2VPT's FGVC batch size and lr grid) unless the command
        line sets them; the run records' option_sources say where they came from."""
        o = ctx.method.recipe.suite_override(ctx.suite.name)
        if o is None:
            return ctx
        overrides, sources = dict(ctx.overrides), dict(ctx.option_sources)
        for key, value in o.values.items():
            if key not in RECIPE_KEYS:
                raise PipelineError(f"method {ctx.method.name!r}: recipe override {key!r} on suite "
                                    f"{ctx.suite.name!r} is not one of {', '.join(RECIPE_KEYS)}")
            if not overrides.get(key):
                overrides[key] = value
                sources[key] = f"{value if not isinstance(value, tuple) else list(value)}: {o.source}"
        return dataclasses.replace(ctx, overrides=overrides, option_sources=sources)

    def base_hparams(self, ctx: PlanContext, stage_role: str) -> dict:
        r = ctx.method.recipe
        hp = {"optimizer": r.optimizer, "batch_size": r.batch_size, "epochs": r.epochs,
              "warmup_epochs": r.warmup_epochs, "eval_every": 1 if stage_role == "search" else 0}
        return self._precision(ctx, _override(hp, ctx.overrides))

    def search_points(self, ctx: PlanContext) -> list[dict]:
        r = ctx.method.recipe
        lrs = ctx.overrides.get("lr_grid") or r.lr_grid
        wds = ctx.overrides.get("wd_grid") or r.wd_grid
        return [{"lr": float(lr), "wd": float(wd)} for lr in lrs for wd in wds]

@register_protocol
class FixedProtocol(EvalProtocol):
    name = "fixed"
    description = "given hyper-parameters (NOAH defaults: AdamW lr 1e-3 wd 1e-4), train800val200->test"
    cuda_precision = "bf16"

    def base_hparams(self, ctx: PlanContext, stage_role: str) -> dict:
        hp = {"optimizer": "adamw", "batch_size": 64, "epochs": 100, "warmup_epochs": 10, "warmup_lr": 1e-6,
              "min_lr": 1e-5, "lr_scaling": False, "eval_every": 0}
        return self._precision(ctx, _override(hp, ctx.overrides))

    def search_points(self, ctx: PlanContext) -> list[dict]:
        lrs = ctx.overrides.get("lr_grid") or (1e-3,)
        wds = ctx.overrides.get("wd_grid") or (1e-4,)
        return [{"lr": float(lrs[0]), "wd": float(wds[0])}]

    def pipeline(self, ctx):
        yield from final_stage(ctx, {**self.base_hparams(ctx, "final"), **self.search_points(ctx)[0]},
                               lambda stage, hp, seed: ctx.spec(stage, "final", hp, seed))

    def least_runs(self, grid: int, seeds: int) -> int:
        return seeds  # the first lr and wd given, for every seed


@register_protocol
class DemoProtocol(SearchThenFinal):
    """Per-method values from ``Recipe.protocols["demo"]`` (lr, wd, epochs, batch_size), else :attr:`defaults`."""

    name = "demo"
    description = "demo suite: per-method fixed hyper-parameters, few epochs, train800val200->test"
    default_seeds = (42,)
    reduced_search = True
    defaults = {"lr": 1.0, "wd": 0.0001, "epochs": 10, "batch_size": 64}
    cuda_precision = "bf16"

    def _values(self, ctx: PlanContext) -> dict:
        return {**self.defaults, **ctx.method.recipe.protocol_values(self.name)}

    def base_hparams(self, ctx: PlanContext, stage_role: str) -> dict:
        v = self._values(ctx)
        hp = {"optimizer": ctx.method.recipe.optimizer, "batch_size": v["batch_size"], "epochs": v["epochs"],
              "warmup_epochs": 0, "eval_every": 1 if stage_role == "search" else 0}
        return self._precision(ctx, _override(hp, ctx.overrides))

    def search_points(self, ctx: PlanContext) -> list[dict]:
        v = self._values(ctx)
        lrs = ctx.overrides.get("lr_grid") or (v["lr"],)
        wds = ctx.overrides.get("wd_grid") or (v["wd"],)
        return [{"lr": float(lr), "wd": float(wd)} for lr in lrs for wd in wds]


def get_protocol(name: str) -> EvalProtocol:
    return PROTOCOLS.get(name)

