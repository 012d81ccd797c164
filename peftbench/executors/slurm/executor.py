"""SLURM execution through submitit: one job array per stage, checkpointable jobs, bounded retries.

``peftbench run --executor slurm`` hands each stage of a sweep (one ``Executor.run(specs, store)``
call of :func:`peftbench.sweep.drive`) to :class:`SlurmExecutor`, which

* submits the stage's unfinished runs as **one submitit job array** (``pack = N``: N runs into
  one array task; default one run per task and GPU), at most ``array_parallelism`` tasks at once;
* waits for the array, polling ``sacct`` (``squeue`` when accounting is off), and reads the results
  from the run store, which stays the truth: a run is finished when its record says so;
* resubmits, up to ``max_retries`` times, runs whose job ended (FAILED, NODE_FAIL, TIMEOUT,
  CANCELLED, OUT_OF_MEMORY, ...) without a final record, and records each retry in the run record
  (``retries``); a Python exception inside a run is already a ``failed`` record (engine) and is
  not retried by the driver;
* keeps ``<runs-dir>/.slurm/state.json`` (the job id of every run it submitted), so that a driver
  started again re-attaches to jobs that are still pending or running instead of submitting them
  twice, and ``peftbench status`` can show job ids; ``<runs-dir>/.slurm/driver.lock`` keeps two
  drivers from driving the same runs dir at once.

Inside the job, ``python -m peftbench.executors.slurm.job <payload.json>`` (:mod:`.job`) reads its JSON
payload (:mod:`.payload`: no pickle is written for a job, none is ever read) and runs its specs with
:func:`peftbench.train.engine.execute_claimed` on the job's device (cuda when available, else cpu; the
precision each run's hyper-parameters say). On preemption or time limit the job requeues itself
(``scontrol requeue``); the requeued job resumes every unfinished run from its per-epoch checkpoint
(``<key>.ckpt.safetensors``). Each job start is recorded in the run record's ``slurm`` field (job id,
array task id, node, restart count, the epoch it resumed from). What a job did is what its run records
say: the driver never reads a job's result from submitit.

Settings come from a TOML profile (``--executor-profile FILE``), ``[executor.slurm]`` / ``--executor-set`` and the
sweep's generic executor settings; see
:data:`peftbench.executors.slurm.settings.SETTINGS` and
docs/slurm.md.
"""
from __future__ import annotations

import functools
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import submitit

from ...errors import SettingsError
from ...store import RunRecord, RunSpec, RunStatus, RunStore
from ...train.fused import plan_groups
from .._driver import DriverState, executor_info, now
from .job import run_task
from .payload import PayloadError, private_dir, write_payload
from .queue import HELD_STATES, VANISHED, hopeless, is_active, pending_reasons, query_states
from .settings import SlurmSettings
from .state import LOCK_FILE, STATE_DIR, DriverLock


