"""One run → one record: :func:`execute` builds the method's model on the backbone, trains it (or runs
the method's job), and writes the run's :class:`~peftbench.store.RunRecord`. :func:`execute_group` does
it for a group of runs that train fused (``--fuse K``, :mod:`peftbench.train.fused`): one record each.

A record that is final (ok, diverged) is returned as it is. Otherwise the run starts (or resumes from
its checkpoint), a loss that is not finite is recorded as ``diverged`` and any exception as
``failed``: the sweep goes on either way. Fields other code put into the record before (an
executor's job information) are kept.
"""
from __future__ import annotations

import contextlib
import threading
import time
import traceback
from typing import Callable

from ..errors import Diverged
from ..fingerprint import loaded_fingerprint
from ..methods import get_method
from ..provenance import now, provenance
from ..store import RunRecord, RunSpec, RunStatus, RunStore
from .build import build_model, load_trainable, normalizer_for, parameter_summary, save_trainable, seed_everything
from .env import Env
from .fused import CannotFuse, plan_groups
from .loop import OnEpoch, RunHooks, call_hooks, job_inputs, train, train_group

__all__ = ["execute", "execute_claimed", "execute_group", "execute_fused", "plan_groups", "Env", "RunHooks", "OnEpoch",
           "job_inputs",
           "build_model", "load_trainable", "save_trainable", "parameter_summary", "normalizer_for", "seed_everything",
           "train"]


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------


def _apply(record: RunRecord, result: dict) -> None:
    """Merge what a run returned into its record (unknown fields go to ``extra``)."""
    for k, v in result.items():
        if k == "status":
            continue
        if k in RunRecord.__dataclass_fields__ and k not in ("extra", "schema", "key", "spec"):
            setattr(record, k, v)
        else:
            record.extra[k] = v


# fields of a record that describe how one attempt trained, not kept when the run is started again
_PER_ATTEMPT = ("fused",)


WALL_TICK_S = 10.0  # the running record's wall_s is brought up to date this often (and after every epoch)


class _Attempt:
    """One attempt at a run: its ``running`` record and its end. The record's ``wall_s`` (every attempt's time
    so far) is written after every epoch and every :data:`WALL_TICK_S` seconds by a small thread, so an
    attempt killed at any moment (kill -9, out of memory, a preempted node) loses at most that much of its
    time: the next attempt adds its own to it."""

    def __init__(self, spec: RunSpec, store: RunStore, env: Env, old: RunRecord | None):
        self.spec, self.store, self.env = spec, store, env
        extra = {k: v for k, v in (old.extra if old else {}).items() if k not in _PER_ATTEMPT}
        self.record = RunRecord.for_spec(
            spec, status=RunStatus.RUNNING, started_at=(old.started_at if old else None) or now(),
            attempts=((old.attempts if old else None) or 0) + 1, provenance=provenance(env.device),
            code=loaded_fingerprint(get_method(spec.method)), extra=extra)
        store.write(spec, self.record)
        self.t0 = time.time()
        self.before = float((old.wall_s if old else None) or 0.0)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name=f"wall time {spec.key[:8]}", daemon=True)
        self._ticker.start()
        call_hooks(env, "run_start", spec, {"attempt": self.record.attempts,
                                            "resume_epoch": store.checkpoint_epoch(spec), "device": env.device})

    def _tick(self) -> None:
        while not self._done.wait(WALL_TICK_S):
            try:
                self.progress()
            except OSError:  # a full disk: the next write tries again (the run itself reports its own errors)
                pass

    def progress(self, entry: dict | None = None) -> None:  # a killed attempt's time still counts in wall_s
        with self._lock:
            if self._done.is_set() and entry is None:
                return  # ended (finish() wrote the last record): a late tick never overwrites it
            self.record.wall_s = round(self.before + time.time() - self.t0, 3)
            self.store.write(self.spec, self.record)

    def stop(self) -> None:
        """No more ticks (the attempt ended, or an exception that is not the run's own is leaving it)."""
        with self._lock:
            self._done.set()

    def finish(self, result: dict | None = None, *, diverged: Diverged | None = None,
               failed: str | None = None) -> RunRecord:
        self.stop()
        record = self.record
        if diverged is not None:
            record.status = RunStatus.DIVERGED
            record.error = str(diverged)
        elif failed is not None:
            record.status = RunStatus.FAILED
            record.error = failed
        else:
            _apply(record, result or {})
            record.status = RunStatus((result or {}).get("status", "ok"))
        record.ended_at = now()
        record.wall_s = round(self.before + time.time() - self.t0, 3)
        self.store.write(self.spec, record)
        if record.status != RunStatus.RUNNING:
            self.store.drop_checkpoint(self.spec)
        call_hooks(self.env, "run_end", self.spec, record)
        return record

    def run(self, env: Env) -> RunRecord:
        """Train the run (or run its job) alone and record how it ended."""
        spec = self.spec
        try:
            if spec.job == "train":
                result = train(spec, self.store, env, on_epoch=self.progress)
            else:
                result = get_method(spec.method).run_job(spec.job, spec, self.store, env)
        except Diverged as exc:
            return self.finish(diverged=exc)
        except Exception:  # recorded, the sweep goes on
            return self.finish(failed=traceback.format_exc(limit=20))
        except BaseException:  # interrupted: the record stays running, with this attempt's time so far
            self.progress()
            self.stop()
            raise
        return self.finish(result)


