"""Run leases: a run is trained by one process at a time, whatever drives it.

Before a run starts, its driver claims ``<key>.lease`` next to the record: a JSON file created
atomically (``O_CREAT | O_EXCL``) holding the host, pid, start time and a heartbeat that a background
thread refreshes every :data:`HEARTBEAT_S` seconds while the run trains. Several ``peftbench run``
processes on one store (terminals, SLURM jobs, Ray workers, a crashed driver started again) therefore
train each run exactly once: a driver that finds a live lease leaves that run to its holder.

A lease is *dead* when its heartbeat is older than :data:`LEASE_TTL_S` (its holder is gone or hung).
The holder's pid may only shorten that wait when the pid provably names the same process table: the
lease records the host, the kernel's boot id and the PID namespace (:func:`holder`), and only when all
three equal this process's does "pid not running" (or running but started after the lease) make a
lease dead at once. Two containers with host networking or two pods with ``hostNetwork`` share a
hostname but not a PID namespace: each sees the other's pids as absent, so there the heartbeat alone
decides. A lease file that is not a lease (unreadable JSON, a pid that is not a number...) is set aside
as ``<key>.lease.corrupt-<time>`` with a warning and the run is claimed; it never stops a driver.
Claims of one run are serialised by an exclusive ``flock`` of ``<key>.lease.lock``, so two contenders
never both win.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .._io import atomic_write_text

LEASE_TTL_S = 120.0  # a heartbeat older than this: the holder is gone
HEARTBEAT_S = 20.0


def process_start(pid: int) -> str | None:
    """The start time of a process (Linux: field 22 of /proc/<pid>/stat), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _read_id(path: str) -> str | None:
    try:
        return (os.readlink(path) if path.startswith("/proc/self/ns/") else Path(path).read_text()).strip() or None
    except OSError:
        return None


def holder() -> dict:
    """Who this process is, for a lease, a journal or a driver state: host, pid, the pid's start time, and
    what says whether another process may compare pids with it (boot id, PID namespace)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
            "boot_id": _read_id("/proc/sys/kernel/random/boot_id"), "pid_ns": _read_id("/proc/self/ns/pid")}


def same_pid_space(info: dict) -> bool:
    """True when ``info``'s pid names a process of this process's own process table: same host, same boot,
    same PID namespace (a lease without the two ids, from another kind of system, is never assumed to)."""
    me = holder()
    return (info.get("host") == me["host"] and me["boot_id"] is not None and me["pid_ns"] is not None
            and info.get("boot_id") == me["boot_id"] and info.get("pid_ns") == me["pid_ns"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def problem(info: object, required: tuple[str, ...] = ()) -> str | None:
    """Why ``info`` is not a lease (or journal, or driver) entry as :func:`holder` writes it: a pid that is an int,
    a heartbeat that is a finite number, a host that is a string; None when it is one. Keys in ``required`` must
    be there (a lease may lack a heartbeat or a host: then it is 0, i.e. long dead, and "")."""
    if not isinstance(info, dict):
        return "not a JSON object"
    pid = info.get("pid")
    beat = info.get("heartbeat") if "heartbeat" in required else info.get("heartbeat", 0)
    host = info.get("host") if "host" in required else info.get("host", "")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return f"pid {pid!r} is not a process id"
    if not isinstance(beat, (int, float)) or isinstance(beat, bool) or not math.isfinite(beat):
        return f"heartbeat {beat!r} is not a time"
    if not isinstance(host, str):
        return "host is not a string"
    return None


def valid(info: object) -> bool:
    """:func:`problem` finds nothing."""
    return problem(info) is None


def read_lease(path: Path) -> dict | None:
    """The lease at ``path``, or None when there is none or it is not a lease (:func:`valid`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if valid(data) else None


def set_aside(path: Path, why: str = "not a lease", warn: Callable[[str], None] | None = None) -> Path | None:
    """Move a corrupt lease (or journal) out of the way as ``<name>.corrupt-<time>``, and say so through ``warn``
    (default: a ``UserWarning``). Returns where it went (None: it was gone already, or could not be moved)."""
    if warn is None:
        import warnings

        def warn(message: str) -> None:
            warnings.warn(message, stacklevel=3)
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    except OSError as exc:
        warn(f"{path}: {why}, and it cannot be set aside ({exc.strerror or exc})")
        return None
    warn(f"{path}: {why}; set aside as {target.name}")
    return target


def lease_state(info: dict | None, path: Path | None = None, now: float | None = None) -> str:
    """``live`` or ``dead``: dead when the heartbeat is older than the TTL, or at once when the holder's pid
    is provably of this process table (:func:`same_pid_space`) and no longer that process; ``info`` None
    (no lease, or not a lease): dead, unless the file at ``path`` is younger than the TTL."""
    now = time.time() if now is None else now
    if not valid(info):
        try:
            age = now - Path(path).stat().st_mtime if path is not None else LEASE_TTL_S + 1
        except OSError:
            return "dead"
        return "dead" if age > LEASE_TTL_S else "live"
    assert isinstance(info, dict)
    if same_pid_space(info):
        pid = info["pid"]
        if pid <= 0 or not _alive(pid):
            return "dead"
        if info.get("pid_start") and process_start(pid) not in (None, info["pid_start"]):
            return "dead"  # the pid was reused by another process
    if now - float(info.get("heartbeat", 0)) > LEASE_TTL_S:
        return "dead"
    return "live"


@dataclass
class Lease:
    path: Path
    info: dict
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    took_over: dict | None = None  # the dead lease this one replaced

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.heartbeat()

    def heartbeat(self) -> None:
        current = read_lease(self.path)
        if current is None or current.get("token") != self.info["token"]:
            return  # not ours any more (taken over after a long stall): leave it alone
        self.info["heartbeat"] = time.time()
        try:
            atomic_write_text(self.path, json.dumps(self.info), fsync=False)
        except OSError:
            pass

    def release(self) -> None:
        self._stop.set()
        current = read_lease(self.path)
        if current is not None and current.get("token") == self.info["token"]:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(path: Path, *, what: str = "", heartbeat: bool = True) -> Lease | None:
    """The lease at ``path`` (a dead one is taken over), or None when a live process holds it.

    The decision is made under an exclusive ``flock`` of ``<lease>.lock``, so two contenders for a dead
    lease cannot both take it over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.with_name(path.name + ".lock")):
        existed = path.exists()
        held = read_lease(path) if existed else None
        if existed and held is None:  # leases are written atomically: this file is not one
            set_aside(path, "not a lease (unreadable, or a field of the wrong type)")
        elif existed and lease_state(held, path) == "live":
            return None
        info = {**holder(), "started_at": time.time(), "heartbeat": time.time(), "token": uuid.uuid4().hex,
                "what": what}
        atomic_write_text(path, json.dumps(info), fsync=False)
    lease = Lease(path, info, took_over=(held or {}) if existed else None)
    if heartbeat:
        lease._thread = threading.Thread(target=lease._beat, name=f"lease {path.name}", daemon=True)
        lease._thread.start()
    return lease


@contextlib.contextmanager
def locked(lock_path: Path):
    """An exclusive ``flock`` of ``lock_path`` (created if needed) while the block runs."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
