"""Inside a SLURM job: :class:`RunJob` runs its specs with the engine, on the job's device."""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import submitit
import torch

from ...store import RunRecord, RunSpec, RunStatus, RunStore
from ...trackers import hooks_for
from ...train.engine import Env, execute_claimed, execute_group, plan_groups
from ._util import now


def job_info() -> dict:
    """Who and where this job is (SLURM variables; submitit's job environment for local/debug)."""
    env = os.environ
    array_id, task_id = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_id}_{task_id}" if array_id and task_id else env.get("SLURM_JOB_ID")
    if not job_id:
        try:
            job_id = submitit.JobEnvironment().job_id
        except Exception:  # not inside a submitit job
            job_id = f"pid{os.getpid()}"
    return {
        "job_id": job_id,
        "array_job_id": array_id,
        "array_task_id": int(task_id) if task_id else None,
        "node": env.get("SLURMD_NODENAME") or socket.gethostname(),
        "restart_count": int(env.get("SLURM_RESTART_COUNT") or 0),
        "partition": env.get("SLURM_JOB_PARTITION"),
        "gpus": env.get("CUDA_VISIBLE_DEVICES"),
    }


def mark_start(store: RunStore, spec: RunSpec, info: dict, resume_epoch: int, starts_in_job: int) -> None:
    """Put this job into the run's record (``slurm``) before the engine starts; the engine keeps it."""
    rec = store.load(spec) or RunRecord.for_spec(spec, status=RunStatus.RUNNING)
    slurm = dict(rec.get("slurm") or {})
    restart = max(info["restart_count"], starts_in_job - 1)
    start = {"job_id": info["job_id"], "node": info["node"], "pid": os.getpid(), "restart_count": restart,
             "at": now(), "resume_epoch": resume_epoch}
    slurm.update({k: v for k, v in info.items() if k != "restart_count"})
    slurm["restart_count"] = restart
    slurm["starts"] = list(slurm.get("starts") or [])[-19:] + [start]
    rec.extra["slurm"] = slurm
    store.write(spec, rec)


def _execute(spec: RunSpec, store: RunStore, env: Env, on_claim=None) -> RunRecord:
    """The run, under its lease (another process holding it: wait for it, or take over when it dies)."""
    return execute_claimed(spec, store, env, wait=True, poll_s=10.0, on_claim=on_claim)[0]


class RunJob(submitit.helpers.Checkpointable):
    """One array task: run its specs one after the other on the job's device (``fuse`` > 1: the specs
    that can train fused as groups of up to ``fuse``, peftbench.train.fused).

    Checkpointable: on preemption or time limit submitit calls :meth:`checkpoint`, which resubmits
    this callable (with the keys it already finished); the requeued job resumes each unfinished run
    from the engine's per-epoch checkpoint. Exceptions inside a run are failed records (engine), so
    one bad run does not stop the others of the pack or of the array.
    """

    def __init__(self, specs: list[dict], runs_dir: str, device: str = "auto", quiet: bool = False,
                 tracking: dict | None = None, save_weights: str = "final", fuse: int = 1):
        self.specs = [dict(s) for s in specs]
        self.fuse = int(fuse)
        self.save_weights = save_weights
        self.tracking = tracking  # experiment trackers (peftbench.trackers.Tracking as plain data)
        self.runs_dir = str(runs_dir)
        self.device = device
        self.quiet = quiet
        self.finished: dict[str, str] = {}  # key -> status, kept through requeues (checkpoint pickles self)
        self.starts = 0

    def __call__(self) -> dict:
        self.starts += 1
        info = job_info()
        device = self.device if self.device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and cpus.isdigit():
            torch.set_num_threads(int(cpus))
        tracking = getattr(self, "tracking", None)  # (a job pickled by an older peftbench has none)
        env = Env(device=device, quiet=self.quiet, tracking=tracking, hooks=hooks_for(tracking),
                  save_weights=getattr(self, "save_weights", "final"))
        store = RunStore(self.runs_dir)
        env.log(f"[{info['job_id']}] {len(self.specs)} run(s) on {info['node']} ({device}); "
                f"restart {info['restart_count']}, start {self.starts} of this job")
        specs = [RunSpec.from_dict(d) for d in self.specs]
        pos = {s.key: i for i, s in enumerate(specs)}
        for group in plan_groups(specs, getattr(self, "fuse", 1)):
            todo = []
            for spec in group:
                if spec.key in self.finished:
                    continue
                old = store.load(spec)
                if old is not None and old.is_final:
                    self.finished[spec.key] = str(old.status)
                    continue
                todo.append(spec)
            if not todo:
                continue
            env.prefix = (f"[{info['job_id']} {pos[todo[0].key] + 1}/{len(specs)}]" if len(todo) == 1 else
                          f"[{info['job_id']} {pos[todo[0].key] + 1}-{pos[todo[-1].key] + 1}/{len(specs)}]")
            t0 = time.time()
            mark = lambda s: mark_start(store, s, info, store.checkpoint_epoch(s), self.starts)  # noqa: E731
            if len(todo) > 1:
                env.log(f"{env.prefix} {len(todo)} runs of {todo[0].method} on {todo[0].task} fused")
                results = execute_group(todo, store, env, on_claim=mark)
            else:
                results = [(None, False)]
            for spec, (rec, _) in zip(todo, results):
                if rec is None:  # alone, or held by another process: wait for it, or take it over
                    rec = _execute(spec, store, env, on_claim=lambda s=spec: mark(s))
                self.finished[spec.key] = str(rec.status)
                env.log(f"{env.prefix} {spec.label()}: {rec.status} ({time.time() - t0:.1f}s)")
        return dict(self.finished)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # submitit calls this from its USR2 handler, then runs ``scontrol requeue`` and exits. SLURM's
        # SIGTERM (the preemption's own, or the one the requeue itself sends to the job's processes)
        # can reach that scontrol child while it runs: with the default disposition it dies and the
        # requeue is reported failed (the run would then fail instead of resuming). An ignored signal
        # stays ignored across fork and exec, so from here on this process and its children ignore
        # SIGTERM (submitit's own handler only logged it; the process exits right after the requeue).
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"[{job_info()['job_id']}] checkpoint: requeueing; unfinished runs resume from their last "
              f"epoch checkpoint ({len(self.finished)}/{len(self.specs)} done in this job)", file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
