"""On-disk layouts of task data: how a task's split lists are found and read.

A layout is a :class:`Layout` subclass registered with :func:`register_layout`; a task names its
layout (``Task.layout``). Built-in layouts are the public modules of this package (``noah``: NOAH's
VTAB-1k text files, ``vpt_json``: VPT's FGVC JSON files, ``tfds``: the TFRecord files ``tensorflow_datasets``
prepares, sliced as google-research/task_adaptation does); a third-party package adds one by declaring
a ``peftbench.layouts`` entry point (docs/plugins.md). Everything that reads split lists (training,
fingerprints, ``peftbench data verify``) goes through this interface.

A task can be held in more than one form: ``Task.layout`` is its main one and ``Task.sources`` names the others
with their per-task settings (VTAB-1k: NOAH's files, or TFDS's). :func:`locate` picks, per data root, the first
form that is present there (the main one first), so a user holding either runs the same task.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Union

from ..._registry import Registry
from ...errors import DataError
from ...tasks import Task

# (where: "file:line" or "file: entry N (key)", image path relative to the image folder, label)
Entry = tuple[str, str, int]


@dataclass(frozen=True)
class Member:
    """An image stored inside a container file (a TFRecord shard): ``length`` encoded bytes at ``offset`` of
    ``file``; ``scale`` multiplies the decoded pixel values (dSprites stores its binary masks as 0/1)."""

    file: Path
    offset: int
    length: int
    scale: int = 1

    def read_bytes(self) -> bytes:
        with open(self.file, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(self.length)
        if len(data) != self.length:
            raise OSError(f"{self.file} ends before byte {self.offset + self.length}")
        return data

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.read_bytes())

    def __str__(self) -> str:
        return f"{self.file}@{self.offset}+{self.length}" + (f"x{self.scale}" if self.scale != 1 else "")


# where an image is: a file of its own, or a member of a container file
ImageSource = Union[Path, Member]


@dataclass(frozen=True)
class Split:
    """One split list, read and checked: the images (paths, or members of container files) and integer labels."""

    task: str
    name: str
    file: Path
    paths: tuple[ImageSource, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.labels)


class Layout:
    """How the split lists of a task are stored under its folder."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    # the resampling of the pipeline these files come from, when a run does not set one (None: the preprocessing's)
    interpolation: ClassVar[str | None] = None

    def task_dir(self, task: Task, data_root: Path) -> Path | None:
        """The folder of ``task``'s files under ``data_root`` in this layout (None: not there)."""
        return task.directory(data_root)

    def image(self, task: Task, task_dir: Path, rel: str) -> ImageSource:
        """The image an entry of :meth:`entries` names."""
        return self.image_dir(task, task_dir) / rel

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
        return Split(task.name, split, self.split_file(task, task_dir, split),
                     tuple(self.image(task, task_dir, rel) for _, rel, _ in entries), tuple(y for _, _, y in entries))

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
    """The task's main layout (:func:`locate` says which form a data root holds)."""
    return LAYOUTS.get(task.layout)


def locate(task: Task, data_root: Path) -> tuple[Layout, Path]:
    """The layout and folder of ``task``'s files under ``data_root``: the main layout when its folder is there (or
    the task builds itself), else the first of ``task.sources`` that is there, else the main one (whose reading
    then says what is missing and how to get it)."""
    main = layout_of(task)
    d = main.task_dir(task, Path(data_root))
    if task.materialise is not None:
        return main, task.ensure(Path(data_root))
    if d is not None and d.is_dir():
        return main, d
    for name in task.sources:
        other = LAYOUTS.get(name)
        od = other.task_dir(task, Path(data_root))
        if od is not None and od.is_dir():
            return other, od
    return main, d if d is not None else task.directory(Path(data_root))


__all__ = ["Layout", "Split", "Entry", "Member", "ImageSource", "LAYOUTS", "register_layout", "layout_of", "locate"]
