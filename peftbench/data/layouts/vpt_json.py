"""VPT's FGVC JSON layout (``fgvc-json``): one ``<split>.json`` object per split.

    <data-root>/fgvc/<folder>/{train,val,test}.json    {"<image path>": <class id>, ...}
    <data-root>/fgvc/<folder>/<image sub-folder>/<image path>

The image paths of the JSON files are relative to a per-dataset image folder. VPT's loader
(``src/data/datasets/json_dataset.py``, ``get_imagedir``) uses:

    CUB-200-2011   <folder>/images/        (``001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg``)
    NABirds        <folder>/images/
    Stanford Dogs  <folder>/Images/        (capital I: the archive's own folder name)
    Stanford Cars  <folder>/               (the task folder itself)
    Oxford Flowers <folder>/               (the task folder itself)

Class ids. VPT never uses the JSON values as labels directly: it maps ``sorted(set(values))`` of the
split it reads onto 0..C-1 (``_class_id_cont_id``). Whether the released files count from 0 or from 1
therefore does not matter to VPT (it was not verified here; the files are no longer downloadable), and
it does not matter to peftbench either: we apply the same sorted → contiguous mapping, computed over
the union of the class ids of every JSON split of the task (train, val, test). When every split holds
every class (what ``peftbench data verify`` checks for train and test), this is exactly VPT's
per-split mapping; where a split lacks a class, VPT's per-split mapping would silently shift the labels
of that split, ours does not.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ...errors import DataError
from ...tasks import Task, task_splits
from . import Entry, Layout, register_layout


def split_file(task_dir: Path, split: str) -> Path:
    return Path(task_dir) / f"{split}.json"


def _no_duplicate_keys(pairs):
    seen, dups = {}, []
    for k, v in pairs:
        if k in seen:
            dups.append(k)
        seen[k] = v
    if dups:
        seen["\0duplicates"] = dups
    return seen


def load_json_entries(f: Path) -> tuple[list[tuple[str, object]], list[str]]:
    """The (image path, raw class id) entries of one JSON split file, in file order, and the defects
    that concern the file as a whole (unreadable, not an object, duplicate keys)."""
    try:
        text = f.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"split file {f} is missing") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{f}: not UTF-8 text ({exc})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise DataError(f"{f}:{exc.lineno}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{f}: expected a JSON object mapping image path -> class id, got {type(obj).__name__}")
    problems = []
    dups = obj.pop("\0duplicates", None)
    if dups:
        problems.extend(f"{f}: image {d!r} is listed more than once (a JSON key given twice)" for d in dups[:20])
    return list(obj.items()), problems


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_MAPPING_CACHE: dict[tuple, dict[int, int]] = {}


def class_mapping(task: Task, task_dir: Path) -> dict[int, int]:
    """raw JSON class id → label 0..C-1: sorted union of the ids of every JSON split of the task."""
    names = sorted(task_splits(task))
    files = [split_file(task_dir, n) for n in names]
    key = (str(Path(task_dir).resolve()),) + tuple(
        (str(f), f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else (str(f), None, None) for f in files)
    if key not in _MAPPING_CACHE:
        ids: set[int] = set()
        for f in files:
            if not f.is_file():
                continue
            try:
                entries, _ = load_json_entries(f)
            except DataError:
                continue  # the split that is read reports its own file's problem
            ids.update(v for _, v in entries if _is_int(v))
        ordered = sorted(ids)
        if len(ordered) > task.num_classes:
            raise DataError(
                f"task {task.name!r}: the JSON splits in {task_dir} use {len(ordered)} different class ids, "
                f"more than the task's {task.num_classes} classes (ids {ordered[:5]} ... {ordered[-3:]})")
        _MAPPING_CACHE[key] = {raw: i for i, raw in enumerate(ordered)}
        while len(_MAPPING_CACHE) > 64:
            _MAPPING_CACHE.pop(next(iter(_MAPPING_CACHE)))
    return _MAPPING_CACHE[key]


@register_layout
class VptJsonLayout(Layout):
    name = "fgvc-json"
    aliases = ("vpt-json",)
    description = "VPT's FGVC layout: <split>.json objects mapping image path -> class id"

    def split_file(self, task: Task, task_dir: Path, split: str) -> Path:
        return split_file(task_dir, split)

    def entries(self, task: Task, task_dir: Path, split: str) -> tuple[list[Entry], list[str]]:
        """Every valid entry (entry number and key named) and one message per defect. Raises DataError
        when the file cannot be read at all."""
        f = self.check_folder(task, task_dir, split)
        raw, defects = load_json_entries(f)
        mapping = class_mapping(task, task_dir)
        out: list[Entry] = []
        for i, (rel, v) in enumerate(raw, 1):
            where = f"{f}: entry {i} ({rel!r})"
            if not rel.strip():
                defects.append(f"{where}: empty image path")
            elif not _is_int(v):
                defects.append(f"{where}: class id {v!r} is not an integer")
            elif v not in mapping:
                defects.append(f"{where}: class id {v} is not one of the task's classes")
            elif os.path.isabs(rel) or rel.startswith(".."):
                defects.append(f"{where}: the image path must be relative to {self.image_dir(task, task_dir)}")
            else:
                out.append((f"{f}: key {rel!r}", rel, mapping[v]))
        if not raw:
            defects.append(f"{f}: the split file is empty")
        return out, defects
