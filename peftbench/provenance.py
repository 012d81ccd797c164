"""Where a result came from: code version, library versions, device and host."""
from __future__ import annotations

import functools
import platform
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ._version import __version__


def now() -> str:
    """The one timestamp format of peftbench: ISO 8601 in UTC, with its offset (``2026-12-06T19:02:03+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def parse_time(value: Any) -> datetime | None:
    """An ISO timestamp (with or without an offset; none means UTC) or epoch seconds as an aware datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), tz=timezone.utc)
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        try:  # "%Y-%m-%dT%H:%M:%S%z" without the colon of the offset (older SLURM records)
            t = datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%S%z")
        except ValueError:
            return None
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The commit of the peftbench checkout in use (with '-dirty' when it has local changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(device) -> dict:
    import timm
    import torch

    return {
        "peftbench": __version__,
        "git_sha": git_sha(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": device_name(device),
        "torch_threads": torch.get_num_threads(),  # float sums are ordered by it (docs/reliability.md §10)
        "host": socket.gethostname(),
    }
