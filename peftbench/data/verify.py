"""``peftbench data verify``: check a task's data before any compute is spent on it.

For every split file of a task (NOAH ``<split>.txt``, VPT ``<split>.json``, or TFDS's TFRecord shards sliced as
task_adaptation does) it checks

* that the file exists and every line / entry parses (image path + integer label in 0..C-1; a TFRecord's framing
  checksums and its Example's label features),
* that no image is listed twice in one split,
* the number of entries against the task's ``split_sizes`` (VTAB-1k: train800 800, val200 200,
  train800val200 1000, test = task_adaptation's test size) or against the sizes a data tree declares
  in ``<task>/peftbench_prepared.json`` (written by ``peftbench data prepare`` and by the test
  fixtures: such trees are not the released splits, and the report says so),
* the class set: a class missing from a split of ``task.complete_splits`` is a defect, elsewhere a note,
* that every image exists and decodes completely (parallel threads, with a progress line),

and gives the task's fingerprint (the hash of its split lists that every run record stores).
A clean result is remembered in ``<cache>/verified/`` under a key made of the fingerprint, the
sizes and modification times of the split files and of every image, and the checks applied, so a
rerun only ``stat``s the files instead of decoding every image again.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .._io import atomic_write_text
from ..errors import DataError
from ..provenance import now
from ..tasks import Task, task_splits
from ._cachedir import cache_base
from .layouts import Entry, Layout, locate
from .splits import fingerprint

VERIFY_VERSION = 1
MANIFEST = "peftbench_prepared.json"
MAX_LISTED = 200  # defects listed per task (the count is always exact)


@dataclass
class VerifyReport:
    task: str
    directory: str
    fingerprint: str | None = None
    splits: dict = field(default_factory=dict)  # name -> {"file", "entries", "classes", "expected"}
    defects: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    images: int = 0
    from_stamp: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.defects

    def lines(self) -> list[str]:
        status = "OK" if self.ok else f"FAILED: {len(self.defects)} defect(s)"
        head = (f"{self.task}: {status}; fingerprint {self.fingerprint or '-'}; {self.images} images"
                + (" (verified before: unchanged since)" if self.from_stamp else "")
                + f"; {self.directory}")
        out = [head]
        for name, info in self.splits.items():
            exp = f" (expected {info['expected']})" if info.get("expected") else ""
            out.append(f"    {name:<15} {info['entries']:>7} entries{exp}, {info['classes']} classes")
        out += [f"    note: {n}" for n in self.notes]
        shown = self.defects[:MAX_LISTED]
        out += [f"    defect: {d}" for d in shown]
        if len(self.defects) > len(shown):
            out.append(f"    ... and {len(self.defects) - len(shown)} more defects")
        return out


def read_manifest(task_dir: Path) -> dict | None:
    f = Path(task_dir) / MANIFEST
    if not f.is_file():
        return None
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{f}: not valid JSON ({exc})") from None
    if not isinstance(m, dict) or not isinstance(m.get("split_sizes", {}), dict):
        raise DataError(f"{f}: expected an object with a 'split_sizes' object")
    return m


def _parse(task: Task, layout: Layout, d: Path, split: str, defects: list[str], sources: dict) -> list[Entry] | None:
    """The valid entries of one split (defects appended; each image's source kept in ``sources`` by name);
    None when the file cannot be read."""
    f = layout.split_file(task, d, split)
    if not f.is_file():
        defects.append(f"task {task.name!r}: split file {f} is missing")
        return None
    try:
        entries, problems = layout.entries(task, d, split)
    except DataError as exc:
        defects.append(str(exc))
        return None
    defects.extend(problems)
    out = []
    for where, rel, y in entries:
        src = layout.image(task, d, rel)
        sources[str(src)] = src
        out.append((where, str(src), y))
    return out


def _stat(path):
    try:
        st = os.stat(getattr(path, "file", path))  # a container member: its file's
        return (st.st_size, st.st_mtime_ns)
    except OSError:
        return None


def _stamp_dir() -> Path | None:
    base = cache_base()
    return base / "verified" if base is not None else None


def _stamp_file(task: Task, d: Path) -> Path | None:
    sd = _stamp_dir()
    if sd is None:
        return None
    h = hashlib.sha256(str(d.resolve()).encode()).hexdigest()[:12]
    return sd / f"{task.name}-{h}.json"


def verify_task(task: Task, data_root: Path, *, check_images: bool = True, workers: int | None = None,
                use_stamp: bool = True, progress: bool = True) -> VerifyReport:
    t0 = time.time()
    layout, d = locate(task, Path(data_root))
    rep = VerifyReport(task.name, str(d))
    if not d.is_dir():
        rep.defects.append(f"task {task.name!r}: data folder {d} does not exist. {task.how_to_get}".strip())
        return rep
    try:
        manifest = read_manifest(d)
    except DataError as exc:
        rep.defects.append(str(exc))
        manifest = None
    try:
        declared = {str(k): int(v) for k, v in ((manifest or {}).get("split_sizes") or {}).items()}
    except (TypeError, ValueError):
        rep.defects.append(f"{d / MANIFEST}: split_sizes must map split names to integers")
        declared = {}
    if manifest is not None:
        changed = [f"{k} {v} (official: {task.split_sizes[k]})" for k, v in declared.items()
                   if task.split_sizes.get(k) and task.split_sizes[k] != v]
        rep.notes.append(
            f"this tree was prepared by {manifest.get('prepared_by', '?')} from {manifest.get('source', '?')} "
            f"({d / MANIFEST}); it is not the released {task.suite} split"
            + (f"; sizes it declares: {', '.join(changed)}" if changed else ""))

    per_split: dict[str, list[tuple[str, str, int]]] = {}
    sources: dict = {}
    for split in task_splits(task):
        entries = _parse(task, layout, d, split, rep.defects, sources)
        f = layout.split_file(task, d, split)
        if entries is None:
            continue
        per_split[split] = entries
        expected = declared.get(split) or task.split_sizes.get(split) or 0
        labels = [y for _, _, y in entries]
        present = set(labels)
        rep.splits[split] = {"file": str(f), "entries": len(entries), "classes": len(present),
                             "expected": expected or None}
        n_lines = len(entries)
        if expected and n_lines != expected:
            src = "declared in " + MANIFEST if split in declared else f"{task.suite} {split}"
            rep.defects.append(f"{f}: {n_lines} valid entries, expected {expected} ({src})")
        missing = sorted(set(range(task.num_classes)) - present)
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (f" ... ({len(missing)} in all)" if len(missing) > 20 else "")
            msg = f"{f}: class(es) {shown} have no example in {split}"
            if split in task.complete_splits:
                rep.defects.append(msg + f" (every class of {task.name} must occur in {split})")
            else:
                rep.notes.append(msg)

    # images: unique paths, each with the first place that lists it
    where: dict[str, list[str]] = {}
    for entries in per_split.values():
        for w, p, _ in entries:
            where.setdefault(p, []).append(w)
    rep.images = len(where)
    parse_ok = not rep.defects and len(per_split) == len(task_splits(task))
    if parse_ok:
        try:
            rep.fingerprint = fingerprint(task, data_root)
        except DataError as exc:
            rep.defects.append(str(exc))
    if not check_images or not where:
        rep.seconds = time.time() - t0
        return rep

    paths = sorted(where)
    nw = workers or max(1, min(16, (os.cpu_count() or 1) * 2))
    with ThreadPoolExecutor(max_workers=nw) as pool:
        stats = list(pool.map(lambda q: _stat(sources[q]), paths))
    stamp_key = None
    stamp = _stamp_file(task, d) if use_stamp else None
    if parse_ok and rep.fingerprint and all(s is not None for s in stats):
        h = hashlib.sha256()
        h.update(json.dumps({"v": VERIFY_VERSION, "fp": rep.fingerprint, "classes": task.num_classes,
                             "sizes": task.split_sizes, "complete": list(task.complete_splits),
                             "manifest": manifest, "layout": layout.name}, sort_keys=True).encode())
        for split in task_splits(task):
            h.update(repr((split, _stat(str(layout.split_file(task, d, split))))).encode())
        for p, s in zip(paths, stats):
            h.update(f"{p}\t{s[0]}\t{s[1]}\n".encode())
        stamp_key = h.hexdigest()
        if stamp is not None and stamp.is_file():
            try:
                old = json.loads(stamp.read_text())
            except ValueError:
                old = {}
            if old.get("key") == stamp_key:
                rep.from_stamp = True
                rep.seconds = time.time() - t0
                return rep

    from . import images

    show = progress and sys.stderr.isatty()
    bad: dict[str, str] = {}
    done = 0
    step = max(1, len(paths) // 200)
    with ThreadPoolExecutor(max_workers=nw) as pool:
        for p, problem in zip(paths, pool.map(lambda q: images.check_image(sources[q]), paths)):
            done += 1
            if problem:
                bad[p] = problem
            if show and (done % step == 0 or done == len(paths)):
                print(f"\rverify {task.name}: {done}/{len(paths)} images checked, {len(bad)} bad",
                      end="", file=sys.stderr, flush=True)
    if show:
        print(file=sys.stderr, flush=True)
    for p in paths:
        if p in bad:
            for w in where[p]:
                rep.defects.append(f"{w}: image {p} {bad[p]}")
    if rep.ok and stamp is not None and stamp_key is not None:
        atomic_write_text(stamp, json.dumps({"key": stamp_key, "task": task.name, "directory": str(d),
                                             "fingerprint": rep.fingerprint, "images": rep.images,
                                             "verified_at": now()}, indent=1),
                          fsync=False)
    rep.seconds = time.time() - t0
    return rep


def verify_tasks(tasks: list[Task], data_root: Path, **kw) -> list[VerifyReport]:
    return [verify_task(t, data_root, **kw) for t in tasks]


def failure_message(reports: list[VerifyReport], limit: int = 40) -> str:
    """The DataError text a sweep stops with: every defect (up to ``limit``) with file, line and what."""
    bad = [r for r in reports if not r.ok]
    lines = [f"data verification failed for {len(bad)} task(s) ({', '.join(r.task for r in bad)}):"]
    n = 0
    for r in bad:
        for dft in r.defects:
            if n >= limit:
                break
            lines.append(f"  [{r.task}] {dft}")
            n += 1
    total = sum(len(r.defects) for r in bad)
    if total > n:
        lines.append(f"  ... and {total - n} more (`peftbench data verify` lists them all)")
    lines.append("Fix the data (see `peftbench data prepare`), or pass --no-verify-data to run anyway.")
    return "\n".join(lines)


def require_verified(tasks: list[Task], data_root: Path, *, quiet: bool = False) -> list[VerifyReport]:
    """What a sweep calls before planning: verify every task, raise DataError listing every defect."""
    reports = verify_tasks(tasks, data_root)
    if not all(r.ok for r in reports):
        raise DataError(failure_message(reports))
    if not quiet:
        fresh = [r for r in reports if not r.from_stamp]
        print(f"peftbench: data verified: {len(reports)} task(s)"
              + (f", {len(fresh)} checked now ({sum(r.images for r in fresh)} images decoded)" if fresh else
                 ", unchanged since their last verification"), file=sys.stderr, flush=True)
    return reports
