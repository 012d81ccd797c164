"""SLURM execution through submitit: one job array per stage, checkpointable jobs, bounded retries.

``peftbench run --executor slurm`` hands each stage of a sweep (one ``Executor.run(specs, store)``
call of :func:`peftbench.sweep.drive`) to :class:`SlurmExecutor`, which

* submits the stage's unfinished runs as **one submitit job array** (``--pack N`` puts N runs into
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

Inside the job, :class:`RunJob` (a submitit ``Checkpointable``) runs its specs with
:func:`peftbench.engine.execute` on the job's device (cuda when available, else cpu; bf16 autocast on
CUDA). On preemption or time limit submitit calls ``RunJob.checkpoint()``, which resubmits the same
callable; the requeued job resumes every unfinished run from its per-epoch checkpoint
(``<key>.ckpt.pt``). Each job start is recorded in the run record's ``slurm`` field (job id, array
task id, node, restart count, the epoch it resumed from).

Settings come from a TOML profile (``--slurm-profile FILE``) and flags; see :data:`PROFILE_KEYS` and
docs/slurm.md.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import submitit

from .store import FINAL_STATUSES, RunSpec, RunStore, atomic_write_text

STATE_DIR = ".slurm"
STATE_FILE = "state.json"
LOCK_FILE = "driver.lock"

# SLURM job states (sacct/squeue). ACTIVE: the job may still produce a record, keep waiting.
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "SPECIAL_EXIT", "CONFIGURING",
                 "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
                 "POWER_UP_NODE", "UPDATE_DB"}
HELD_STATES = {"REQUEUE_HOLD", "SPECIAL_EXIT", "RESV_DEL_HOLD", "STOPPED", "SUSPENDED"}
# Anything else the scheduler reports is terminal: COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL,
# OUT_OF_MEMORY, PREEMPTED, BOOT_FAIL, DEADLINE, REVOKED, plus our own VANISHED (SlurmExecutor._wait).
UNKNOWN = "UNKNOWN"
VANISHED = "VANISHED"


def _error(msg: str) -> Exception:
    """A user error (``peftbench ...: error: msg``, exit 2); imported late so `status` stays light."""
    from .sweep import SettingsError

    return SettingsError(msg)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------------------------------------
# settings: defaults < profile (TOML) < --slurm-set KEY=VALUE < named flags
# ---------------------------------------------------------------------------------------------

# key: (accepted types, description). The profile may use exactly these keys.
PROFILE_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "partition": ((str,), "partition (sbatch --partition); default: the cluster's default partition"),
    "account": ((str,), "account to charge (sbatch --account)"),
    "qos": ((str,), "quality of service (sbatch --qos)"),
    "constraint": ((str,), "node features, e.g. 'a100|h100' (sbatch --constraint)"),
    "gpus_per_node": ((int,), "GPUs per job; one run per GPU (0 = CPU jobs)"),
    "cpus_per_task": ((int,), "CPUs per job; also torch's thread count in the job"),
    "mem_gb": ((int, float), "memory per job in GB"),
    "timeout_min": ((int,), "time limit per job in minutes; a job that reaches it is checkpointed and requeued"),
    "array_parallelism": ((int,), "at most this many tasks of a stage's array run at once"),
    "pack": ((int,), "runs per array task: >1 packs several short runs (search trials) into one job"),
    "max_retries": ((int,), "resubmissions per run and driver invocation when its job dies without a result"),
    "signal_delay_s": ((int,), "seconds before the time limit at which SLURM signals the job to checkpoint"),
    "max_num_timeout": ((int,), "requeues after reaching the time limit (submitit's slurm_max_num_timeout)"),
    "additional_parameters": ((dict,), "extra sbatch arguments {name = value} (submitit slurm_additional_parameters)"),
    "setup": ((list,), "shell lines run in the job script before python, e.g. 'module load cuda' (slurm_setup)"),
    "python": ((str,), "command that runs python in the job (default: this interpreter), e.g. for containers"),
    "job_name": ((str,), "job name prefix (the stage is appended)"),
    "folder": ((str,), "submitit folder for job scripts, pickles and logs (default <runs-dir>/.slurm/logs)"),
    "poll_s": ((int, float), "seconds between two looks at the queue"),
    "device": ((str,), "device inside the job: auto (cuda when available, else cpu), cuda, cuda:N or cpu"),
    "cluster": ((str,), "submitit backend: slurm; local or debug run the jobs on this machine (testing)"),
}


@dataclass
class SlurmSettings:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: float = 32.0
    timeout_min: int = 240
    array_parallelism: int = 64
    pack: int = 1
    max_retries: int = 2
    signal_delay_s: int = 120
    max_num_timeout: int = 3
    additional_parameters: dict = field(default_factory=dict)
    setup: list = field(default_factory=list)
    python: str | None = None
    job_name: str = "peftbench"
    folder: str | None = None
    poll_s: float = 15.0
    device: str = "auto"
    cluster: str = "slurm"
    sources: dict = field(default_factory=dict, repr=False)  # key -> where its value came from

    def describe(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in ("partition", "account", "qos", "constraint")
                 if getattr(self, k)]
        parts += [f"gpus_per_node={self.gpus_per_node}", f"cpus_per_task={self.cpus_per_task}",
                  f"mem_gb={self.mem_gb:g}", f"timeout_min={self.timeout_min}",
                  f"array_parallelism={self.array_parallelism}", f"pack={self.pack}",
                  f"max_retries={self.max_retries}"]
        if self.additional_parameters:
            parts.append("sbatch: " + " ".join(f"--{k.replace('_', '-')}={v}"
                                               for k, v in sorted(self.additional_parameters.items())))
        if self.cluster != "slurm":
            parts.append(f"cluster={self.cluster}")
        return ", ".join(parts)


def _check_value(key: str, value: Any, where: str) -> Any:
    if key not in PROFILE_KEYS:
        raise _error(f"{where}: unknown key {key!r} (known keys: {', '.join(sorted(PROFILE_KEYS))})")
    types, _ = PROFILE_KEYS[key]
    if isinstance(value, bool) or not isinstance(value, types):
        want = " or ".join("number" if t is float else {"int": "integer", "str": "string", "dict": "table",
                                                         "list": "list of strings"}[t.__name__] for t in types)
        raise _error(f"{where}: key {key!r} must be a {want}, got {value!r}")
    if key == "setup" and not all(isinstance(x, str) for x in value):
        raise _error(f"{where}: key 'setup' must be a list of strings, got {value!r}")
    if key == "additional_parameters":
        for k, v in value.items():
            if not isinstance(v, (str, int, float, bool)):
                raise _error(f"{where}: additional_parameters.{k} must be a string, number or boolean, got {v!r}")
    if key == "mem_gb":
        value = float(value)
    return value


def _tomllib():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise _error("SLURM profiles need Python >= 3.11 (tomllib) or the tomli package") from None
    return tomllib


def read_profile(path: str | Path) -> dict:
    """The keys of a TOML cluster profile, checked (an unknown key is an error naming file and key)."""
    tomllib = _tomllib()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _error(f"--slurm-profile {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _error(f"--slurm-profile {path}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise _error(f"--slurm-profile {path}: not valid TOML ({exc})") from None
    return {k: _check_value(k, v, f"profile {path}") for k, v in data.items()}


def _parse_set(item: str, flag: str) -> tuple[str, Any]:
    if "=" not in item:
        raise _error(f"{flag} {item!r}: expected KEY=VALUE")
    key, raw = (x.strip() for x in item.split("=", 1))
    return key, _toml_value(raw)


def _toml_value(raw: str) -> Any:
    """A TOML literal (10, 2.5, true, "x", ["a"]); anything else is a plain string."""
    tomllib = _tomllib()
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


# (argparse dest, profile key) of the named flags (defined in peftbench/commands/run.py)
FLAG_KEYS = {
    "slurm_partition": "partition", "slurm_account": "account", "slurm_qos": "qos",
    "slurm_constraint": "constraint", "slurm_gpus": "gpus_per_node", "slurm_cpus": "cpus_per_task",
    "slurm_mem_gb": "mem_gb", "slurm_timeout_min": "timeout_min",
    "slurm_array_parallelism": "array_parallelism", "slurm_max_retries": "max_retries", "pack": "pack",
}


def make_settings(profile: str | Path | None = None, sets: list[str] = (), flags: dict | None = None,
                  extra_args: list[str] = (), setup: list[str] = ()) -> SlurmSettings:
    """Defaults < profile < ``--slurm-set`` < named flags; ``--slurm-arg`` / ``--slurm-setup`` add to
    the profile's ``additional_parameters`` / ``setup``."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if profile:
        for k, v in read_profile(profile).items():
            values[k], sources[k] = v, str(profile)
    for item in sets:
        k, v = _parse_set(item, "--slurm-set")
        if k in PROFILE_KEYS and float in PROFILE_KEYS[k][0] and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        values[k], sources[k] = _check_value(k, v, f"--slurm-set {item!r}"), "--slurm-set"
    for k, v in (flags or {}).items():
        if v is not None:
            values[k], sources[k] = _check_value(k, float(v) if k == "mem_gb" else v, f"--{k}"), "flag"
    extra = dict(values.get("additional_parameters") or {})
    for item in extra_args:
        k, v = _parse_set(item, "--slurm-arg")
        extra[k.lstrip("-")] = v
    if extra:
        values["additional_parameters"] = _check_value("additional_parameters", extra, "--slurm-arg")
    if setup:
        values["setup"] = list(values.get("setup") or []) + list(setup)
    s = SlurmSettings(**values)
    s.sources = sources
    _validate(s)
    return s


