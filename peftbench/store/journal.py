"""The sweep journal: what a running driver has queued, so ``peftbench status`` can show runs that
have no record yet (``pending``) and which driver they wait for.

``<runs-dir>/.peftbench/sweeps/<host>-<pid>.json``: the driver (host, pid, command line, start,
heartbeat) and every run of every stage it handed to its executor. The file of a driver that is gone
is ignored (its lease state is dead) and removed by the next driver.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from .._io import atomic_write_text
from ..provenance import now
from .leases import HEARTBEAT_S, lease_state, process_start, read_lease
from .records import RunSpec

FOLDER = Path(".peftbench") / "sweeps"


class Journal:
    def __init__(self, runs_dir: str | Path, argv: list[str] | None = None):
        self.dir = Path(runs_dir) / FOLDER
        self.path = self.dir / f"{socket.gethostname()}-{os.getpid()}.json"
        self.runs: dict[str, dict] = {}
        self.info: dict = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
                           "argv": list(argv if argv is not None else sys.argv), "started_at": now(),
                           "heartbeat": time.time(), "runs": self.runs}
        for other in self.dir.glob("*.json") if self.dir.is_dir() else []:
            if other != self.path and lease_state(read_lease(other), other) == "dead":
                other.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sweep journal", daemon=True)
        self._write()
        self._thread.start()

    def _write(self) -> None:
        with self._lock:
            self.info["heartbeat"] = time.time()
            atomic_write_text(self.path, json.dumps(self.info), fsync=False)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except OSError:
                pass

    def stage(self, specs: list[RunSpec]) -> None:
        with self._lock:
            for s in specs:
                self.runs[s.key] = {"method": s.method, "task": s.task, "stage": s.stage, "seed": s.seed,
                                            "label": s.label()}
        self._write()

    def close(self) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)


def live_journals(runs_dir: str | Path) -> list[dict]:
    """The journals of the drivers of ``runs_dir`` that are still running."""
    d = Path(runs_dir) / FOLDER
    out = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        info = read_lease(p)
        if info is not None and lease_state(info, p) == "live":
            out.append(info)
    return out
