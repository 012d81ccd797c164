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
    # splits in which every class must occur (`peftbench data verify` reports a missing class as a defect;
    # in other splits a missing class is only noted: VTAB's train800/val200 are not class-stratified)
    complete_splits: tuple[str, ...] = ()
    # how images become model input: "resize" (VTAB, spec §7.1: straight to the square input size) or
    # "resize-crop" (FGVC, spec §7.2: shorter side to 256/224 of the input size, then a crop; see data.py)
    preprocess: str = "resize"

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


def normalise_task_name(name: str) -> str:
    """One spelling for parameterised task names (task_adaptation / VPT style), so that
    ``vtab-dsprites(predicted_attribute="label_x_position", num_classes=16)``,
    ``vtab-dsprites(num_classes=16,predicted_attribute='label_x_position')`` and the registered alias are
    the same key: spaces and quotes dropped, parameters sorted by name. Other names are returned unchanged."""
    name = name.strip()
    if not (name.endswith(")") and "(" in name):
        return name
    base, _, args = name[:-1].partition("(")
    params = []
    for part in _split_top_level(args):
        key, eq, value = part.partition("=")
        value = value.strip().strip("\"'")
        params.append(f"{key.strip()}={value}" if eq else key.strip().strip("\"'"))
    return f"{base.strip()}({','.join(sorted(p for p in params if p))})"


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are outside quotes and parentheses."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def split_names(text: str) -> list[str]:
    """Comma-separated names; commas inside parentheses or quotes (VPT task names) do not split."""
    return [x.strip() for x in _split_top_level(text) if x.strip()]


class _TaskRegistry(Registry):
    """The task registry also accepts parameterised names in any spacing, quoting and parameter order."""

    @staticmethod
    def _norm(name: str) -> str:
        return Registry._norm(normalise_task_name(name))


TASKS: Registry[Task] = _TaskRegistry("task", loader=_load_tasks)
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
            entry = parse_split_line(f, lineno, line, task.num_classes)
            if entry is None:
                continue
            paths.append(base / entry[0])
            labels.append(entry[1])
    if not labels:
        raise DataError(f"{f}: the split list is empty")
    return Split(task.name, split, f, tuple(paths), tuple(labels))


def parse_split_line(f: Path, lineno: int, line: str, num_classes: int) -> tuple[str, int] | None:
    """One line of a NOAH split list → (relative image path, label); None for a blank line. A bad line
    raises DataError naming the file and the line (``peftbench data verify`` collects them all)."""
    if not line.strip():
        return None
    parts = line.rstrip("\r\n").rsplit(maxsplit=1)
    if len(parts) != 2:
        raise DataError(f"{f}:{lineno}: expected '<image path> <label>', got {line.strip()!r}")
    rel, lab = parts
    try:
        label = int(lab)
    except ValueError:
        raise DataError(f"{f}:{lineno}: label {lab!r} is not an integer") from None
    if not 0 <= label < num_classes:
        raise DataError(f"{f}:{lineno}: label {label} is outside the task's classes 0..{num_classes - 1}")
    return rel, label


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