def _validate(s: SlurmSettings) -> None:
    for key, low in (("gpus_per_node", 0), ("cpus_per_task", 1), ("timeout_min", 1), ("array_parallelism", 1),
                     ("pack", 1), ("max_retries", 0), ("signal_delay_s", 0), ("max_num_timeout", 0)):
        if getattr(s, key) < low:
            raise _error(f"SLURM setting {key}={getattr(s, key)} ({s.sources.get(key, 'default')}): must be >= {low}")
    if s.mem_gb <= 0 or s.poll_s <= 0:
        raise _error("SLURM settings mem_gb and poll_s must be > 0")
    if s.cluster not in ("slurm", "local", "debug"):
        raise _error(f"SLURM setting cluster={s.cluster!r}: expected slurm, local or debug")
    if s.signal_delay_s >= s.timeout_min * 60:
        raise _error(f"SLURM settings: signal_delay_s={s.signal_delay_s} must be well below timeout_min*60 "
                     f"({s.timeout_min * 60}); SLURM may signal up to 60 s earlier still")
    if s.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", s.device):
        raise _error(f"SLURM setting device={s.device!r}: expected auto, cpu, cuda or cuda:N")


def settings_from_args(args) -> SlurmSettings | None:
    """The SLURM settings of ``peftbench run`` (None for ``--executor local``, where SLURM flags are an error)."""
    flags = {key: getattr(args, dest, None) for dest, key in FLAG_KEYS.items()}
    given = [f"--{d.replace('_', '-')}" for d, k in FLAG_KEYS.items() if flags[k] is not None]
    given += [f for f, v in (("--slurm-profile", getattr(args, "slurm_profile", None)),
                             ("--slurm-set", getattr(args, "slurm_set", None)),
                             ("--slurm-arg", getattr(args, "slurm_arg", None)),
                             ("--slurm-setup", getattr(args, "slurm_setup", None))) if v]
    if getattr(args, "executor", "local") != "slurm":
        if given:
            raise _error(f"{', '.join(given)} only apply with --executor slurm")
        return None
    s = make_settings(args.slurm_profile, args.slurm_set or [], flags, args.slurm_arg or [], args.slurm_setup or [])
    if getattr(args, "device", None):
        s.device = args.device
        _validate(s)
    return s


