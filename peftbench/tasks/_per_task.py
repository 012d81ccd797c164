"""Per-task values shipped as data files (``peftbench/tasks/data/*.csv``), e.g. released prompt lengths."""
from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

from ._base import TASKS

DATA = Path(__file__).parent / "data"


@lru_cache(maxsize=None)
def _table(filename: str) -> dict[str, dict[str, str]]:
    path = DATA / filename
    rows = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.DictReader(line for line in fh if not line.startswith("#")), 2):
            try:
                rows[TASKS.canonical(row["task"])] = row
            except KeyError as exc:
                raise ValueError(f"{path}: row {lineno}: {exc}") from None
    return rows


def data_file(filename: str) -> Path:
    """The path of a data file shipped in ``peftbench/tasks/data/`` (e.g. a JSON of released selections)."""
    return DATA / filename


def per_task_value(filename: str, column: str, task, fallback):
    """(value, source) of ``column`` for ``task`` in ``peftbench/tasks/data/<filename>``; ``fallback`` when the
    task is not listed (or ``task`` is None)."""
    if task is not None:
        row = _table(filename).get(task.name)
        if row is not None and row.get(column, "").strip():
            src = row.get("source", "").strip()
            return row[column].strip(), f"peftbench/tasks/data/{filename} [{task.name}]" + (f": {src}" if src else "")
    return fallback, f"default {fallback} (task not in peftbench/tasks/data/{filename})"
