"""On-disk layouts of task data: how a task's split lists are found and read.

A layout is a :class:`Layout` subclass registered with :func:`register_layout`; a task names its
layout (``Task.layout``). Built-in layouts are the public modules of this package (``noah``: NOAH's
VTAB-1k text files, ``vpt_json``: VPT's FGVC JSON files); a third-party package adds one by declaring
a ``peftbench.layouts`` entry point (docs/plugins.md). Everything that reads split lists (training,
fingerprints, ``peftbench data verify``) goes through this interface.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..._registry import Registry
from ...errors import DataError
from ...tasks import Task

# (where: "file:line" or "file: entry N (key)", image path relative to the image folder, label)
Entry = tuple[str, str, int]


@dataclass(frozen=True)
class Split:
    """One split list, read and checked: absolute image paths and integer labels."""

    task: str
    name: str
    file: Path
    paths: tuple[Path, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.labels)


class Layout:
    """How the split lists of a task are stored under its folder."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    def split_file(self, task: Task, task_dir: Path, split: str) -> Path:
        raise NotImplementedError

    def image_dir(self, task: Task, task_dir: Path) -> Path:
        """The folder the image paths of the split lists are relative to."""
        return Path(task_dir) / task.image_root if task.image_root else Path(task_dir)

    def entries(self, task: Task, task_dir: Path, split: str) -> tuple[list[Entry], list[str]]:
        """Every valid entry of one split list and one message per defect (file and line or entry
        named), for ``peftbench data verify``. A file that cannot be read at all raises DataError."""
        raise NotImplementedError

    def read(self, task: Task, task_dir: Path, split: str) -> Split:
        """One split for training: the first defect raises DataError naming the file and line."""
        entries, defects = self.entries(task, task_dir, split)
        if defects:
            more = (f" (and {len(defects) - 1} more: run `peftbench data verify --suite {task.suite} --tasks "
                    f"{task.name}`)" if len(defects) > 1 else "")
            raise DataError(defects[0] + more)
        base = self.image_dir(task, task_dir)
        return Split(task.name, split, self.split_file(task, task_dir, split),
                     tuple(base / rel for _, rel, _ in entries), tuple(y for _, _, y in entries))

    def check_folder(self, task: Task, task_dir: Path, split: str) -> Path:
        """The split file, after checking that the folder and the file exist (DataError says how to get them)."""
        f = self.split_file(task, task_dir, split)
        if not Path(task_dir).is_dir():
            raise DataError(f"task {task.name!r}: data folder {task_dir} does not exist. {task.how_to_get}".strip())
        if not f.is_file():
            raise DataError(f"task {task.name!r}: split file {f} is missing. {task.how_to_get}".strip())
        return f


LAYOUTS: Registry[Layout] = Registry("layout", builtin="peftbench.data.layouts", group="peftbench.layouts", base=Layout)


def register_layout(cls: type[Layout]) -> type[Layout]:
    """Class decorator: register one instance of a :class:`Layout` subclass under ``cls.name``."""
    return LAYOUTS.register_class(cls)


def layout_of(task: Task) -> Layout:
    return LAYOUTS.get(task.layout)


__all__ = ["Layout", "Split", "Entry", "LAYOUTS", "register_layout", "layout_of"]