# ---------------------------------------------------------------------------------------------
# inside the job
# ---------------------------------------------------------------------------------------------


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


def _checkpoint_epoch(store: RunStore, spec: RunSpec) -> int:
    """The epoch a run resumes from (0 when it has no checkpoint)."""
    path = store.checkpoint_path(spec)
    if not path.exists():
        return 0
    try:
        import torch

        return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"]) + 1
    except Exception:
        return 0


def mark_start(store: RunStore, spec: RunSpec, info: dict, resume_epoch: int, starts_in_job: int) -> None:
    """Put this job into the run's record (``slurm``) before the engine starts; the engine keeps it."""
    rec = store.load(spec) or {"key": spec.key, "spec": spec.to_dict(), "status": "running", "error": None}
    slurm = dict(rec.get("slurm") or {})
    restart = max(info["restart_count"], starts_in_job - 1)
    start = {"job_id": info["job_id"], "node": info["node"], "pid": os.getpid(), "restart_count": restart,
             "at": _now(), "resume_epoch": resume_epoch}
    slurm.update({k: v for k, v in info.items() if k != "restart_count"})
    slurm["restart_count"] = restart
    slurm["starts"] = list(slurm.get("starts") or [])[-19:] + [start]
    rec["slurm"] = slurm
    store.write(spec, rec)


