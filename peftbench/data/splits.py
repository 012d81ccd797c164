"""Reading a task's split lists through its layout, and the task's data fingerprint."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..tasks import Task, task_splits
from .layouts import Split, locate


def split_size(task: Task, data_root: str | Path | None, split: str) -> int | None:
    """The number of images of ``split``: the task's declared size, else the length of its list file;
    None when neither is there, or no data root is known (nothing is raised: estimates only)."""
    if split in task.split_sizes:
        return task.split_sizes[split]
    if not data_root:
        return None
    try:
        return len(read_split(task, Path(data_root), split))
    except Exception:  # noqa: BLE001 - a missing or broken list only means no estimate
        return None


def read_split(task: Task, data_root: Path, split: str) -> Split:
    """Read and check one split list (the task's folder is materialised first if the task builds
    itself). Errors name the file, the line and what is wrong."""
    layout, d = locate(task, Path(data_root))
    return layout.read(task, d, split)


def fingerprint(task: Task, data_root: Path) -> str:
    """A short hash of every split list of the task (what a run record stores): each image named relative to the
    task's folder (a container member with its offset and length) and its label."""
    h = hashlib.sha256()
    _, d = locate(task, Path(data_root))
    for name in sorted(task_splits(task)):
        split = read_split(task, data_root, name)
        h.update(name.encode())
        for p, y in zip(split.paths, split.labels):
            h.update(f"{os.path.relpath(str(p), d)}\t{y}\n".encode())
    return h.hexdigest()[:16]
