"""``--executor local``: every run in this process, one after the other."""
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
        progress = self.env.progress
        if progress is not None and hasattr(progress, "prefix"):
            return progress.prefix()  # with the sweep's ETA (peftbench.sweep.progress)
        return f"[run {self.done}/{self.total or '?'}]"

    def run(self, specs: list[RunSpec], store: RunStore) -> list[RunRecord]:
        """Each spec in turn; a run another live process holds is left to it and collected at the end
        (or taken over if its holder dies)."""
        from ..train.engine import execute_claimed  # (torch is imported when runs start, not when the CLI parses)

        out: dict[int, RunRecord] = {}
        deferred: list[int] = []
        for i, spec in enumerate(specs):
            rec = self._one(spec, store, execute_claimed, wait=False)
            if rec is None:
                deferred.append(i)
            else:
                out[i] = rec
        for i in deferred:
            out[i] = self._one(specs[i], store, execute_claimed, wait=True, counted=True)
        return [out[i] for i in range(len(specs))]

    def _one(self, spec: RunSpec, store: RunStore, execute_claimed, *, wait: bool,
             counted: bool = False) -> RunRecord | None:
        if not counted:
            self.done += 1
        old = store.load(spec)
        if hasattr(self.env.progress, "run_started"):
            self.env.progress.run_started(spec)
        self.env.prefix = self._prefix()
        if old is not None and old.is_final:
            self._finished(spec, ran=False)
            self.env.log(f"{self.env.prefix} {spec.label()}: done already, skipped", detail=True)
            return old
        t0 = time.time()
        rec, ran = execute_claimed(spec, store, self.env, wait=wait, poll_s=self.poll_s)
        if rec is None:
            self._finished(spec, ran=False, taken_back=True)
            self.env.log(f"{self.env.prefix} {spec.label()}: another driver trains it; coming back to it later")
            return None
        if not ran:
            self._finished(spec, ran=False)
            self.env.log(f"{self.env.prefix} {spec.label()}: done by another driver ({rec.status})")
            return rec
        self.trained += 1
        self.trained_s += time.time() - t0
        self._finished(spec, ran=True)
        self.env.log(f"{self._prefix()} {spec.label()}: {rec.status}"
                     + (f" top1 {rec.top1:.2f}" if rec.top1 is not None else "")
                     + f" ({time.time() - t0:.1f}s)"
                     + (f"\n    {rec.error.strip().splitlines()[-1]}" if rec.error else ""))
        return rec

    def _finished(self, spec: RunSpec, *, ran: bool, taken_back: bool = False) -> None:
        progress = self.env.progress
        if not hasattr(progress, "run_finished"):
            return
        if taken_back:  # deferred to the end: it is planned again then
            progress.run_deferred(spec)
        else:
            progress.run_finished(spec, ran=ran)

    def close(self) -> None:
        pass


@register_executor
class Local(ExecutorPlugin):
    name = "local"
    description = "run here, one run after the other (default)"

    def create(self, args, *, env, runs_dir, total):
        return LocalExecutor(env, total=total)

    def make(self, settings, *, env, runs_dir, total, args=None):
        return LocalExecutor(env, total=total)