def _execute(spec: RunSpec, store: RunStore, env) -> dict:
    from .engine import execute

    return execute(spec, store, env)


class RunJob(submitit.helpers.Checkpointable):
    """One array task: run its specs one after the other on the job's device.

    Checkpointable: on preemption or time limit submitit calls :meth:`checkpoint`, which resubmits
    this callable (with the keys it already finished); the requeued job resumes each unfinished run
    from the engine's per-epoch checkpoint. Exceptions inside a run are failed records (engine), so
    one bad run does not stop the others of the pack or of the array.
    """

    def __init__(self, specs: list[dict], runs_dir: str, device: str = "auto", quiet: bool = False):
        self.specs = [dict(s) for s in specs]
        self.runs_dir = str(runs_dir)
        self.device = device
        self.quiet = quiet
        self.finished: dict[str, str] = {}  # key -> status, kept through requeues (checkpoint pickles self)
        self.starts = 0

    def __call__(self) -> dict:
        import torch

        from .engine import Env

        self.starts += 1
        info = job_info()
        device = self.device if self.device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and cpus.isdigit():
            torch.set_num_threads(int(cpus))
        env = Env(device=device, quiet=self.quiet)
        store = RunStore(self.runs_dir)
        env.log(f"[{info['job_id']}] {len(self.specs)} run(s) on {info['node']} ({device}); "
                f"restart {info['restart_count']}, start {self.starts} of this job")
        for i, d in enumerate(self.specs):
            spec = RunSpec.from_dict(d)
            if spec.key in self.finished:
                continue
            env.prefix = f"[{info['job_id']} {i + 1}/{len(self.specs)}]"
            old = store.load(spec)
            if old is not None and old.get("status") in FINAL_STATUSES:
                self.finished[spec.key] = old["status"]
                continue
            mark_start(store, spec, info, _checkpoint_epoch(store, spec), self.starts)
            t0 = time.time()
            rec = _execute(spec, store, env)
            self.finished[spec.key] = rec["status"]
            env.log(f"{env.prefix} {spec.label()}: {rec['status']} ({time.time() - t0:.1f}s)")
        return dict(self.finished)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        print(f"[{job_info()['job_id']}] checkpoint: requeueing; unfinished runs resume from their last "
              f"epoch checkpoint ({len(self.finished)}/{len(self.specs)} done in this job)", file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# job states
# ---------------------------------------------------------------------------------------------


def _expand_job_ids(jid: str) -> list[str]:
    """``123``, ``123_4`` or ``123_[0-3,7%2]`` → the ids they stand for."""
    m = re.fullmatch(r"(\d+)_\[([^\]%]+)(%\d+)?\]", jid)
    if not m:
        return [jid]
    out = []
    for part in m.group(2).split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out += [f"{m.group(1)}_{i}" for i in range(int(a), int(b) + 1)]
        elif part:
            out.append(f"{m.group(1)}_{int(part)}")
    return out


def parse_state_lines(text: str) -> dict[str, dict]:
    """``JobID|State|NodeList`` lines (sacct -P / squeue -o) → {job id: {"state", "node"}}."""
    out: dict[str, dict] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0] or "." in parts[0] or parts[0] == "JobID":
            continue
        state = parts[1].split()[0].rstrip("+") if parts[1].strip() else UNKNOWN
        node = parts[2] if len(parts) > 2 and parts[2] not in ("", "None assigned", "(null)") else None
        for jid in _expand_job_ids(parts[0]):
            out[jid] = {"state": state, "node": node}
    return out


