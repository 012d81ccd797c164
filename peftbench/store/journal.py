"""The sweep journal: what a running driver has queued, so ``peftbench status`` can show runs that
have no record yet (``pending``) and which driver they wait for.

``<runs-dir>/.peftbench/sweeps/<host>-<pid>.json``: the driver (host, pid, command line, start,
heartbeat) and every run of every stage it handed to its executor. The file of a driver that is gone
is ignored (its lease state is dead) and removed by the next driver. A file there that is not a journal
(unreadable JSON, fields of the wrong type: a hand edit, a disk error) is set aside as
``<name>.corrupt-<time>`` with a one-line warning naming it (:func:`read_journal`): it never stops
``peftbench status`` or a driver.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .._io import atomic_write_text
from ..provenance import now
from .leases import HEARTBEAT_S, holder, lease_state, problem, set_aside
from .records import RunSpec

FOLDER = Path(".peftbench") / "sweeps"


class Journal:
    def __init__(self, runs_dir: str | Path, argv: list[str] | None = None):
        self.dir = Path(runs_dir) / FOLDER
        self.path = self.dir / f"{socket.gethostname()}-{os.getpid()}.json"
        self.runs: dict[str, dict] = {}
        self.info: dict = {**holder(), "argv": list(argv if argv is not None else sys.argv), "started_at": now(),
                           "heartbeat": time.time(), "runs": self.runs}
        for other in self.dir.glob("*.json") if self.dir.is_dir() else []:
            if other != self.path:
                info = read_journal(other)
                if info is not None and lease_state(info, other) == "dead":
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


def _problem(info: object) -> str | None:
    """Why ``info`` is not a journal as :class:`Journal` writes it; None when it is."""
    why = problem(info, required=("heartbeat", "host"))  # the driver's identity, as a lease's
    if why is not None:
        return why
    assert isinstance(info, dict)
    argv = info.get("argv", [])
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        return "argv is not a list of strings"
    runs = info.get("runs", {})
    if not isinstance(runs, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in runs.items()):
        return "runs is not a table of runs"
    return None


def _warn(message: str) -> None:
    from .._text import terminal

    print(f"peftbench: warning: {terminal(message)}", file=sys.stderr, flush=True)


def read_journal(path: Path, warn: Callable[[str], None] | None = None) -> dict | None:
    """The journal at ``path``, or None when there is none. A file that is not a journal is quarantined: renamed
    to ``<name>.corrupt-<time>`` beside it, with a warning line naming it (``warn``; default: stderr)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        (warn or _warn)(f"{path}: cannot read this sweep journal ({exc.strerror or exc}); ignored")
        return None
    try:
        info = json.loads(raw.decode("utf-8"))
        why = _problem(info)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        info, why = None, f"not JSON ({type(exc).__name__})"
    if why is None:
        return info
    set_aside(path, f"not a sweep journal ({why})", warn or _warn)
    return None


def live_journals(runs_dir: str | Path, warn: Callable[[str], None] | None = None) -> list[dict]:
    """The journals of the drivers of ``runs_dir`` that are still running (a corrupt one is set aside:
    :func:`read_journal`)."""
    d = Path(runs_dir) / FOLDER
    out = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        info = read_journal(p, warn)
        if info is not None and lease_state(info, p) == "live":
            out.append(info)
    return out
