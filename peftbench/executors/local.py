"""``--executor local``: the runs of each stage on this machine, one after the other in this process, or in
parallel worker processes (``--workers N``, ``--devices cuda:0,cuda:1,...``).

Workers are ``spawn``-ed processes, each with its own pipe to the driver and bound to one device for its
life (``--devices`` round-robin; CPU workers get ``cores / N`` torch threads each). The
driver hands out the runs of the current stage; a worker trains one at a time through
:func:`_execute_group`, under the run's lease (``peftbench.store.leases``), so workers, other drivers and
SLURM jobs sharing the run store never train a run twice. Workers send their progress lines to the
driver, which prints them as one view (``[w2 cuda:1] ...``) with its own ``[run i/N]`` lines. A worker that
dies (killed, out of memory) takes down only the run it was training (no pool is shared: the other workers'
runs go on); it is replaced, its run's lease is then dead, so the next free worker takes the run over and
resumes it from its checkpoint; a run whose worker died twice is recorded as failed.

With ``--fuse K`` (``Env.fuse``) the unit of work is a fused group: up to K runs of a stage that differ only
in lr / wd, trained as one model (:mod:`peftbench.train.fused`); in this process or in a worker alike.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from typing import TYPE_CHECKING, Callable

from ..errors import SettingsError
from ..store import RunRecord, RunSpec, RunStatus, RunStore
from ._base import ExecutorPlugin, Setting, register_executor

if TYPE_CHECKING:
    from ..train.env import Env

MAX_WORKER_DEATHS = 2  # a run whose worker died this many times is recorded as failed


def _execute_group(specs: list[RunSpec], store: RunStore, env: "Env", *, wait: bool = False,
                   poll_s: float = 5.0) -> list[tuple[RunRecord | None, bool]]:
    """Train a group of runs of one stage here (one run, or a fused group: :func:`LocalExecutor.groups`):
    ``(record, ran_here)`` per spec, ``(None, False)`` for a run another live process holds (``wait=True``,
    a single run: wait for it). The one place where the local executor and its workers execute runs."""
    from ..train.engine import execute_claimed, execute_group  # (torch is imported when runs start)

    if len(specs) > 1:
        return execute_group(specs, store, env)
    return [execute_claimed(spec, store, env, wait=wait, poll_s=poll_s) for spec in specs]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LocalExecutor:
    """Runs the specs of a stage one after the other in this process (``workers`` 1), or in ``workers``
    worker processes on ``devices`` (round-robin; default: the env's device)."""

    def __init__(self, env: "Env", total: int | None = None, workers: int = 1, devices: list[str] | None = None,
                 initializer: Callable[["Env"], None] | None = None):
        self.env = env
        self.total = total
        self.done = 0
        self.trained = 0  # runs executed (not skipped) by this process or its workers, and their time
        self.trained_s = 0.0
        self.poll_s = 5.0  # how often a run another driver holds is looked at again
        self.devices = list(devices) if devices else [env.device]
        self.workers = max(1, int(workers), len(devices or []))
        # called in each worker with its Env before its first run (picklable: a module-level function): plugins
        # registered in-process, epoch listeners and callbacks (the driver's own Env lists do not reach workers)
        self.initializer = initializer
        self._workers: list[_Worker] = []
        self._spawn: tuple = ()
        self._events = None
        self._reader: threading.Thread | None = None

    def _prefix(self) -> str:
        progress = self.env.progress
        if progress is not None and hasattr(progress, "prefix"):
            return progress.prefix()  # with the sweep's ETA (peftbench.sweep.progress)
        from ..train.loop import fmt_s

        left = ""
        if self.total and self.trained:
            rest = self.total - self.done + 1
            left = f", sweep left ~{fmt_s(self.trained_s / self.trained * rest / min(self.workers, max(rest, 1)))}"
        return f"[run {self.done}/{self.total or '?'}{left}]"

    def run(self, specs: list[RunSpec], store: RunStore) -> list[RunRecord]:
        """The records of ``specs`` (finished runs are not rerun); a run another live process holds is left
        to it and collected at the end (or taken over if its holder dies)."""
        if self.workers > 1:
            return self._run_pool(specs, store)
        out: dict[int, RunRecord] = {}
        deferred: list[int] = []
        for idx in self.groups(specs, list(range(len(specs)))):
            recs = self._group([specs[i] for i in idx], store) if len(idx) > 1 else \
                [self._one(specs[idx[0]], store, wait=False)]
            for i, rec in zip(idx, recs):
                if rec is None:
                    deferred.append(i)
                else:
                    out[i] = rec
        for i in deferred:
            out[i] = self._one(specs[i], store, wait=True, counted=True)
        return [out[i] for i in range(len(specs))]

    # -- in this process -----------------------------------------------------------------------

    def _group(self, group: list[RunSpec], store: RunStore) -> list[RunRecord | None]:
        """A fused group, in this process."""
        first = self.done + 1
        todo = [s for s in group if not store.is_done(s)]
        for s in group:
            self.done += 1
            if s not in todo:
                self._progress(s, ran=False, seconds=0.0)
                self.env.prefix = self._prefix()
                self.env.log(f"{self.env.prefix} {s.label()}: done already, skipped", detail=True)
        self.env.prefix = self._prefix().replace(f"[run {self.done}/", f"[runs {first}-{self.done}/", 1)
        if len(todo) > 1:
            self.env.log(f"{self.env.prefix} {len(todo)} runs of {todo[0].method} on {todo[0].task} fused (lr, wd: "
                         + ", ".join(f"{s.hparams.get('lr')}/{s.hparams.get('wd')}" for s in todo) + ")")
        t0 = time.time()
        results = _execute_group(group, store, self.env)
        dt = time.time() - t0
        recs: list[RunRecord | None] = []
        for spec, (rec, ran) in zip(group, results):
            if spec in todo:
                # the group's time is shared by the runs it trained (the progress view and the ETA)
                recs.append(self._report(spec, rec, ran, dt / max(1, len(todo)), "fused, "))
            else:
                recs.append(rec)
        return recs

    def _one(self, spec: RunSpec, store: RunStore, *, wait: bool, counted: bool = False) -> RunRecord | None:
        if not counted:
            self.done += 1
        old = store.load(spec)
        if hasattr(self.env.progress, "run_started"):
            self.env.progress.run_started(spec)
        self.env.prefix = self._prefix()
        if old is not None and old.is_final:
            self._progress(spec, ran=False)
            self.env.log(f"{self.env.prefix} {spec.label()}: done already, skipped", detail=True)
            return old
        t0 = time.time()
        ((rec, ran),) = _execute_group([spec], store, self.env, wait=wait, poll_s=self.poll_s)
        return self._report(spec, rec, ran, time.time() - t0)

    def _report(self, spec: RunSpec, rec: RunRecord | None, ran: bool, seconds: float, where: str = "") -> RunRecord | None:
        if rec is None:
            self._progress(spec, ran=False, taken_back=True, seconds=seconds if where else None)
            self.env.log(f"{self.env.prefix} {spec.label()}: another driver trains it; coming back to it later")
            return None
        if not ran:
            self._progress(spec, ran=False, seconds=seconds if where else None)
            self.env.log(f"{self.env.prefix} {spec.label()}: done by another driver ({rec.status})")
            return rec
        self.trained += 1
        self.trained_s += seconds
        self._progress(spec, ran=True, seconds=seconds if where else None)
        self.env.log(f"{self._prefix()} {spec.label()}: {rec.status}"
                     + (f" top1 {rec.top1:.2f}" if rec.top1 is not None else "")
                     + f" ({where}{seconds:.1f}s)"
                     + (f"\n    {rec.error.strip().splitlines()[-1]}" if rec.error else ""))
        return rec

    def _progress(self, spec: RunSpec, *, ran: bool, taken_back: bool = False, seconds: float | None = None) -> None:
        """Tell the sweep's progress view (``seconds``: a run a worker trained, in that many seconds)."""
        progress = self.env.progress
        if not hasattr(progress, "run_finished"):
            return
        if taken_back:  # deferred to the end: it is planned again then
            if seconds is not None:  # the view never saw it start
                progress.run_started(spec)
            progress.run_deferred(spec)
        elif seconds is not None:  # from a worker or a fused group: the workers share the wall time
            progress.run_finished_elsewhere(spec, seconds / self.workers, ran=ran)
        else:
            progress.run_finished(spec, ran=ran)

    # -- in worker processes -------------------------------------------------------------------

    def _worker_settings(self) -> dict:
        # the env's plain settings (quiet, save_weights, checkpoint_every, ...): callbacks and caches stay here
        # (and its trackers as plain data: each worker makes its own tracker hooks from them)
        settings = {f.name: getattr(self.env, f.name) for f in dataclasses.fields(self.env)
                    if f.name not in ("device", "prefix") and not f.name.startswith("_")
                    and isinstance(getattr(self.env, f.name), (bool, int, float, str, type(None)))}
        settings["tracking"] = getattr(self.env, "tracking", None)
        return settings

    def _start_workers(self) -> list["_Worker"]:
        if not self._workers:
            ctx = multiprocessing.get_context("spawn")
            if self._events is None:
                self._events = ctx.Queue()
                self._reader = threading.Thread(target=self._read_events, name="worker progress", daemon=True)
                self._reader.start()
            threads = max(1, cores() // self.workers)
            self._spawn = (ctx, self._worker_settings(), threads)
            self._workers = [self._new_worker(w + 1, self.devices[w % len(self.devices)]) for w in range(self.workers)]
            self.env.log(f"[local] {self.workers} workers on {', '.join(sorted(set(self.devices)))}"
                         + (f", {threads} torch thread(s) each" if any(d == "cpu" for d in self.devices) else ""))
        return self._workers

    def _new_worker(self, number: int, device: str) -> "_Worker":
        ctx, settings, threads = self._spawn
        return _Worker(ctx, number, device, self._events, settings, threads, self.initializer)

    def _read_events(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                return
            self.env.log(*item)

    def groups(self, specs: list[RunSpec], indices: list[int]) -> list[list[int]]:
        """The runs of a stage executed together: fused groups of up to ``env.fuse`` runs that differ only
        in lr / wd (:func:`peftbench.train.fused.group_indices`), every other run alone."""
        if self.env.fuse <= 1 or len(indices) < 2:
            return [[i] for i in indices]
        from ..train.fused import group_indices

        return [[indices[j] for j in g] for g in group_indices([specs[i] for i in indices], self.env.fuse)]

    def _run_pool(self, specs: list[RunSpec], store: RunStore) -> list[RunRecord]:
        """The stage's runs on the worker processes: each worker trains one group at a time, sent to it through
        its own pipe. A worker that dies takes down only the group it was training (which is handed out again,
        to resume from its checkpoint, unless that run's worker died :data:`MAX_WORKER_DEATHS` times); a new
        worker takes its place. The other workers' runs go on untouched."""
        out: dict[int, RunRecord] = {}
        fresh: list[int] = []
        for i, spec in enumerate(specs):
            old = store.load(spec)
            if old is not None and old.is_final:
                self.done += 1
                self._progress(spec, ran=False, seconds=0.0)
                self.env.prefix = self._prefix()
                self.env.log(f"{self.env.prefix} {spec.label()}: done already, skipped", detail=True)
                out[i] = old
            else:
                fresh.append(i)
        todo: list[tuple[list[int], bool]] = [(g, False) for g in self.groups(specs, fresh)]  # (group, wait)
        deaths: dict[str, int] = {}
        workers = self._start_workers()
        try:
            while todo or any(w.job is not None for w in workers):
                for w in workers:
                    if w.job is None and todo:
                        w.give(todo.pop(0), specs, str(store.root), self.poll_s)
                busy = [w for w in workers if w.job is not None]
                multiprocessing.connection.wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
                for n, w in enumerate(workers):
                    if w.job is None:
                        continue
                    group, wait = w.job
                    reply = w.reply()
                    if reply is None:
                        continue  # still training
                    w.job = None
                    if reply[0] == "ok":
                        for i, (raw, ran, seconds, where) in zip(group, reply[1]):
                            self._finish(specs[i], i, raw, ran, seconds, where, wait, out, todo)
                    elif reply[0] == "error":  # a bug outside any run (a run's own errors are in its record)
                        raise RuntimeError(f"worker w{w.number} ({w.device}) failed:\n{reply[1]}")
                    else:  # the worker died: this group alone comes back
                        again = []
                        for i in group:
                            deaths[specs[i].key] = deaths.get(specs[i].key, 0) + 1
                            if deaths[specs[i].key] < MAX_WORKER_DEATHS:
                                again.append(i)
                            else:
                                self._finish(specs[i], i, _worker_died(specs[i], store, deaths[specs[i].key]).to_dict(),
                                             True, 0.0, "", wait, out, todo)
                        if again:
                            todo.insert(0, (again, wait))
                        self.env.log(f"[local] a worker process died (w{w.number} on {w.device}, exit code "
                                     f"{w.proc.exitcode}, training {', '.join(specs[i].label() for i in group)}); "
                                     "a new worker takes its place"
                                     + ("; the run resumes from its checkpoint" if again else ""))
                        w.close(kill=True)
                        workers[n] = self._new_worker(w.number, w.device)
        except BaseException:
            self._stop_workers(kill=True)
            raise
        self._workers = workers
        return [out[i] for i in range(len(specs))]

    def _finish(self, spec, i, raw, ran, seconds, where, wait, out, todo) -> None:
        if not wait:
            self.done += 1
        self.env.prefix = self._prefix()
        rec = self._report(spec, RunRecord.from_dict(raw) if raw is not None else None, ran, seconds, where)
        if rec is None:
            todo.append(([i], True))  # another driver's: wait for it once this stage's own runs are done
        else:
            out[i] = rec

    def _stop_workers(self, kill: bool = False) -> None:
        for w in self._workers:
            w.close(kill=kill)
        self._workers = []

    def close(self) -> None:
        self._stop_workers()
        if self._events is not None:
            self._events.put(None)
            if self._reader is not None:
                self._reader.join(timeout=5)
            self._events = None


class _Worker:
    """One worker process and the pipe it gets its work from (one group at a time) and answers through."""

    def __init__(self, ctx, number: int, device: str, events, settings: dict, threads: int, initializer):
        self.number, self.device = number, device
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, name=f"peftbench worker {number}",
                                args=(child, number, device, events, settings, threads, initializer))
        self.proc.start()
        child.close()
        self.job: tuple[list[int], bool] | None = None

    def give(self, job: tuple[list[int], bool], specs: list[RunSpec], runs_dir: str, poll_s: float) -> None:
        group, wait = job
        self.job = job
        try:
            self.conn.send(([specs[i].to_dict() for i in group], runs_dir, wait, poll_s))
        except OSError:  # already dead: reply() says so
            pass

    def reply(self) -> tuple | None:
        """``("ok", results)``, ``("error", traceback)``, ``("died",)``, or None while the group trains."""
        try:
            if self.conn.poll():
                return self.conn.recv()
        except (EOFError, OSError):
            return ("died",)
        if not self.proc.is_alive():
            return ("died",)
        return None

    def close(self, kill: bool = False) -> None:
        if not kill and self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        self.conn.close()


def _worker_died(spec: RunSpec, store: RunStore, times: int) -> RunRecord:
    rec = store.load(spec) or RunRecord.for_spec(spec)
    rec.status = RunStatus.FAILED
    rec.error = (f"the worker process training this run died {times} times (killed, out of memory, or a crash in "
                 "native code); run the same command again to try once more")
    store.write(spec, rec)
    return rec


# ---------------------------------------------------------------------------------------------
# inside a worker process
# ---------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _worker_main(conn, number: int, device: str, events, settings: dict, threads: int, initializer) -> None:
    """A worker process: set up, then train the groups its driver sends until it sends None."""
    import traceback

    try:
        _init_worker(number, device, events, settings, threads, initializer)
    except BaseException:  # noqa: BLE001 - the driver reports it
        conn.send(("error", traceback.format_exc(limit=20)))
        return
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return  # the driver is gone or stopping
        if job is None:
            return
        try:
            result = ("ok", _work(*job))
        except Exception:  # noqa: BLE001 - outside any run (a run's own errors are recorded in the run)
            result = ("error", traceback.format_exc(limit=20))
        conn.send(result)


def _init_worker(number: int, device: str, events, settings: dict, threads: int, initializer) -> None:
    """Bind this worker to its device and thread count; its log lines go to the driver."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    from ..train.env import Env

    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))

    class WorkerEnv(Env):
        def log(self, msg: str, detail: bool = False) -> None:
            if not self.quiet:
                events.put((msg, detail))

    tag = f"[w{number} {device}]"
    from ..trackers import hooks_for

    env = WorkerEnv(device=device, prefix=tag, **settings)
    env.hooks = hooks_for(env.tracking)  # the sweep's trackers, in this worker
    if initializer is not None:
        initializer(env)
    _WORKER.update(env=env, tag=tag)


def _work(spec_dicts: list[dict], runs_dir: str, wait: bool, poll_s: float) -> list[tuple]:
    """Train a group of runs in this worker: per spec (record dict or None, ran here, seconds, where)."""
    env, tag = _WORKER["env"], _WORKER["tag"]
    specs = [RunSpec.from_dict(d) for d in spec_dicts]
    t0 = time.time()
    env.prefix = tag
    results = _execute_group(specs, RunStore(runs_dir), env, wait=wait, poll_s=poll_s)
    seconds = (time.time() - t0) / max(1, len(specs))
    return [(rec.to_dict() if rec is not None else None, ran, seconds, f"{tag[1:-1]}, ") for rec, ran in results]


# ---------------------------------------------------------------------------------------------
# the plugin
# ---------------------------------------------------------------------------------------------


def _devices(text: str) -> list[str]:
    return [d.strip() for d in text.split(",") if d.strip()]


@register_executor
class Local(ExecutorPlugin):
    name = "local"
    description = "run here: one run after the other, or in parallel worker processes (--workers, --devices)"
    fuses = True

    settings = {"workers": Setting((int,), "worker processes training runs at a time (default 1: in the driver's "
                                          "process); on CPU each worker gets cores/N torch threads", min=1, max=1024),
                "devices": Setting((list,), "one worker per device, e.g. [\"cuda:0\", \"cuda:1\"] (with workers = N: N "
                                            "workers on these devices, round-robin)")}
    generic = {"workers": "workers", "devices": "devices"}

    def resolve(self, values):
        from ..train.env import check_device

        out = dict(values)
        devices = out.get("devices")
        if devices is not None:
            if isinstance(devices, str):
                devices = _devices(devices)
            if not devices or not all(isinstance(d, str) for d in devices):
                raise SettingsError(f"devices {devices!r}: a list of devices, e.g. cuda:0,cuda:1")
            out["devices"] = [check_device(d, "--devices") for d in devices]
        return out

    def make(self, settings, *, env, runs_dir, total):
        return LocalExecutor(env, total=total, workers=settings.get("workers") or 1, devices=settings.get("devices"))