class SlurmExecutor:
    """Runs each stage as one submitit job array and waits for it (the :class:`~peftbench.sweep.Executor`
    protocol). See the module docstring for the behaviour on restart, preemption and failures."""

    completed_grace_s = 30.0  # a COMPLETED job whose record is not final yet (shared FS lag) gets this long
    vanish_polls = 5  # a job neither sacct nor squeue knows for this many polls (and 60 s) is VANISHED
    hopeless_after_s = 60.0  # a pending reason that cannot resolve (PartitionConfig, ...) for this long: stop

    def __init__(self, settings: SlurmSettings, runs_dir: str | Path, *, quiet: bool = False,
                 total: int | None = None, log: Callable[[str], None] | None = None, argv: list[str] | None = None,
                 tracking: dict | None = None, save_weights: str = "final", fuse: int = 1):
        self.s = settings
        self.save_weights = save_weights
        self.tracking = tracking  # the sweep's experiment trackers (peftbench.trackers), made again in each job
        self.fuse = int(fuse)  # --fuse K: an array task trains fused groups of up to K runs
        self.root = Path(runs_dir).resolve()
        self.dir = self.root / STATE_DIR
        self.folder = Path(settings.folder).resolve() if settings.folder else self.dir / "logs"
        self.quiet = quiet
        self.total = total
        self.done = 0
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        if settings.cluster == "slurm" and not shutil.which("sbatch"):
            raise SettingsError("--executor slurm: `sbatch` is not on PATH (is this a SLURM login node?)")
        self._lock = DriverLock(self.dir / LOCK_FILE)
        self._lock.acquire()
        self.driver = DriverState(self.root, "slurm")
        self.state = self.driver.data
        self.driver.start()
        self._executor = None
        self._jobs: dict[str, Any] = {}  # job id -> submitit Job (jobs submitted by this driver)
        self._unknown_polls: dict[str, int] = {}
        self._not_in_queue: set[str] = set()
        self._submitted_at: dict[str, float] = {}
        self.retries_used: dict[str, int] = {}  # per run, for this driver invocation
        self._retry_queue: list[RunSpec] = []
        self._hopeless_since: dict[str, float] = {}
        self._save_state()

    # -- plumbing -----------------------------------------------------------------------------

    def close(self) -> None:
        self.driver.stop()
        self._lock.release()

    def __enter__(self) -> "SlurmExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log(self, msg: str) -> None:
        self._log(msg)

    def _save_state(self) -> None:
        self.driver.save()

    def _submitit(self):
        """submitit's executor for this cluster (it writes and submits the sbatch script; the job's command is
        peftbench's own, reading a JSON payload: :mod:`.payload`)."""
        if self._executor is None:
            kwargs = {}
            if self.s.cluster == "slurm":
                kwargs["slurm_max_num_timeout"] = self.s.max_num_timeout
                if self.s.python:
                    kwargs["slurm_python"] = self.s.python
            ex = submitit.AutoExecutor(folder=self.folder / "%A", cluster=self.s.cluster, **kwargs)
            params: dict[str, Any] = {"timeout_min": self.s.timeout_min, "cpus_per_task": self.s.cpus_per_task,
                                      "mem_gb": float(self.s.mem_gb), "nodes": 1, "tasks_per_node": 1}
            if self.s.gpus_per_node:
                params["gpus_per_node"] = self.s.gpus_per_node
            if self.s.cluster == "slurm":
                for key in ("partition", "account", "qos", "constraint"):
                    if getattr(self.s, key):
                        params[f"slurm_{key}"] = getattr(self.s, key)
                params["slurm_array_parallelism"] = self.s.array_parallelism
                params["slurm_signal_delay_s"] = self.s.signal_delay_s
                if self.s.additional_parameters:
                    params["slurm_additional_parameters"] = dict(self.s.additional_parameters)
                if self.s.setup:
                    params["slurm_setup"] = list(self.s.setup)
            ex.update_parameters(**params)
            self._executor = ex
        return self._executor

    def _payload_settings(self) -> dict:
        return {"runs_dir": str(self.root), "device": self.s.device or "auto", "quiet": bool(self.quiet),
                "tracking": self.tracking, "save_weights": self.save_weights, "fuse": self.fuse,
                "timeout_min": self.s.timeout_min, "signal_delay_s": self.s.signal_delay_s,
                "max_num_timeout": self.s.max_num_timeout}

    def _submit_payload(self, packs: list[list[RunSpec]]) -> list:
        """Submit one job (one pack) or one job array (a task per pack) that runs the JSON payload of
        ``packs``; no pickle is written (the debug cluster calls the job function in this process)."""
        private_dir(self.folder, 0o755, "the SLURM folder", upto=self.dir)
        payload = write_payload(self.folder, self._payload_settings(), packs)
        ex = self._submitit()
        if self.s.cluster == "debug":  # in-process: the job function itself, no command, no pickle
            calls = [functools.partial(run_task, str(payload), i) for i in range(len(packs))]
            return ex.submit_array(calls) if len(calls) > 1 else [ex.submit(calls[0])]
        inner = ex._executor  # submitit's executor of the cluster (parameters already in its own names)
        command = f"{inner.python} -u -m peftbench.executors.slurm.job {shlex.quote(str(payload))}"
        if self.s.cluster != "slurm":  # submitit's local cluster: one process per task
            return [inner._submit_command(f"{command} --task {i}") for i in range(len(packs))]
        if len(packs) == 1:
            return [inner._submit_command(command)]
        array = submitit.SlurmExecutor(inner.folder, inner.max_num_timeout)  # as submitit submits its arrays
        array.update_parameters(**inner.parameters)
        array.parameters["map_count"] = len(packs)
        first = array._submit_command(command)
        return [submitit.SlurmJob(folder=inner.folder, job_id=f"{first.job_id}_{a}", tasks=list(range(first.num_tasks)))
                for a in range(len(packs))]

    def _query(self, job_ids: list[str]) -> dict[str, dict]:
        """{job id: {"state", "node"}} for the jobs that can be seen."""
        out = {}
        rest = []
        for jid in job_ids:
            job = self._jobs.get(jid)
            if job is not None and self.s.cluster != "slurm":
                out[jid] = {"state": self._submitit_state(job), "node": socket.gethostname()}
            else:
                rest.append(jid)
        if rest and self.s.cluster == "slurm":
            out.update(self._query_slurm(rest))
        return out

    def _query_slurm(self, job_ids: list[str]) -> dict[str, dict]:
        self._not_in_queue = set()
        return query_states(job_ids, not_in_queue=self._not_in_queue)

    @staticmethod
    def _submitit_state(job) -> str:
        """Local/debug submitit jobs: running or over (a debug job runs when asked); whether a run succeeded is
        what its record says, never a result pickle."""
        return "COMPLETED" if job.done() else "RUNNING"

    # -- one stage ----------------------------------------------------------------------------

    def run(self, specs: list[RunSpec], store: RunStore) -> list[dict]:
        by_key: dict[str, RunSpec] = {}
        for s in specs:
            by_key.setdefault(s.key, s)
        todo = []
        for key, s in by_key.items():
            if store.is_done(s):
                self._count(f"{s.label()}: done already, skipped")
            else:
                todo.append(s)
        job_of: dict[str, str] = {}  # key -> the job that runs it now
        if todo:
            attached = self._reattach(todo, store)
            job_of.update(attached)
            fresh = [s for s in todo if s.key not in attached]
            if fresh:
                job_of.update(self._submit(fresh, "stage"))
            self._wait(todo, job_of, store)
        return [store.load(s) or _missing_record(s) for s in specs]

    def _count(self, msg: str) -> None:
        self.done += 1
        self.log(f"[run {self.done}/{self.total or '?'}] {msg}")

    def _reattach(self, todo: list[RunSpec], store: RunStore) -> dict[str, str]:
        """Runs whose job (from the state file, or the record a job wrote) is still pending or running."""
        cands: dict[str, list[str]] = {}
        for s in todo:
            ids = []
            entry = self.state["runs"].get(s.key) or {}
            if entry.get("job_id"):
                ids.append(entry["job_id"])
            rec = store.load(s)
            jid = executor_info(rec).get("job_id")
            if jid and jid not in ids and rec.status == RunStatus.RUNNING:
                ids.append(jid)
            if ids:
                cands[s.key] = ids
        if not cands or self.s.cluster != "slurm":
            return {}
        states = self._query_slurm([j for ids in cands.values() for j in ids])
        attached = {}
        for s in todo:
            for jid in cands.get(s.key, []):
                st = (states.get(jid) or {}).get("state")
                if is_active(st):
                    attached[s.key] = jid
                    self._track(s, jid, state=st)
                    self.log(f"[slurm] {s.label()}: re-attached to job {jid} ({st}) submitted by an earlier driver")
                    break
            else:
                ids = cands.get(s.key) or []
                rec = store.load(s)
                if ids and (rec is None or rec.status == RunStatus.RUNNING):
                    # its job ended while no driver watched, without a final record: note it, submit again
                    st = (states.get(ids[0]) or {}).get("state") or "(unknown to SLURM)"
                    self._note_retry(s, store, ids[0], st, "resubmitted by a restarted driver", counted=False)
        self._save_state()
        return attached

    def _track(self, spec: RunSpec, job_id: str, state: str = "SUBMITTED") -> None:
        self.driver.track(spec, job_id, state)

    def _submit(self, specs: list[RunSpec], why: str) -> dict[str, str]:
        """One job array for ``specs`` (packs of ``pack`` runs per task; with ``--fuse K``, of ``pack`` fused
        groups of up to K runs) → {key: job id}."""
        ex = self._submitit()
        units = plan_groups(specs, self.fuse)  # one run each without --fuse
        packs = [[s for unit in units[i:i + self.s.pack] for s in unit] for i in range(0, len(units), self.s.pack)]
        stages = sorted({s.stage for s in specs})
        ex.update_parameters(name=f"{self.s.job_name}-{stages[0] if len(stages) == 1 else 'mixed'}")
        try:
            jobs = self._submit_payload(packs)
        except PayloadError:
            raise
        except Exception as exc:  # sbatch refused it: bad partition/account/qos, limits, ...
            msg = str(exc).strip().splitlines()
            raise SettingsError(f"could not submit {len(packs)} job(s) for the {why} ({self.s.describe()}): "
                         + " ".join(m.strip() for m in msg if m.strip())[-800:]) from None
        out = {}
        for job, pack in zip(jobs, packs):
            jid = str(job.job_id)
            self._jobs[jid] = job
            self._submitted_at[jid] = time.time()
            for s in pack:
                out[s.key] = jid
                self._track(s, jid)
        self._save_state()
        array = sorted({j.split("_")[0] for j in out.values()})
        self.log(f"[slurm] {why}: {len(specs)} run(s) in {len(jobs)} job(s) → "
                 f"{'array ' if len(jobs) > 1 else 'job '}{', '.join(array)}"
                 + (f" (≤{min(self.s.array_parallelism, len(jobs))} at once)" if len(jobs) > 1 else "")
                 + f"; logs in {self.folder}")
        return out

    def _settled_by_record(self, rec: RunRecord | None, job_id: str) -> bool:
        if rec is None:
            return False
        if rec.is_final:
            return True
        # a failed record counts only when this job wrote it (not one left from an earlier sweep)
        return rec.status == RunStatus.FAILED and executor_info(rec).get("job_id") == job_id \
            and rec.ended_at is not None

    def _wait(self, todo: list[RunSpec], job_of: dict[str, str], store: RunStore) -> None:
        spec = {s.key: s for s in todo}
        pending = set(spec)
        ended_at: dict[str, float] = {}
        last_summary, last_print = "", 0.0
        try:
            while pending:
                jobs = sorted({job_of[k] for k in pending})
                states = self._query(jobs)
                changed = False
                for jid in jobs:
                    st = (states.get(jid) or {}).get("state")
                    if st is None and jid in self._not_in_queue:
                        # neither sacct nor squeue knows it (squeue answered): gone, e.g. purged while
                        # accounting is off; a slow or failing controller does not count
                        self._unknown_polls[jid] = self._unknown_polls.get(jid, 0) + 1
                        age = time.time() - self._submitted_at.get(jid, time.time() - 3600)
                        if self._unknown_polls[jid] >= self.vanish_polls and age > 60:
                            st = VANISHED
                    else:
                        self._unknown_polls.pop(jid, None)
                    for k in [k for k in pending if job_of[k] == jid]:
                        entry = self.state["runs"].get(k, {})
                        if st and entry.get("state") != st:
                            entry.update(state=st, state_at=now())
                            changed = True
                        rec = store.load(spec[k])
                        if self._settled_by_record(rec, jid):
                            pending.discard(k)
                            entry.update(result=str(rec.status), state_at=now())
                            changed = True
                            self._report(spec[k], rec, jid)
                            continue
                        if st is None or is_active(st):
                            continue
                        if st == "COMPLETED":
                            first = ended_at.setdefault(jid, time.time())
                            grace = self.completed_grace_s if self.s.cluster == "slurm" else 0.0
                            if time.time() - first < grace:
                                continue
                        # the job is over and left no final record for this run
                        pending.discard(k)
                        changed = True
                        if not self._retry(spec[k], jid, st, store):
                            continue
                        pending.add(k)
                self._flush_retries(job_of)
                self._check_pending(job_of, pending, states)
                if changed:
                    self._save_state()
                summary = self._summary(pending, job_of, states)
                if pending and (summary != last_summary or time.time() - last_print > 300):
                    self.log(f"[slurm] waiting for {len(pending)} run(s): {summary}")
                    last_summary, last_print = summary, time.time()
                if pending:
                    time.sleep(self.s.poll_s)
        except KeyboardInterrupt:
            live = sorted({job_of[k] for k in pending})
            self._save_state()
            self.log(f"[slurm] driver stopped; {len(live)} job(s) keep running: {' '.join(live)}. Run the same "
                     "command again to re-attach to them, or cancel them with: scancel " + " ".join(live))
            raise
        finally:
            self._save_state()

    def _check_pending(self, job_of: dict[str, str], pending: set[str], states: dict) -> None:
        """Jobs whose pending reason says the request can never be met: after ``hopeless_after_s`` of it,
        cancel them and stop, naming the request and the flags that change it."""
        waiting = sorted({job_of[k] for k in pending if (states.get(job_of[k]) or {}).get("state") == "PENDING"})
        if not waiting or self.s.cluster != "slurm":
            return
        reasons = self._pending_reasons(waiting)
        now_s = time.time()
        bad = {}
        for jid in waiting:
            r = reasons.get(jid)
            if hopeless(r):
                first = self._hopeless_since.setdefault(jid, now_s)
                if now_s - first >= self.hopeless_after_s:
                    bad[jid] = r
            else:
                self._hopeless_since.pop(jid, None)
        if not bad:
            return
        jobs = sorted(bad)
        subprocess.run(["scancel", *sorted({j.split("_")[0] for j in jobs})], capture_output=True, timeout=60)
        reason = sorted(set(bad.values()))
        raise SettingsError(
            f"SLURM cannot schedule job(s) {', '.join(jobs[:5])}{' ...' if len(jobs) > 5 else ''}: pending reason "
            f"{' / '.join(reason)} for over {self.hopeless_after_s:.0f} s; the request ({self.s.describe()}) does not "
            "fit the cluster. Change it with --cpus-per-task, --mem-gb, --gpus-per-node, --timeout-min, "
            "--executor-set partition=/account=/qos= (or the profile's keys); `sinfo -o '%P %c %m %G %l'` shows "
            "what the partitions offer. The jobs were cancelled; finished runs are kept.")

    def _pending_reasons(self, job_ids: list[str]) -> dict[str, str]:
        return pending_reasons(job_ids)

    def _summary(self, pending: set[str], job_of: dict[str, str], states: dict) -> str:
        c = Counter((states.get(job_of[k]) or {}).get("state", "SUBMITTED") for k in pending)
        held = [s for s in c if s in HELD_STATES]
        return ", ".join(f"{n} {s.lower()}" for s, n in sorted(c.items())) + \
            (f" (held jobs need `scontrol release`/`resume`: {', '.join(held)})" if held else "")

    def _report(self, spec: RunSpec, rec: RunRecord, job_id: str) -> None:
        top1 = rec.top1
        slurm = executor_info(rec)
        self._count(f"{spec.label()}: {rec.status}" + (f" top1 {top1:.2f}" if top1 is not None else "")
                    + f" (job {job_id}" + (f", {slurm['restart_count']} restart(s)" if slurm.get("restart_count") else "")
                    + (f", {rec.wall_s:.1f}s" if rec.wall_s else "") + ")"
                    + (f"\n    {rec.error.strip().splitlines()[-1]}" if rec.error else ""))

    # -- failures -----------------------------------------------------------------------------

    def _log_tail(self, job_id: str, n: int = 15) -> str:
        try:
            path = submitit.core.utils.JobPaths(self.folder / "%A", job_id=job_id).stderr
            lines = path.read_text(errors="replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return ""

    def _note_retry(self, spec: RunSpec, store: RunStore, job_id: str, state: str, reason: str,
                    counted: bool = True, give_up: bool = False) -> RunRecord:
        rec = store.load(spec) or RunRecord.for_spec(spec, status=RunStatus.FAILED)
        entry = {"at": now(), "job_id": job_id, "state": state, "reason": reason}
        if counted:
            entry["retry"] = self.retries_used.get(spec.key, 0)
        retries = rec.extra.setdefault("retries", [])
        if not give_up:
            retries.append(entry)
        tail = self._log_tail(job_id)
        rec.status = RunStatus.FAILED
        rec.error = (f"SLURM job {job_id} ended {state} without a result; {reason}"
                     + (f"\n--- end of the job's log ({self.folder}):\n{tail}" if tail else ""))
        if give_up:
            rec.ended_at = now()
        store.write(spec, rec)
        return rec

    def _retry(self, spec: RunSpec, job_id: str, state: str, store: RunStore) -> bool:
        """Resubmit a run whose job died; False (and a failed record) once max_retries are used."""
        used = self.retries_used.get(spec.key, 0)
        if used >= self.s.max_retries:
            self._note_retry(spec, store, job_id, state,
                             f"gave up after {used} retr{'y' if used == 1 else 'ies'} (max_retries={self.s.max_retries}); "
                             "run the same command again to try once more", give_up=True)
            self._count(f"{spec.label()}: failed (job {job_id} ended {state}; no retries left)")
            return False
        self.retries_used[spec.key] = used + 1
        self._note_retry(spec, store, job_id, state,
                         f"resubmitted (retry {used + 1} of {self.s.max_retries})")
        self.log(f"[slurm] {spec.label()}: job {job_id} ended {state} without a result; "
                 f"resubmitting (retry {used + 1}/{self.s.max_retries})")
        self._retry_queue.append(spec)
        return True

    def _flush_retries(self, job_of: dict) -> None:
        queue, self._retry_queue = self._retry_queue, []
        if queue:
            job_of.update(self._submit(queue, "retry"))


def _missing_record(spec: RunSpec) -> RunRecord:
    return RunRecord.for_spec(spec, status=RunStatus.FAILED, error="no record was written")
