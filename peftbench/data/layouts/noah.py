"""NOAH's VTAB-1k layout: one ``<split>.txt`` per split, one ``<relative image path> <label>`` per line.

    <data-root>/vtab-1k/<folder>/{train800,val200,train800val200,test}.txt
    <data-root>/vtab-1k/<folder>/images/<split>/NNNNNN.jpg
"""
from __future__ import annotations

from pathlib import Path

from ...errors import DataError
from ...tasks import Task
from . import Entry, Layout, Split, register_layout


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


@register_layout
class NoahLayout(Layout):
    name = "noah"
    description = "NOAH's VTAB-1k export: <split>.txt files of '<image path> <label>' lines"

    def split_file(self, task: Task, task_dir: Path, split: str) -> Path:
        return Path(task_dir) / f"{split}.txt"

    def entries(self, task: Task, task_dir: Path, split: str) -> tuple[list[Entry], list[str]]:
        f = self.split_file(task, task_dir, split)
        out: list[Entry] = []
        defects: list[str] = []
        seen: dict[str, int] = {}
        try:
            fh = open(f, encoding="utf-8")
        except OSError as exc:
            raise DataError(f"{f}: cannot be read ({exc})") from None
        with fh:
            try:
                for lineno, line in enumerate(fh, 1):
                    try:
                        entry = parse_split_line(f, lineno, line, task.num_classes)
                    except DataError as exc:
                        defects.append(str(exc))
                        continue
                    if entry is None:
                        continue
                    rel, y = entry
                    if rel in seen:
                        defects.append(f"{f}:{lineno}: image {rel!r} is listed again (first on line {seen[rel]})")
                        continue
                    seen[rel] = lineno
                    out.append((f"{f}:{lineno}", rel, y))
            except UnicodeDecodeError as exc:
                raise DataError(f"{f}: not UTF-8 text ({exc})") from None
        if not out and not defects:
            defects.append(f"{f}: the split list is empty")
        return out, defects

    def read(self, task: Task, task_dir: Path, split: str) -> Split:
        # training reads the list as it is (the first bad line stops; duplicates are verify's business)
        f = self.check_folder(task, task_dir, split)
        base = self.image_dir(task, task_dir)
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
