"""One run → one record: :func:`execute` builds the method's model on the backbone, trains it (or runs
the method's job), and writes the run's :class:`~peftbench.store.RunRecord`.

A record that is final (ok, diverged) is returned as it is. Otherwise the run starts (or resumes from
its checkpoint), a loss that is not finite is recorded as ``diverged`` and any exception as
``failed``: the sweep goes on either way. Fields other code put into the record before (an
executor's job information) are kept.
"""
from __future__ import annotations

import time
import traceback
from typing import Callable

from ..errors import Diverged
from ..methods import get_method
from ..provenance import now, provenance
from ..store import RunRecord, RunSpec, RunStatus, RunStore
from .build import build_model, load_trainable, normalizer_for, parameter_summary, save_trainable, seed_everything
from .code import code_fingerprint
from .env import Env
from .loop import RunHooks, call_hooks, train

__all__ = ["execute", "execute_claimed", "Env", "RunHooks", "build_model", "load_trainable", "save_trainable",
           "parameter_summary", "normalizer_for", "seed_everything", "train"]


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


def execute(spec: RunSpec, store: RunStore, env: Env) -> RunRecord:
    """Run ``spec`` unless its record is final; return the record (also written to the store)."""
    old = store.load(spec)
    if old is not None and old.is_final:
        return old
    record = RunRecord.for_spec(
        spec, status=RunStatus.RUNNING, started_at=(old.started_at if old else None) or now(),
        attempts=((old.attempts if old else None) or 0) + 1, provenance=provenance(env.device),
        code=code_fingerprint(spec.method), extra=dict(old.extra) if old else {})
    store.write(spec, record)
    t0 = time.time()
    before = float((old.wall_s if old else None) or 0.0)
    call_hooks(env, "run_start", spec, {"attempt": record.attempts, "resume_epoch": store.checkpoint_epoch(spec),
                                        "device": env.device})

    def progress(entry: dict) -> None:  # a killed attempt's time still counts in wall_s
        record.wall_s = round(before + time.time() - t0, 3)
        store.write(spec, record)

    try:
        if spec.job == "train":
            result = train(spec, store, env, on_epoch=progress)
        else:
            result = get_method(spec.method).run_job(spec.job, spec, store, env)
        _apply(record, result)
        record.status = RunStatus(result.get("status", "ok"))
    except Diverged as exc:
        record.status = RunStatus.DIVERGED
        record.error = str(exc)
    except Exception:  # recorded, the sweep goes on
        record.status = RunStatus.FAILED
        record.error = traceback.format_exc(limit=20)
    record.ended_at = now()
    record.wall_s = round(before + time.time() - t0, 3)
    store.write(spec, record)
    if record.status != RunStatus.RUNNING:
        store.drop_checkpoint(spec)
    call_hooks(env, "run_end", spec, record)
    return record


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
