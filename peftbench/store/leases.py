"""Run leases: a run is trained by one process at a time, whatever drives it.

Before a run starts, its driver claims ``<key>.lease`` next to the record: a JSON file created
atomically (``O_CREAT | O_EXCL``) holding the host, pid, start time and a heartbeat that a background
thread refreshes every :data:`HEARTBEAT_S` seconds while the run trains. Several ``peftbench run``
processes on one store (terminals, SLURM jobs, Ray workers, a crashed driver started again) therefore
train each run exactly once: a driver that finds a live lease leaves that run to its holder.

A lease is *dead* when its process is gone (same host, pid not running, or running but started after
the lease) or when its heartbeat is older than :data:`LEASE_TTL_S` (another host, or a hung
process); a dead lease is taken over. Claims of one run are serialised by an exclusive ``flock`` of
``<key>.lease.lock``, so two contenders never both win.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lease(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def lease_state(info: dict | None, path: Path | None = None, now: float | None = None) -> str:
    """``live`` or ``dead`` (gone, expired, or unreadable for longer than the TTL)."""
    now = time.time() if now is None else now
    if info is None:
        try:
            age = now - Path(path).stat().st_mtime if path is not None else LEASE_TTL_S + 1
        except OSError:
            return "dead"
        return "dead" if age > LEASE_TTL_S else "live"  # being written right now
    if info.get("host") == socket.gethostname():
        pid = int(info.get("pid", -1))
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
        holder = read_lease(path) if existed else None
        if existed and lease_state(holder, path) == "live":
            return None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
                "started_at": time.time(), "heartbeat": time.time(), "token": uuid.uuid4().hex, "what": what}
        atomic_write_text(path, json.dumps(info), fsync=False)
    lease = Lease(path, info, took_over=(holder or {}) if existed else None)
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
