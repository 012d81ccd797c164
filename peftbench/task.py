"""Tasks and suites: what a dataset is, where its files are and which splits each stage uses.

Every built-in task is read from an on-disk layout (NOAH's VTAB-1k layout, or VPT's FGVC JSON
layout); the demo tasks are materialised into the NOAH layout on first use, so the code that reads
real data is the code that runs in the demo and in the tests.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .registry import Registry, import_builtin, load_entry_points


class DataError(ValueError):
    """Bad or missing data. The message names the file (and line) and says how to get the data."""


@dataclass(frozen=True)
class Task:
    name: str
    suite: str
    num_classes: int
    description: str
    group: str | None = None  # VTAB group: natural | specialized | structured
    aliases: tuple[str, ...] = ()
    folder: str = ""  # folder under <data-root>/<suite.folder>/ (default: the name)
    layout: str = "noah"  # noah | fgvc-json
    # stage role -> (train split, eval split)
    splits: dict[str, tuple[str, str]] = field(
        default_factory=lambda: {"search": ("train800", "val200"), "final": ("train800val200", "test")}
    )
    split_sizes: dict[str, int] = field(default_factory=dict)  # expected line counts (0/absent: unchecked)
    augment: str | None = None  # None (VTAB: no augmentation) | "crop-flip" (FGVC)
    materialise: Callable[[Path], None] | None = None  # builds the files (demo tasks) when missing
    how_to_get: str = ""  # printed when the data is missing
    image_root: str = ""  # sub-folder the image paths of the split lists are relative to

    def directory(self, data_root: Path) -> Path:
        suite = SUITES.get(self.suite)
        return Path(data_root) / suite.folder / (self.folder or self.name)

    def ensure(self, data_root: Path) -> Path:
        """The task's folder, materialised first if the task can build itself."""
        d = self.directory(data_root)
        if self.materialise is not None and not (d / "test.txt").exists():
            d.parent.mkdir(parents=True, exist_ok=True)
            self.materialise(d)
        return d


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    tasks: tuple[str, ...]
    protocol: str  # default protocol
    backbone: str  # default backbone
    folder: str  # folder under the data root
    aliases: tuple[str, ...] = ()
    default_data_root: str | None = None  # None: --data-root (or $PEFTBENCH_DATA) is required


def _load_tasks() -> None:
    import_builtin("peftbench.tasks")
    load_entry_points("peftbench.tasks", _register_object)


TASKS: Registry[Task] = Registry("task", loader=_load_tasks)
SUITES: Registry[Suite] = Registry("suite", loader=_load_tasks)


def register_task(task: Task) -> Task:
    TASKS.add(task.name, task, task.aliases)
    return task


def register_suite(suite: Suite) -> Suite:
    SUITES.add(suite.name, suite, suite.aliases)
    return suite


def _register_object(obj: object) -> None:
    if isinstance(obj, Task):
        register_task(obj)
    elif isinstance(obj, Suite):
        register_suite(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _register_object(o)
    else:
        raise TypeError(f"a peftbench.tasks entry point must name a module, a Task or a Suite, got {obj!r}")


def get_task(name: str) -> Task:
    return TASKS.get(name)


def get_suite(name: str) -> Suite:
    return SUITES.get(name)


def default_data_root(suite: Suite) -> Path:
    env = os.environ.get("PEFTBENCH_DATA")
    if env:
        return Path(env)
    if suite.default_data_root is not None:
        return Path(os.path.expanduser(suite.default_data_root))
    raise DataError(
        f"suite {suite.name!r} needs its data: pass --data-root DIR (or set PEFTBENCH_DATA); "
        f"see `peftbench data prepare --suite {suite.name}`"
    )


# ---------------------------------------------------------------------------------------------
# Split lists (NOAH layout: one "<relative image path> <label>" per line)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    task: str
    name: str
    file: Path
    paths: tuple[Path, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.labels)


def read_split(task: Task, data_root: Path, split: str) -> Split:
    """Read and check one split list. Errors name the file, the line and what is wrong."""
    d = task.ensure(data_root)
    if task.layout == "fgvc-json":
        from .fgvc import read_json_split  # FGVC layout lives with the FGVC loader

        return read_json_split(task, d, split)
    f = d / f"{split}.txt"
    if not d.is_dir():
        raise DataError(f"task {task.name!r}: data folder {d} does not exist. {task.how_to_get}".strip())
    if not f.is_file():
        raise DataError(f"task {task.name!r}: split file {f} is missing. {task.how_to_get}".strip())
    base = d / task.image_root if task.image_root else d
    paths, labels = [], []
    with open(f, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").rsplit(maxsplit=1)
            if len(parts) != 2:
                raise DataError(f"{f}:{lineno}: expected '<image path> <label>', got {line.strip()!r}")
            rel, lab = parts
            try:
                label = int(lab)
            except ValueError:
                raise DataError(f"{f}:{lineno}: label {lab!r} is not an integer") from None
            if not 0 <= label < task.num_classes:
                raise DataError(
                    f"{f}:{lineno}: label {label} is outside the task's classes 0..{task.num_classes - 1}"
                )
            paths.append(base / rel)
            labels.append(label)
    if not labels:
        raise DataError(f"{f}: the split list is empty")
    return Split(task.name, split, f, tuple(paths), tuple(labels))


def fingerprint(task: Task, data_root: Path) -> str:
    """A short hash of every split list of the task (what a run record stores)."""
    h = hashlib.sha256()
    d = task.ensure(data_root)
    names = sorted({s for pair in task.splits.values() for s in pair})
    for name in names:
        split = read_split(task, data_root, name)
        h.update(name.encode())
        for p, y in zip(split.paths, split.labels):
            h.update(f"{os.path.relpath(p, d)}\t{y}\n".encode())
    return h.hexdigest()[:16]


def describe(task: Task) -> dict:
    return json.loads(json.dumps({"name": task.name, "suite": task.suite, "classes": task.num_classes,
                                  "group": task.group}))