def execute(spec: RunSpec, store: RunStore, env: Env) -> RunRecord:
    """Run ``spec`` unless its record is final; return the record (also written to the store)."""
    old = store.load(spec)
    if old is not None and old.is_final:
        return old
    return _Attempt(spec, store, env, old).run(env)


def execute_fused(specs: list[RunSpec], store: RunStore, env: Env) -> list[RunRecord]:
    """:func:`execute` for a fused group (:func:`peftbench.train.fused.plan_groups`): the runs that are not
    final train as one model (:func:`peftbench.train.loop.train_group`), each recorded as its own run;
    when they cannot fuse (:class:`~peftbench.train.fused.CannotFuse`) each trains alone."""
    out: dict[int, RunRecord] = {}
    todo: list[int] = []
    for i, spec in enumerate(specs):
        old = store.load(spec)
        if old is not None and old.is_final:
            out[i] = old
        else:
            todo.append(i)
    if len(todo) == 1:
        out[todo[0]] = execute(specs[todo[0]], store, env)
    elif todo:
        attempts = {i: _Attempt(specs[i], store, env, store.load(specs[i])) for i in todo}
        by_key = {specs[i].key: attempts[i] for i in todo}
        group = [specs[i] for i in todo]
        try:
            results = train_group(group, store, env, on_epoch=lambda spec, entry: by_key[spec.key].progress(entry))
        except CannotFuse as exc:
            env.log(f"{env.prefix} {len(group)} runs of {group[0].method} on {group[0].task} cannot train fused "
                    f"({exc}); training them one by one")
            for i in todo:
                out[i] = attempts[i].run(env)
        except Exception:  # the group failed: every run of it is recorded as failed, the sweep goes on
            tb = traceback.format_exc(limit=20)
            for i in todo:
                out[i] = attempts[i].finish(failed=tb)
        except BaseException:  # interrupted: the records stay running, with their time so far
            for a in attempts.values():
                a.progress()
                a.stop()
            raise
        else:
            for i, res in zip(todo, results):
                out[i] = attempts[i].finish(diverged=res) if isinstance(res, Diverged) else attempts[i].finish(res)
    return [out[i] for i in range(len(specs))]


def execute_group(specs: list[RunSpec], store: RunStore, env: Env,
                  on_claim: Callable[[RunSpec], None] | None = None) -> list[tuple[RunRecord | None, bool]]:
    """:func:`execute_claimed` for a fused group: ``(record, ran_here)`` per run. Every run that is not
    final and whose lease this process gets trains here (runs that resume from the same epoch fused
    together, :func:`execute_fused`); a run another live process holds is ``(None, False)``, left to the
    caller (wait for it, or come back later). ``on_claim(spec)`` runs once the run's lease is held."""
    out: list[tuple[RunRecord | None, bool]] = [(None, False)] * len(specs)
    with contextlib.ExitStack() as leases:
        claimed: list[int] = []
        for i, spec in enumerate(specs):
            old = store.load(spec)
            if old is not None and old.is_final:
                out[i] = (old, False)
                continue
            lease = store.claim(spec)
            if lease is None:
                continue
            leases.enter_context(lease)
            if lease.took_over:
                env.log(f"{env.prefix} {spec.label()}: taking over from a dead driver "
                        f"(pid {lease.took_over.get('pid', '?')} on {lease.took_over.get('host', '?')})")
            if on_claim is not None:
                on_claim(spec)
            claimed.append(i)
        by_epoch: dict[int, list[int]] = {}  # runs fuse only with runs that resume from the same epoch
        for i in claimed:
            by_epoch.setdefault(store.checkpoint_epoch(specs[i]), []).append(i)
        for idx in by_epoch.values():
            for i, rec in zip(idx, execute_fused([specs[i] for i in idx], store, env)):
                out[i] = (rec, True)
    return out


def execute_claimed(spec: RunSpec, store: RunStore, env: Env, *, wait: bool = False, poll_s: float = 5.0,
                    on_claim: Callable[[], None] | None = None) -> tuple[RunRecord | None, bool]:
    """:func:`execute` under the run's lease: ``(record, ran_here)``; ``(None, False)`` when another live
    process trains the run (``wait=True``: wait for it to finish, or to die and leave the run to this
    process). ``on_claim`` runs once the lease is held, before the run starts (an executor notes its job)."""
    announced = False
    while True:
        old = store.load(spec)
        if old is not None and old.is_final:
            return old, False
        lease = store.claim(spec)
        if lease is not None:
            with lease:
                if lease.took_over:
                    env.log(f"{env.prefix} {spec.label()}: taking over from a dead driver "
                            f"(pid {lease.took_over.get('pid', '?')} on {lease.took_over.get('host', '?')})")
                if on_claim is not None:
                    on_claim()
                return execute(spec, store, env), True
        if not wait:
            return None, False
        if not announced:
            _, holder = store.lease_holder(spec)
            env.log(f"{env.prefix} {spec.label()}: trained by pid {(holder or {}).get('pid', '?')} on "
                    f"{(holder or {}).get('host', '?')}; waiting for it")
            announced = True
        time.sleep(poll_s)
