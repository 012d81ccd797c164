"""Reading a task's split lists through its layout, and the task's data fingerprint."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..tasks import Task, task_splits
from .layouts import Split, layout_of


def read_split(task: Task, data_root: Path, split: str) -> Split:
    """Read and check one split list (the task's folder is materialised first if the task builds
    itself). Errors name the file, the line and what is wrong."""
    d = task.ensure(Path(data_root))
    return layout_of(task).read(task, d, split)


def fingerprint(task: Task, data_root: Path) -> str:
    """A short hash of every split list of the task (what a run record stores)."""
    h = hashlib.sha256()
    d = task.ensure(Path(data_root))
    for name in sorted(task_splits(task)):
        split = read_split(task, data_root, name)
        h.update(name.encode())
        for p, y in zip(split.paths, split.labels):
            h.update(f"{os.path.relpath(p, d)}\t{y}\n".encode())
    return h.hexdigest()[:16]
