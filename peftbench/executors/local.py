"""``--executor local``: every run in this process, one after the other (``--fuse K``: up to K runs that
differ only in lr / wd at a time, trained as one model; peftbench.train.fused)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..store import RunRecord, RunSpec, RunStore
from ._base import ExecutorPlugin, register_executor

if TYPE_CHECKING:
    from ..train.env import Env


class LocalExecutor:
    """Runs specs one after the other in this process."""

    def __init__(self, env: "Env", total: int | None = None):
        self.env = env
        self.total = total
        self.done = 0
        self.trained = 0  # runs executed (not skipped) by this process, and their time
        self.trained_s = 0.0
        self.poll_s = 5.0  # how often a run another driver holds is looked at again

    def _prefix(self) -> str:
        from ..train.loop import fmt_s

        left = ""
        if self.total and self.trained:
            left = f", sweep left ~{fmt_s(self.trained_s / self.trained * (self.total - self.done + 1))}"
        return f"[run {self.done}/{self.total or '?'}{left}]"

    def run(self, specs: list[RunSpec], store: RunStore) -> list[RunRecord]:
        """Each group of specs in turn (``env.fuse`` > 1: runs that can train fused form groups); a run
        another live process holds is left to it and collected at the end (or taken over if its holder dies)."""
        from ..train.engine import execute_claimed  # (torch is imported when runs start, not when the CLI parses)
        from ..train.fused import group_indices

        out: dict[int, RunRecord] = {}
        deferred: list[int] = []
        for idx in group_indices(specs, self.env.fuse):
            recs = self._group([specs[i] for i in idx], store) if len(idx) > 1 else \
                [self._one(specs[idx[0]], store, execute_claimed, wait=False)]
            for i, rec in zip(idx, recs):
                if rec is None:
                    deferred.append(i)
                else:
                    out[i] = rec
        for i in deferred:
            out[i] = self._one(specs[i], store, execute_claimed, wait=True, counted=True)
        return [out[i] for i in range(len(specs))]

    def _group(self, group: list[RunSpec], store: RunStore) -> list[RunRecord | None]:
        """A fused group (the one call point where several specs are executed together)."""
        from ..train.engine import execute_group

        first = self.done + 1
        self.done += len(group)
        self.env.prefix = self._prefix().replace(f"[run {self.done}/", f"[runs {first}-{self.done}/", 1)
        todo = [s for s in group if not store.is_done(s)]
        for s in group:
            if s not in todo:
                self.env.log(f"{self.env.prefix} {s.label()}: done already, skipped")
        if len(todo) > 1:
            self.env.log(f"{self.env.prefix} {len(todo)} runs of {todo[0].method} on {todo[0].task} fused (lr, wd: "
                         + ", ".join(f"{s.hparams.get('lr')}/{s.hparams.get('wd')}" for s in todo) + ")")
        t0 = time.time()
        results = execute_group(group, store, self.env)
        dt = time.time() - t0
        recs: list[RunRecord | None] = []
        for spec, (rec, ran) in zip(group, results):
            recs.append(rec)
            if rec is None:
                self.env.log(f"{self.env.prefix} {spec.label()}: another driver trains it; coming back to it later")
            elif ran:
                self.trained += 1
                self.env.log(f"{self.env.prefix} {spec.label()}: {rec.status}"
                             + (f" top1 {rec.top1:.2f}" if rec.top1 is not None else "")
                             + (f"\n    {rec.error.strip().splitlines()[-1]}" if rec.error else ""))
            elif spec in todo:
                self.env.log(f"{self.env.prefix} {spec.label()}: done by another driver ({rec.status})")
        if any(ran for _, ran in results):
            self.trained_s += dt
        return recs

    def _one(self, spec: RunSpec, store: RunStore, execute_claimed, *, wait: bool,
             counted: bool = False) -> RunRecord | None:
        if not counted:
            self.done += 1
        self.env.prefix = self._prefix()
        old = store.load(spec)
        if old is not None and old.is_final:
            self.env.log(f"{self.env.prefix} {spec.label()}: done already, skipped")
            return old
        t0 = time.time()
        rec, ran = execute_claimed(spec, store, self.env, wait=wait, poll_s=self.poll_s)
        if rec is None:
            self.env.log(f"{self.env.prefix} {spec.label()}: another driver trains it; coming back to it later")
            return None
        if not ran:
            self.env.log(f"{self.env.prefix} {spec.label()}: done by another driver ({rec.status})")
            return rec
        self.trained += 1
        self.trained_s += time.time() - t0
        self.env.log(f"{self.env.prefix} {spec.label()}: {rec.status}"
                     + (f" top1 {rec.top1:.2f}" if rec.top1 is not None else "")
                     + f" ({time.time() - t0:.1f}s)"
                     + (f"\n    {rec.error.strip().splitlines()[-1]}" if rec.error else ""))
        return rec

    def close(self) -> None:
        pass


@register_executor
class Local(ExecutorPlugin):
    name = "local"
    description = "run here, one run after the other (default)"

    def create(self, args, *, env, runs_dir, total):
        return LocalExecutor(env, total=total)
