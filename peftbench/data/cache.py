"""The decoded-image cache: every split decoded once, kept on disk as a memory-mapped uint8 array.

Decoded-image cache
-------------------
The first use of a (task, split, geometry) decodes and resizes every image once, in parallel threads,
into ``<cache>/decoded/<task>-<split>-<fingerprint>-<geometry>-<folder hash>.u8``: a 4 KiB JSON header
(``head -c 4096`` shows it) followed by the (N, 3, H, W) uint8 array, opened with ``numpy.memmap`` so
that later runs, epochs and processes never decode an image again (reading it is a page-cache copy).
``<cache>`` is ``$PEFTBENCH_CACHE`` or ``~/.cache/peftbench``; ``PEFTBENCH_CACHE=off`` disables the
disk cache (images are then decoded in every process). The key holds the task's fingerprint (a hash
of all its split lists, the value every run record stores), the task folder and the geometry, so a
changed split list, another data root or another input size gives another file. Images replaced in
place under the same file names are not noticed: delete the cache folder after doing that. Two
processes that build the same file at once are safe: a lock file serialises them where ``fcntl``
locks work, and each builds into a temporary file that is atomically renamed (last writer wins, with
identical content).

What is stored for a split (its :class:`~peftbench.data.transforms.Geometry`) is decided by the
task's preprocessing (:mod:`peftbench.data.transforms`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write
from ..tasks import Task
from ._cachedir import cache_base
from .images import decode_into, decode_many
from .layouts import Split, locate
from .splits import fingerprint
from .transforms import Geometry

CACHE_VERSION = 1
HEADER_BYTES = 4096
MAGIC = b"PEFTBENCH-U8\n"


# ---------------------------------------------------------------------------------------------
# cache location
# ---------------------------------------------------------------------------------------------


def decoded_dir() -> Path | None:
    base = cache_base()
    return base / "decoded" if base is not None else None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]


def cache_path(task: Task, data_root: Path, split: str, geo: Geometry, fp: str | None = None) -> Path | None:
    d = decoded_dir()
    if d is None:
        return None
    fp = fp or fingerprint(task, data_root)
    folder = hashlib.sha256(str(locate(task, Path(data_root))[1].resolve()).encode()).hexdigest()[:8]
    return d / f"{_safe(task.name)}-{_safe(split)}-{fp}-{geo.tag}-{folder}.u8"


# ---------------------------------------------------------------------------------------------
# the memory-mapped files
# ---------------------------------------------------------------------------------------------


def cache_header(task: Task, split: Split, geo: Geometry, fp: str, task_dir: Path) -> dict:
    return {"version": CACHE_VERSION, "task": task.name, "split": split.name, "fingerprint": fp,
            "shape": [len(split), 3, geo.stored, geo.stored], "dtype": "uint8",
            "geometry": {"stored": geo.stored, "resize_shorter": geo.resize_shorter,
                         "interpolation": geo.interpolation},
            "task_dir": str(task_dir)}


def _encode_header(h: dict) -> bytes:
    body = MAGIC + json.dumps(h, sort_keys=True).encode() + b"\n"
    if len(body) > HEADER_BYTES:
        raise ValueError("cache header too long")
    return body + b" " * (HEADER_BYTES - len(body))


def read_header(path: Path) -> dict | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEADER_BYTES)
    except OSError:
        return None
    if not head.startswith(MAGIC) or len(head) < HEADER_BYTES:
        return None
    try:
        return json.loads(head[len(MAGIC):].split(b"\n", 1)[0])
    except ValueError:
        return None


def open_cache_file(path: Path, expected: dict) -> np.ndarray | None:
    """The cached array if ``path`` holds exactly what ``expected`` describes, else None."""
    h = read_header(path)
    keys = ("version", "fingerprint", "shape", "geometry", "dtype")
    if h is None or any(h.get(k) != expected[k] for k in keys):
        return None
    shape = tuple(expected["shape"])
    if path.stat().st_size != HEADER_BYTES + int(np.prod(shape)):
        return None
    if shape[0] == 0:
        return np.zeros(shape, dtype=np.uint8)
    # copy-on-write: writable for torch.from_numpy, nothing is ever written back
    return np.memmap(path, dtype=np.uint8, mode="c", offset=HEADER_BYTES, shape=shape)


@contextlib.contextmanager
def _locked(lock_path: Path):
    try:
        import fcntl
    except ImportError:  # no POSIX locks: atomic rename alone keeps readers safe
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def decode_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def write_cache_file(path: Path, header: dict, split: Split, geo: Geometry, *, log=True) -> None:
    shape = tuple(header["shape"])
    t0 = time.time()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(_encode_header(header))
            fh.truncate(HEADER_BYTES + int(np.prod(shape)))
        if shape[0]:
            mm = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=HEADER_BYTES, shape=shape)
            decode_into(mm, split.paths, geo.stored, geo.interpolation, geo.resize_shorter, decode_workers(),
                        progress=_progress(f"{split.task}/{split.name}", len(split)) if log else None)
            mm.flush()
            del mm

    atomic_write(path, write, fsync=False)  # a lost cache file is rebuilt; no need to wait for the disk
    if log:
        dt = time.time() - t0
        lead = "\r" if _isatty() else ""  # over the \r progress line of a terminal; a log gets whole lines
        folder = str(path.parent)
        if folder not in _ANNOUNCED:  # the cache folder once per process, not an absolute path on every line
            _ANNOUNCED.add(folder)
            print(f"{lead}peftbench: decoded images are cached in {folder}", file=sys.stderr, flush=True)
            lead = ""
        print(f"{lead}peftbench: decoded {split.task}/{split.name}: {len(split)} images "
              f"({geo.stored}x{geo.stored}) in {dt:.1f}s ({len(split) / max(dt, 1e-9):.0f} img/s)",
              file=sys.stderr, flush=True)


_ANNOUNCED: set[str] = set()  # cache folders already named in this process


def _isatty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _progress(label: str, total: int):
    if not _isatty():
        return None

    def show(done: int) -> None:
        print(f"\rpeftbench: decoding {label}: {done}/{total} images", end="", file=sys.stderr, flush=True)

    return show


def decoded_images(task: Task, data_root: Path, split: Split, geo: Geometry, *, log: bool = True) -> torch.Tensor:
    """(N, 3, H, W) uint8 images of ``split``: from the disk cache, built first when missing."""
    if decoded_dir() is None:
        return decode_many(split.paths, geo.stored, geo.interpolation, decode_workers(), geo.resize_shorter)
    fp = fingerprint(task, data_root)
    path = cache_path(task, data_root, split.name, geo, fp)
    header = cache_header(task, split, geo, fp, locate(task, Path(data_root))[1])
    arr = open_cache_file(path, header) if path.exists() else None
    if arr is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / ".locks").mkdir(exist_ok=True)
        with _locked(path.parent / ".locks" / (path.name + ".lock")):
            arr = open_cache_file(path, header) if path.exists() else None  # another process may have built it
            if arr is None:
                write_cache_file(path, header, split, geo, log=log)
                arr = open_cache_file(path, header)
                if arr is None:
                    raise RuntimeError(f"the decoded-image cache {path} could not be read back")
    return torch.from_numpy(arr)


