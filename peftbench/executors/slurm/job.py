"""Inside a SLURM job: ``python -m peftbench.executors.slurm.job PAYLOAD.json [--task N]``.

The job reads its JSON payload (:mod:`.payload`: the run store, its settings, the specs of its array
task; no pickle), then trains its specs one after the other on the job's device with the engine
(:func:`peftbench.train.engine.execute_claimed`: each under its lease; with ``fuse`` > 1 the specs
that can train fused as groups). Its result is the run records it writes; the driver reads those.

Preemption and time limits (what submitit's job wrapper does, without its pickles): SLURM's SIGTERM is
ignored (the job goes on until it is told to stop); the preemption / time-limit signal (``USR2``,
``signal_delay_s`` before the limit, or ``$SUBMITIT_PREEMPT_SIGNAL``) requeues the job with ``scontrol
requeue`` and exits. The requeued job runs the same payload: finished runs are skipped, unfinished ones
resume from their last epoch checkpoint. A job that reaches its time limit more than ``max_num_timeout``
times is not requeued (the driver's bounded retries take over).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import submitit
import torch

from ..._io import atomic_write_text
from ...store import RunRecord, RunSpec, RunStore
from ...trackers import hooks_for
from ...train.engine import Env, execute_claimed, execute_group, plan_groups
from .. import _driver as driver
from .payload import PayloadError, read_payload


def job_info() -> dict:
    """Who and where this job is (SLURM's variables; submitit's job environment for local/debug)."""
    env = os.environ
    array_id, task_id = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_id}_{task_id}" if array_id and task_id else env.get("SLURM_JOB_ID")
    if not job_id:
        try:  # submitit's local and debug clusters
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


def mark_start(store: RunStore, spec: RunSpec, info: dict, starts_in_job: int) -> None:
    """This job's start, in the run's record (``record.executor``, :func:`peftbench.executors._driver.mark_start`)
    before the engine starts; the engine keeps it. The restart count is SLURM's (``SLURM_RESTART_COUNT``)."""
    restart = max(info["restart_count"], starts_in_job - 1)
    driver.mark_start(store, spec, "slurm", {k: v for k, v in info.items() if k != "restart_count"},
                      restart_count=restart)


def _execute(spec: RunSpec, store: RunStore, env: Env, on_claim=None) -> RunRecord:
    """The run, under its lease (another process holding it: wait for it, or take over when it dies)."""
    return execute_claimed(spec, store, env, wait=True, poll_s=10.0, on_claim=on_claim)[0]


def run_task(payload: str | Path, task: int = 0, starts: int = 1) -> dict[str, str]:
    """Train the specs of array task ``task`` of ``payload``; returns {key: status}. Exceptions inside a
    run are failed records (engine), so one bad run does not stop the others of the task or array."""
    settings, specs = read_payload(payload, task)
    info = job_info()
    device = settings["device"]
    if device in ("", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit():
        torch.set_num_threads(int(cpus))
    tracking = settings["tracking"]
    env = Env(device=device, quiet=settings["quiet"], tracking=tracking, hooks=hooks_for(tracking),
              save_weights=settings["save_weights"])
    store = RunStore(settings["runs_dir"])
    env.log(f"[{info['job_id']}] {len(specs)} run(s) on {info['node']} ({device}); "
            f"restart {info['restart_count']}")
    finished: dict[str, str] = {}
    pos = {s.key: i for i, s in enumerate(specs)}
    for group in plan_groups(specs, settings["fuse"]):
        todo = []
        for spec in group:
            old = store.load(spec)
            if old is not None and old.is_final:
                finished[spec.key] = str(old.status)
                continue
            todo.append(spec)
        if not todo:
            continue
        env.prefix = (f"[{info['job_id']} {pos[todo[0].key] + 1}/{len(specs)}]" if len(todo) == 1 else
                      f"[{info['job_id']} {pos[todo[0].key] + 1}-{pos[todo[-1].key] + 1}/{len(specs)}]")
        t0 = time.time()
        mark = lambda s: mark_start(store, s, info, starts)  # noqa: E731
        if len(todo) > 1:
            env.log(f"{env.prefix} {len(todo)} runs of {todo[0].method} on {todo[0].task} fused")
            results = execute_group(todo, store, env, on_claim=mark)
        else:
            results = [(None, False)]
        for spec, (rec, _) in zip(todo, results):
            if rec is None:  # alone, or held by another process: wait for it, or take it over
                rec = _execute(spec, store, env, on_claim=lambda s=spec: mark(s))
            finished[spec.key] = str(rec.status)
            env.log(f"{env.prefix} {spec.label()}: {rec.status} ({time.time() - t0:.1f}s)")
    return finished


# ---------------------------------------------------------------------------------------------
# preemption and time limits
# ---------------------------------------------------------------------------------------------


def _preempt_signal() -> signal.Signals:
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, name if name.startswith("SIG") else f"SIG{name}")