def slurm_available() -> bool:
    return shutil.which("squeue") is not None or shutil.which("sacct") is not None


def query_states(job_ids: list[str], timeout: float = 60, not_in_queue: set | None = None) -> dict[str, dict]:
    """Current state of SLURM jobs (``123`` or ``123_4``): sacct, then squeue for what sacct does not
    know (accounting off, or a record not yet in the database). Unknown ids are left out; those that
    squeue positively does not know (it answered, without them) are added to ``not_in_queue``."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    base = sorted({j.split("_")[0] for j in ids})
    found: dict[str, dict] = {}
    if shutil.which("sacct"):
        try:
            r = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,NodeList", "-j", ",".join(base)],
                               capture_output=True, text=True, timeout=timeout)
            if r.returncode == 0:
                found.update(parse_state_lines(r.stdout))
        except (OSError, subprocess.TimeoutExpired):
            pass
    missing = [j for j in ids if j not in found]
    if missing and shutil.which("squeue"):
        try:
            r = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T|%N",
                                "-j", ",".join(sorted({j.split("_")[0] for j in missing}))],
                               capture_output=True, text=True, timeout=timeout)
            answered = r.returncode == 0 or "Invalid job id" in r.stderr
            for jid, v in parse_state_lines(r.stdout if r.returncode == 0 else "").items():
                found.setdefault(jid, v)
            if answered and not_in_queue is not None:
                not_in_queue.update(j for j in missing if j not in found)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return {j: found[j] for j in ids if j in found}


def is_active(state: str | None) -> bool:
    return state in ACTIVE_STATES


# ---------------------------------------------------------------------------------------------
# the state file and the driver lock
# ---------------------------------------------------------------------------------------------


def state_path(runs_dir: str | Path) -> Path:
    return Path(runs_dir) / STATE_DIR / STATE_FILE


def read_state(runs_dir: str | Path) -> dict:
    path = state_path(runs_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("runs"), dict):
            return data
    except (OSError, ValueError):
        pass
    return {"version": 1, "runs": {}}


def driver_lock_holder(runs_dir: str | Path) -> dict | None:
    """Who holds the driver lock of ``runs_dir`` (None when no driver is running)."""
    path = Path(runs_dir) / STATE_DIR / LOCK_FILE
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(path.read_text() or "{}") or {"pid": "?"}
            except ValueError:
                return {"pid": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class _DriverLock:
    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                who = json.loads(self.path.read_text() or "{}")
            except ValueError:
                who = {}
            raise _error(f"another peftbench driver (pid {who.get('pid', '?')} on {who.get('host', '?')}, since "
                         f"{who.get('since', '?')}) is driving {self.path.parent.parent}; stop it first "
                         "(its jobs keep running and a new driver re-attaches to them)") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------------------------
# the driver side
# ---------------------------------------------------------------------------------------------


class SlurmExecutor:
    """Runs each stage as one submitit job array and waits for it (the :class:`~peftbench.sweep.Executor`
    protocol). See the module docstring for the behaviour on restart, preemption and failures."""

    completed_grace_s = 30.0  # a COMPLETED job whose record is not final yet (shared FS lag) gets this long
    vanish_polls = 5  # a job neither sacct nor squeue knows for this many polls (and 60 s) is VANISHED

    def __init__(self, settings: SlurmSettings, runs_dir: str | Path, *, quiet: bool = False,
                 total: int | None = None, log: Callable[[str], None] | None = None, argv: list[str] | None = None):
        self.s = settings
        self.root = Path(runs_dir).resolve()
        self.dir = self.root / STATE_DIR
        self.folder = Path(settings.folder).resolve() if settings.folder else self.dir / "logs"
        self.quiet = quiet
        self.total = total
        self.done = 0
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        if settings.cluster == "slurm" and not shutil.which("sbatch"):
            raise _error("--executor slurm: `sbatch` is not on PATH (is this a SLURM login node?)")
        self._lock = _DriverLock(self.dir / LOCK_FILE)
        self._lock.acquire()
        self.state = read_state(self.root)
        self.state["driver"] = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": _now(),
                                "argv": list(argv if argv is not None else sys.argv)}
        self._executor = None
        self._jobs: dict[str, Any] = {}  # job id -> submitit Job (jobs submitted by this driver)
        self._unknown_polls: dict[str, int] = {}
        self._not_in_queue: set[str] = set()
        self._submitted_at: dict[str, float] = {}
        self.retries_used: dict[str, int] = {}  # per run, for this driver invocation
        self._retry_queue: list[RunSpec] = []
        self._save_state()

    # -- plumbing -----------------------------------------------------------------------------

    def close(self) -> None:
        self._save_state()
        self._lock.release()

    def __del__(self):
        try:
            self._lock.release()
        except Exception:
            pass

    def log(self, msg: str) -> None:
        self._log(msg)

    def _save_state(self) -> None:
        self.state["updated_at"] = _now()
        atomic_write_text(self.dir / STATE_FILE, json.dumps(self.state, indent=1, sort_keys=True) + "\n")

    def _submitit(self):
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
        """Local/debug submitit jobs: done() runs a debug job; the result pickle tells success."""
        if not job.done():
            return "RUNNING"
        if getattr(job, "cancelled", False):
            return "CANCELLED"
        try:
            job.result()
            return "COMPLETED"
        except Exception:
            return "FAILED"

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
            rec = store.load(s) or {}
            jid = (rec.get("slurm") or {}).get("job_id")
            if jid and jid not in ids and rec.get("status") == "running":
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
                if ids and (rec is None or rec.get("status") == "running"):
                    # its job ended while no driver watched, without a final record: note it, submit again
                    st = (states.get(ids[0]) or {}).get("state") or "(unknown to SLURM)"
                    self._note_retry(s, store, ids[0], st, "resubmitted by a restarted driver", counted=False)
        self._save_state()
        return attached

    def _track(self, spec: RunSpec, job_id: str, state: str = "SUBMITTED") -> None:
        entry = self.state["runs"].setdefault(spec.key, {})
        entry.update({"method": spec.method, "task": spec.task, "stage": spec.stage, "label": spec.label(),
                      "record": f"{spec.method}/{spec.task}/{spec.key}.json", "job_id": job_id, "state": state,
                      "state_at": _now()})
        entry.setdefault("submitted_at", _now())
        jobs = entry.setdefault("jobs", [])
        if job_id not in jobs:
            jobs.append(job_id)
            del jobs[:-10]

    def _submit(self, specs: list[RunSpec], why: str) -> dict[str, str]:
        """One job array for ``specs`` (packs of ``pack`` runs per task) → {key: job id}."""
        ex = self._submitit()
        packs = [specs[i:i + self.s.pack] for i in range(0, len(specs), self.s.pack)]
        stages = sorted({s.stage for s in specs})
        ex.update_parameters(name=f"{self.s.job_name}-{stages[0] if len(stages) == 1 else 'mixed'}")
        calls = [RunJob([s.to_dict() for s in pack], str(self.root), self.s.device, self.quiet) for pack in packs]
        try:
            jobs = ex.submit_array(calls) if len(calls) > 1 else [ex.submit(calls[0])]
        except Exception as exc:  # sbatch refused it: bad partition/account/qos, limits, ...
            msg = str(exc).strip().splitlines()
            raise _error(f"could not submit {len(calls)} job(s) for the {why} ({self.s.describe()}): "
                         + " ".join(m.strip() for m in msg if m.strip())[-800:]) from None
        out = {}
        for job, pack in zip(jobs, packs):
            jid = str(job.job_id)
            self._jobs[jid] = job
            self._submitted_at[jid] = time.time()
            for s in pack:
                out[s.key] = jid
                self._track(s, jid)
                self.state["runs"][s.key]["submitted_at"] = _now()
        self._save_state()
        array = sorted({j.split("_")[0] for j in out.values()})
        self.log(f"[slurm] {why}: {len(specs)} run(s) in {len(jobs)} job(s) → "
                 f"{'array ' if len(jobs) > 1 else 'job '}{', '.join(array)}"
                 + (f" (≤{min(self.s.array_parallelism, len(jobs))} at once)" if len(jobs) > 1 else "")
                 + f"; logs in {self.folder}")
        return out

    def _settled_by_record(self, rec: dict | None, job_id: str) -> bool:
        if rec is None:
            return False
        if rec.get("status") in FINAL_STATUSES:
            return True
        # a failed record counts only when this job wrote it (not one left from an earlier sweep)
        return rec.get("status") == "failed" and (rec.get("slurm") or {}).get("job_id") == job_id \
            and rec.get("ended_at") is not None

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
                            entry.update(state=st, state_at=_now())
                            changed = True
                        rec = store.load(spec[k])
                        if self._settled_by_record(rec, jid):
                            pending.discard(k)
                            entry.update(result=rec["status"], state_at=_now())
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

    def _summary(self, pending: set[str], job_of: dict[str, str], states: dict) -> str:
        from collections import Counter

        c = Counter((states.get(job_of[k]) or {}).get("state", "SUBMITTED") for k in pending)
        held = [s for s in c if s in HELD_STATES]
        return ", ".join(f"{n} {s.lower()}" for s, n in sorted(c.items())) + \
            (f" (held jobs need `scontrol release`/`resume`: {', '.join(held)})" if held else "")

    def _report(self, spec: RunSpec, rec: dict, job_id: str) -> None:
        top1 = (rec.get("metrics") or {}).get("top1")
        slurm = rec.get("slurm") or {}
        self._count(f"{spec.label()}: {rec['status']}" + (f" top1 {top1:.2f}" if top1 is not None else "")
                    + f" (job {job_id}" + (f", {slurm['restart_count']} restart(s)" if slurm.get("restart_count") else "")
                    + (f", {rec['wall_s']:.1f}s" if rec.get("wall_s") else "") + ")"
                    + (f"\n    {rec['error'].strip().splitlines()[-1]}" if rec.get("error") else ""))

    # -- failures -----------------------------------------------------------------------------

    def _log_tail(self, job_id: str, n: int = 15) -> str:
        try:
            path = submitit.core.utils.JobPaths(self.folder / "%A", job_id=job_id).stderr
            lines = path.read_text(errors="replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return ""

    def _note_retry(self, spec: RunSpec, store: RunStore, job_id: str, state: str, reason: str,
                    counted: bool = True, give_up: bool = False) -> dict:
        rec = store.load(spec) or {"key": spec.key, "spec": spec.to_dict(), "status": "failed", "error": None}
        entry = {"at": _now(), "job_id": job_id, "state": state, "reason": reason}
        if counted:
            entry["retry"] = self.retries_used.get(spec.key, 0)
        rec.setdefault("retries", [])
        if not give_up:
            rec["retries"].append(entry)
        tail = self._log_tail(job_id)
        rec["status"] = "failed"
        rec["error"] = (f"SLURM job {job_id} ended {state} without a result; {reason}"
                        + (f"\n--- end of the job's log ({self.folder}):\n{tail}" if tail else ""))
        rec.setdefault("ended_at", None)
        if give_up:
            rec["ended_at"] = _now()
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


def _missing_record(spec: RunSpec) -> dict:
    return {"key": spec.key, "spec": spec.to_dict(), "status": "failed", "error": "no record was written",
            "metrics": {}}


__all__ = ["SlurmSettings", "SlurmExecutor", "RunJob", "PROFILE_KEYS", "make_settings", "read_profile",
           "settings_from_args", "query_states", "read_state", "driver_lock_holder", "job_info"]
