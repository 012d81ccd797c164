"""The SLURM driver's lock (``<runs-dir>/.slurm/driver.lock``: one driver per runs dir, since a driver
re-attaches to the jobs of the runs it finds); its state file is the shared driver layer's
(``<runs-dir>/.slurm/state.json``, :class:`peftbench.executors._driver.DriverState`)."""
from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from ...errors import SettingsError
from .._driver import DriverState, now

STATE_DIR = ".slurm"
STATE_FILE = "state.json"
LOCK_FILE = "driver.lock"


def read_state(runs_dir: str | Path) -> dict:
    """The SLURM driver's state (:class:`peftbench.executors._driver.DriverState` of executor ``slurm``)."""
    return DriverState.read(runs_dir, "slurm")


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


class DriverLock:
    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        from .payload import make_dir

        make_dir(self.path.parent, 0o755)  # not group-writable whatever the umask (payload.check_private)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                who = json.loads(self.path.read_text() or "{}")
            except ValueError:
                who = {}
            raise SettingsError(f"another peftbench driver (pid {who.get('pid', '?')} on {who.get('host', '?')}, since "
                         f"{who.get('since', '?')}) is driving {self.path.parent.parent}; stop it first "
                         "(its jobs keep running and a new driver re-attaches to them)") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now()}).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
