"""Protocols: which runs a (method, task) pair needs, in which stages, and how the stages connect.

A pipeline is a generator: it yields a list of :class:`RunSpec` (one stage), receives their records
(in the same order), and yields the next stage or returns. The driver advances every (method, task)
pipeline of a sweep in lock-step, so a stage of the whole sweep is one batch of independent runs (one
SLURM job array). The run store is the truth: replaying a pipeline skips finished runs.

* ``vpt``   (VPT / E^2VPT, spec §7.1): lr × wd grid on train800 → val200, selection by last-epoch val
  top-1 (tie → smaller lr), then final runs on train800val200 → test for every seed.
* ``fixed`` (NOAH style, spec §4.5): given hyper-parameters, train800val200 → test for every seed.
* ``demo``  : the demo suite's protocol: fixed per-method hyper-parameters, few epochs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generator

from .method import Method
from .registry import Registry
from .store import RunSpec
from .task import Suite, Task

VPT_SEEDS = (42, 44, 82, 100, 800)


class PipelineError(RuntimeError):
    """A pipeline cannot go on (e.g. every search run diverged)."""


@dataclass
class PlanContext:
    """One (method, task) pair of a sweep, with everything needed to make its run specs."""

    method: Method
    task: Task
    suite: Suite
    protocol: "Protocol"
    options: dict  # resolved for this task
    option_sources: dict
    config: str
    seeds: tuple[int, ...]
    backbone: str
    checkpoint: str | None
    checkpoint_id: str | None
    data_root: str
    fingerprint: str | None
    overrides: dict = field(default_factory=dict)  # hyper-parameters given on the command line
    dry_run: bool = False

    def spec(self, stage: str, role: str, hparams: dict, seed: int, *, job: str = "train",
             extras: dict | None = None, options: dict | None = None) -> RunSpec:
        """A run of ``stage`` on the splits the task uses for ``role`` (search | final)."""
        train_split, eval_split = self.task.splits[role]
        return RunSpec(
            method=self.method.name, task=self.task.name, suite=self.suite.name, protocol=self.protocol.name,
            stage=stage, train_split=train_split, eval_split=eval_split, hparams=dict(hparams), seed=int(seed),
            options=dict(self.options if options is None else options), backbone=self.backbone,
            checkpoint=self.checkpoint, checkpoint_id=self.checkpoint_id, data_fingerprint=self.fingerprint,
            job=job, extras=dict(extras or {}), config=self.config, option_sources=dict(self.option_sources),
            data_root=self.data_root,
        )


def usable(record: dict) -> bool:
    """A record whose metrics can be used for selection (``planned`` stands in during --dry-run)."""
    return record.get("status") in ("ok", "planned") and (record.get("metrics") or {}).get("top1") is not None


def select_best(records: list[dict], prefer_smaller: str = "lr") -> dict:
    """Best last-epoch eval top-1; ties go to the smaller ``prefer_smaller`` hyper-parameter."""
    ok = [r for r in records if usable(r)]
    if not ok:
        statuses = sorted({r.get("status", "?") for r in records})
        raise PipelineError(f"no usable run to select from ({len(records)} runs: {', '.join(statuses)})")
    return max(ok, key=lambda r: (r["metrics"]["top1"], -float(r["spec"]["hparams"].get(prefer_smaller, 0))))


class Protocol:
    name: str = ""
    description: str = ""
    default_seeds: tuple[int, ...] = VPT_SEEDS

    def base_hparams(self, ctx: PlanContext, stage_role: str) -> dict:
        raise NotImplementedError

    def search_points(self, ctx: PlanContext) -> list[dict]:
        """The (lr, wd) points of the search stage."""
        raise NotImplementedError

    def pipeline(self, ctx: PlanContext) -> Generator[list[RunSpec], list[dict], None]:
        raise NotImplementedError


def _override(hp: dict, overrides: dict) -> dict:
    out = dict(hp)
    for k in ("epochs", "batch_size", "warmup_epochs", "optimizer", "eval_every"):
        if overrides.get(k) is not None:
            out[k] = overrides[k]
    return out


class VptProtocol(Protocol):
    name = "vpt"
    description = "lr x wd grid on train800->val200, select by last-epoch val top-1, final seeds on train800val200->test"

    def base_hparams(self, ctx: PlanContext, stage_role: str) -> dict:
        r = ctx.method.recipe
        hp = {"optimizer": r.optimizer, "batch_size": r.batch_size, "epochs": r.epochs,
              "warmup_epochs": r.warmup_epochs, "eval_every": 1 if stage_role == "search" else 0}
        return _override(hp, ctx.overrides)

    def search_points(self, ctx: PlanContext) -> list[dict]:
        r = ctx.method.recipe
        lrs = ctx.overrides.get("lr_grid") or r.lr_grid
        wds = ctx.overrides.get("wd_grid") or r.wd_grid
        return [{"lr": float(lr), "wd": float(wd)} for lr in lrs for wd in wds]

    def pipeline(self, ctx):
        points = self.search_points(ctx)
        if len(points) == 1:
            chosen = points[0]
        else:
            base = self.base_hparams(ctx, "search")
            search = [ctx.spec("search", "search", {**base, **p}, ctx.seeds[0]) for p in points]
            records = yield search
            best = select_best(records)
            chosen = {k: best["spec"]["hparams"][k] for k in ("lr", "wd")}
        base = self.base_hparams(ctx, "final")
        yield [ctx.spec("final", "final", {**base, **chosen}, s) for s in ctx.seeds]


class FixedProtocol(Protocol):
    name = "fixed"
    description = "given hyper-parameters (NOAH defaults: AdamW lr 1e-3 wd 1e-4), train800val200->test"

    def base_hparams(self, ctx: PlanContext, stage_role: str) -> dict:
        hp = {"optimizer": "adamw", "batch_size": 64, "epochs": 100, "warmup_epochs": 10, "warmup_lr": 1e-6,
              "min_lr": 1e-5, "lr_scaling": False, "eval_every": 0}
        return _override(hp, ctx.overrides)

    def search_points(self, ctx: PlanContext) -> list[dict]:
        lrs = ctx.overrides.get("lr_grid") or (1e-3,)
        wds = ctx.overrides.get("wd_grid") or (1e-4,)
        return [{"lr": float(lrs[0]), "wd": float(wds[0])}]

    def pipeline(self, ctx):
        base = self.base_hparams(ctx, "final")
        point = self.search_points(ctx)[0]
        yield [ctx.spec("final", "final", {**base, **point}, s) for s in ctx.seeds]


class DemoProtocol(Protocol):
    name = "demo"
    description = "demo suite: per-method fixed hyper-parameters, few epochs, train800val200->test"
    default_seeds = (42,)

    def base_hparams(self, ctx: PlanContext, stage_role: str) -> dict:
        r = ctx.method.recipe
        hp = {"optimizer": r.optimizer, "batch_size": r.demo_batch_size, "epochs": r.demo_epochs,
              "warmup_epochs": 0, "eval_every": 1 if stage_role == "search" else 0}
        return _override(hp, ctx.overrides)

    def search_points(self, ctx: PlanContext) -> list[dict]:
        r = ctx.method.recipe
        lrs = ctx.overrides.get("lr_grid") or (r.demo_lr,)
        wds = ctx.overrides.get("wd_grid") or (r.demo_wd,)
        return [{"lr": float(lr), "wd": float(wd)} for lr in lrs for wd in wds]

    pipeline = VptProtocol.pipeline


PROTOCOLS: Registry[Protocol] = Registry("protocol")
for _p in (VptProtocol(), FixedProtocol(), DemoProtocol()):
    PROTOCOLS.add(_p.name, _p)


def get_protocol(name: str) -> Protocol:
    return PROTOCOLS.get(name)


def hparams_summary(hp: dict[str, Any]) -> str:
    return " ".join(f"{k}={hp[k]}" for k in sorted(hp))
