"""``peftbench data prepare``: how to get each task's data, and converters from public sources.

Two registries, filled by the public modules of this package (``vtab.py``, ``fgvc.py``) and by the
``peftbench.tasks`` plugins that ship converters for their own tasks:

* :data:`CONVERTERS`, per task: what to download and where it goes (:attr:`Converter.source`), and
  the function that writes the task's layout from it (``None``: only the released archive will do);
* :data:`GUIDES`, per suite: the lines printed before the per-task list.

A suite without a guide whose tasks all build themselves (the demo suite) needs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..._registry import Registry
from ...errors import DataError
from ...tasks import TASKS, Task, get_suite, get_task

ConvertFn = Callable[..., Path]  # (task, source dir, data root, log=print) -> the task folder written


@dataclass(frozen=True)
class Converter:
    task: str  # the task's registered name
    source: str  # what to download and where it must sit under --source
    convert: ConvertFn | None = None  # None: no converter (the released archive only)


@dataclass(frozen=True)
class Guide:
    suite: str
    lines: tuple[str, ...]


CONVERTERS: Registry[Converter] = Registry("converter", builtin="peftbench.data.prepare", loader=TASKS.load)
GUIDES: Registry[Guide] = Registry("prepare guide", loader=CONVERTERS.load)


def register_converter(conv: Converter) -> Converter:
    CONVERTERS.add(conv.task, conv)
    return conv


def register_guide(guide: Guide) -> Guide:
    GUIDES.add(guide.suite, guide)
    return guide


def _suite_tasks(suite: str, task: str | None) -> tuple[str, list[Task]]:
    s = get_suite(suite)
    tasks = [get_task(t) for t in s.tasks] if task is None else [get_task(task)]
    for t in tasks:
        if t.suite != s.name:
            raise DataError(f"task {t.name!r} is not a task of suite {s.name!r} (it belongs to {t.suite!r})")
    return s.name, tasks


def instructions(suite: str, task: str | None = None) -> str:
    """The printed (and documented) instructions for a suite or one of its tasks."""
    name, tasks = _suite_tasks(suite, task)
    if name not in GUIDES:
        if all(t.materialise is not None for t in tasks):
            return f"The {name} tasks build themselves on first use (no download); nothing to prepare."
        return f"suite {name!r} has no preparation guide: see its documentation for where its data comes from."
    lines = list(GUIDES.get(name).lines) + [""]
    for t in tasks:
        conv = CONVERTERS.get(t.name) if t.name in CONVERTERS else None
        if conv is None:
            lines.append(f"  {t.name:<22} [no converter] {t.how_to_get}")
        else:
            lines.append(f"  {t.name:<22} [{'converter' if conv.convert else 'archive only'}] {conv.source}")
    return "\n".join(lines)


def converted(label: str, source: Path, fn, *args, **kw):
    """A converter's result; a source file that is missing or malformed becomes a DataError naming it."""
    try:
        return fn(*args, **kw)
    except DataError:
        raise
    except (OSError, KeyError, ValueError, IndexError, TypeError) as exc:
        raise DataError(f"{label}: cannot convert the source under {source}: {type(exc).__name__}: {exc}") from None


def prepare(suite: str, tasks: list[str] | None, source: Path, data_root: Path, log=print) -> list[tuple[Task, Path]]:
    """Convert every requested task (every task of the suite that has a converter and whose source is
    found, when ``tasks`` is None); a requested task without a converter or its source raises with
    instructions."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"--source {source} does not exist")
    name = get_suite(suite).name
    wanted = [get_task(t) for t in tasks] if tasks else None
    for t in wanted or []:
        if t.suite != name:
            raise DataError(f"task {t.name!r} is not a task of suite {name!r} (it belongs to {t.suite!r})")
    candidates = wanted if wanted is not None else [get_task(t) for t in get_suite(name).tasks]
    out = []
    for task in candidates:
        conv = CONVERTERS.get(task.name) if task.name in CONVERTERS else None
        if conv is None or conv.convert is None:
            if wanted is None:
                continue
            raise DataError(f"{task.name}: no TF-free converter; it needs "
                            f"{conv.source if conv else task.how_to_get}")
        try:
            out.append((task, converted(task.name, source, conv.convert, task, source, Path(data_root), log=log)))
        except DataError as exc:
            if wanted is not None:
                raise
            log(f"{task.name}: skipped ({exc})")  # all tasks: skip those whose source is absent
    return out


__all__ = ["Converter", "Guide", "CONVERTERS", "GUIDES", "register_converter", "register_guide", "instructions",
           "prepare", "converted"]
