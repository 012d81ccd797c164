"""Tasks and suites: what a dataset is, where its files are and which splits each stage uses.

A task names its on-disk layout (``layout``: a :data:`peftbench.data.layouts.LAYOUTS` entry, e.g.
NOAH's VTAB-1k text files or VPT's FGVC JSON files), its preprocessing and its training augmentation
(:mod:`peftbench.data.transforms` entries). This module is plain data: reading the files is
:mod:`peftbench.data`'s job. The demo tasks are materialised into the NOAH layout on first use, so the
code that reads real data is the code that runs in the demo and in the tests.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .._registry import Registry
from ..errors import DataError


@dataclass(frozen=True)
class Task:
    name: str
    suite: str
    num_classes: int
    description: str
    group: str | None = None  # VTAB group: natural | specialized | structured
    aliases: tuple[str, ...] = ()
    folder: str = ""  # folder under <data-root>/<suite.folder>/ (default: the name)
    layout: str = "noah"  # a registered on-disk layout (peftbench.data.layouts): noah | fgvc-json
    # other forms the task's data can be held in: layout name -> that layout's per-task settings (plain data, checked
    # by the layout; VTAB-1k: {"tfds": ...}, see peftbench.data.layouts.tfds); peftbench.data.layouts.locate picks
    # the form a data root holds
    sources: dict[str, dict] = field(default_factory=dict)
    # stage role -> (train split, eval split)
    splits: dict[str, tuple[str, str]] = field(
        default_factory=lambda: {"search": ("train800", "val200"), "final": ("train800val200", "test")}
    )
    split_sizes: dict[str, int] = field(default_factory=dict)  # expected line counts (0/absent: unchecked)
    augment: str | None = None  # a registered augmentation (peftbench.data.transforms): None (VTAB) | "crop-flip" (FGVC)
    materialise: Callable[[Path], None] | None = None  # builds the files (demo tasks) when missing
    how_to_get: str = ""  # printed when the data is missing
    image_root: str = ""  # sub-folder the image paths of the split lists are relative to
    # splits in which every class must occur (`peftbench data verify` reports a missing class as a defect;
    # in other splits a missing class is only noted: VTAB's train800/val200 are not class-stratified)
    complete_splits: tuple[str, ...] = ()
    # how images become model input, a registered preprocessing (peftbench.data.transforms): "resize"
    # (VTAB: straight to the square input size) or "resize-crop" (FGVC: shorter side to 256/224 of the input
    # size, then a crop; docs/data.md)
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
    # task groups in the order leaderboards show them (VTAB: natural, specialized, structured); empty:
    # the groups of the tasks, sorted by name
    groups: tuple[str, ...] = ()


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


def parse_names(text: str) -> list[str]:
    """Comma-separated names; commas inside parentheses or quotes (VPT task names) do not split."""
    return [x.strip() for x in _split_top_level(text) if x.strip()]


class _TaskRegistry(Registry):
    """The task registry also accepts parameterised names in any spacing, quoting and parameter order."""

    def _norm(self, name: str) -> str:
        return super()._norm(normalise_task_name(name))


def _register_object(obj: object, provider: str) -> None:
    """One ``peftbench.tasks`` entry point may name a Task, a Suite or a list of them (two registries)."""
    if isinstance(obj, Task):
        TASKS.add_object(obj, provider)
    elif isinstance(obj, Suite):
        SUITES.add_object(obj, provider)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _register_object(o, provider)
    else:
        raise TypeError(f"a peftbench.tasks entry point must name a module, a Task or a Suite, got {obj!r}")


# built-in suites: tasks/<suite>.py; plugins: the `peftbench.tasks` entry-point group
TASKS: Registry[Task] = _TaskRegistry("task", builtin="peftbench.tasks", group="peftbench.tasks",
                                      register_object=_register_object, base=Task)
SUITES: Registry[Suite] = Registry("suite", loader=TASKS.load, base=Suite)  # registered by the same plugins


def register_task(task: Task) -> Task:
    return TASKS.add_object(task)


def register_suite(suite: Suite) -> Suite:
    return SUITES.add_object(suite)


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


def task_splits(task: Task) -> list[str]:
    """Every split a task's stages use, in order of first use (train and eval split of each role)."""
    names: list[str] = []
    for pair in task.splits.values():
        for s in pair:
            if s not in names:
                names.append(s)
    return names