class Requeue:
    """The job's signal handlers: SIGTERM ignored, the preemption signal requeues (see the module doc)."""

    def __init__(self, payload: Path, settings: dict, info: dict, started: float):
        self.payload, self.settings, self.info, self.started = payload, settings, info, started

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.bypass)
        signal.signal(_preempt_signal(), self.requeue)

    @staticmethod
    def bypass(signum, frame) -> None:
        print(f"[{job_info()['job_id']}] ignoring {signal.Signals(signum).name} (the preemption / time-limit signal "
              "requeues the job)", file=sys.stderr, flush=True)

    def timed_out(self) -> bool:
        """Whether the job ran (nearly) its whole time limit, as submitit decides it: a preemption otherwise."""
        limit = float(self.settings["timeout_min"]) * 60
        return time.time() - self.started >= min(limit * 0.8, limit - 600)

    def _timeouts_file(self) -> Path:
        return self.payload.with_name(f"{self.payload.stem}.{self.info['job_id']}.timeouts.json")

    def requeue(self, signum, frame) -> None:
        job = self.info["job_id"]
        timed_out = self.timed_out()
        count_file = self._timeouts_file()
        try:
            timeouts = int(json.loads(count_file.read_text()).get("timeouts", 0))
        except (OSError, ValueError, AttributeError):
            timeouts = 0
        log = lambda m: print(f"[{job}] {m}", file=sys.stderr, flush=True)  # noqa: E731
        if timed_out:
            timeouts += 1
            if timeouts > int(self.settings["max_num_timeout"]):
                log(f"time limit reached {timeouts} times (max_num_timeout={self.settings['max_num_timeout']}): not "
                    "requeued; the driver resubmits the unfinished runs (max_retries)")
                raise SystemExit(1)
            atomic_write_text(count_file, json.dumps({"timeouts": timeouts}) + "\n")
        if not os.environ.get("SLURM_JOB_ID"):
            log("preempted outside SLURM: nothing to requeue; exiting (unfinished runs resume when run again)")
            raise SystemExit(1)
        # SLURM's SIGTERM (the preemption's own, or the one the requeue itself sends to the job's processes) can
        # reach the scontrol child while it runs; an ignored signal stays ignored across fork and exec, so from
        # here on this process and its children ignore it (the process exits right after the requeue).
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log(f"checkpoint: requeueing ({'time limit' if timed_out else 'preempted'}); unfinished runs resume from "
            "their last epoch checkpoint")
        subprocess.check_call(["scontrol", "requeue", job], timeout=60)
        raise SystemExit(-1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peftbench.executors.slurm.job",
                                description="run the array task of a peftbench SLURM job payload (JSON)")
    p.add_argument("payload", type=Path)
    p.add_argument("--task", type=int, default=None,
                   help="array task (default: $SLURM_ARRAY_TASK_ID, else 0)")
    args = p.parse_args(argv)
    started = time.time()
    task = args.task if args.task is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID") or 0)
    try:
        settings, _ = read_payload(args.payload, task)
    except PayloadError as exc:
        print(f"peftbench: error: {exc}", file=sys.stderr, flush=True)
        return 2
    Requeue(args.payload, settings, job_info(), started).install()
    finished = run_task(args.payload, task, starts=1 + int(os.environ.get("SLURM_RESTART_COUNT") or 0))
    print(f"[{job_info()['job_id']}] done: " + ", ".join(f"{k} {v}" for k, v in sorted(finished.items())),
          file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
