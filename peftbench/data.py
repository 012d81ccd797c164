"""Split tensors for training: decoded once, cached on disk as a memory-mapped uint8 array, normalised per batch.

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

Geometry (what is stored)
-------------------------
* ``preprocess == "resize"`` (VTAB, spec §7.1): every split is resized straight to ``size`` × ``size``.
* ``preprocess == "resize-crop"`` (FGVC, spec §7.2), with ``R = int(size * 256 / 224)`` (256 for 224,
  the same rule as VPT's ``transforms.py``: 448 → 512, 384 → 438):

  - evaluation splits: shorter side resized to ``R`` (aspect kept, PIL bilinear, torchvision's
    ``Resize(R)`` arithmetic), then the centre ``size`` × ``size`` crop (torchvision's ``CenterCrop``
    rounding). This is exactly VPT's ``Resize(256) → CenterCrop(224)``.
  - training splits (the first split of each ``task.splits`` pair, when the task has ``augment``):
    shorter side resized to ``R`` the same way, then the centre ``R`` × ``R`` square is stored;
    :func:`peftbench.augment.random_crop_flip` cuts a random ``size`` crop from it and flips it with
    probability 0.5 at every step. **Approximation:** VPT's ``Resize(256) → RandomCrop(224)`` draws the
    crop from the whole resized image (e.g. 256 × 341 for a 3:4 photo); here the crop position along
    the longer side is limited to the central 256 pixels, i.e. the outer ``(long - 256) / 2`` pixels
    at each end of the longer side are never seen in training. Scale, aspect ratio, interpolation,
    crop size and flip are as in VPT; square images are not affected at all.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cachedir import cache_base
from .images import decode_into
from .task import Split, Task, fingerprint, read_split

CACHE_VERSION = 1
HEADER_BYTES = 4096
MAGIC = b"PEFTBENCH-U8\n"


@dataclass
class SplitData:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Geometry:
    """How a split's images are stored: ``stored`` × ``stored``, made by resizing straight to it
    (``resize_shorter`` None) or by resizing the shorter side to ``resize_shorter`` and centre-cropping."""

    stored: int
    resize_shorter: int | None = None
    interpolation: str = "bilinear"

    @property
    def tag(self) -> str:
        how = f"s{self.resize_shorter}c{self.stored}" if self.resize_shorter else f"r{self.stored}"
        return f"{how}{'' if self.interpolation == 'bilinear' else '-' + self.interpolation}"


def resize_length(size: int) -> int:
    """VPT's resize length for a crop of ``size`` (224 → 256)."""
    return int(size * 256 / 224)


def training_splits(task: Task) -> set[str]:
    return {pair[0] for pair in task.splits.values()}


def geometry(task: Task, split: str, size: int) -> Geometry:
    if task.preprocess == "resize":
        return Geometry(size)
    if task.preprocess == "resize-crop":
        r = resize_length(size)
        if task.augment is not None and split in training_splits(task):
            return Geometry(r, r)  # random crops of `size` are cut from it while training
        return Geometry(size, r)
    raise ValueError(f"task {task.name!r}: unknown preprocess {task.preprocess!r} (resize | resize-crop)")


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
    folder = hashlib.sha256(str(task.directory(data_root).resolve()).encode()).hexdigest()[:8]
    return d / f"{_safe(task.name)}-{_safe(split)}-{fp}-{geo.tag}-{folder}.u8"


# ---------------------------------------------------------------------------------------------
# the memory-mapped files
# ---------------------------------------------------------------------------------------------


def _header(task: Task, split: Split, geo: Geometry, fp: str, task_dir: Path) -> dict:
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


def _open(path: Path, expected: dict) -> np.ndarray | None:
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


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _build(path: Path, header: dict, split: Split, geo: Geometry, *, log=True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    shape = tuple(header["shape"])
    t0 = time.time()
    try:
        with open(tmp, "wb") as fh:
            fh.write(_encode_header(header))
            fh.truncate(HEADER_BYTES + int(np.prod(shape)))
        if shape[0]:
            mm = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=HEADER_BYTES, shape=shape)
            decode_into(mm, split.paths, geo.stored, geo.interpolation, geo.resize_shorter, _workers(),
                        progress=_progress(f"{split.task}/{split.name}", len(split)) if log else None)
            mm.flush()
            del mm
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if log:
        dt = time.time() - t0
        print(f"\rpeftbench: decoded {split.task}/{split.name}: {len(split)} images "
              f"({geo.stored}x{geo.stored}) in {dt:.1f}s ({len(split) / max(dt, 1e-9):.0f} img/s) -> {path}",
              file=sys.stderr, flush=True)


def _progress(label: str, total: int):
    if not sys.stderr.isatty():
        return None

    def show(done: int) -> None:
        print(f"\rpeftbench: decoding {label}: {done}/{total} images", end="", file=sys.stderr, flush=True)

    return show


def decoded_images(task: Task, data_root: Path, split: Split, geo: Geometry, *, log: bool = True) -> torch.Tensor:
    """(N, 3, H, W) uint8 images of ``split``: from the disk cache, built first when missing."""
    from .images import decode_many

    if decoded_dir() is None:
        return decode_many(split.paths, geo.stored, geo.interpolation, _workers(), geo.resize_shorter)
    fp = fingerprint(task, data_root)
    path = cache_path(task, data_root, split.name, geo, fp)
    header = _header(task, split, geo, fp, task.directory(data_root))
    arr = _open(path, header) if path.exists() else None
    if arr is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / ".locks").mkdir(exist_ok=True)
        with _locked(path.parent / ".locks" / (path.name + ".lock")):
            arr = _open(path, header) if path.exists() else None  # another process may have built it
            if arr is None:
                _build(path, header, split, geo, log=log)
                arr = _open(path, header)
                if arr is None:
                    raise RuntimeError(f"the decoded-image cache {path} could not be read back")
    return torch.from_numpy(arr)


# ---------------------------------------------------------------------------------------------
# what the engine calls
# ---------------------------------------------------------------------------------------------

_CACHE: dict[tuple, SplitData] = {}


def load_split(task: Task, data_root: Path, split: str, size: int) -> SplitData:
    """Images (uint8, geometry of :func:`geometry`) and labels of one split; decoded at most once."""
    key = (task.name, str(Path(data_root).resolve()), split, size)
    if key not in _CACHE:
        s = read_split(task, data_root, split)
        images = decoded_images(task, data_root, s, geometry(task, split, size))
        _CACHE[key] = SplitData(images, torch.tensor(s.labels, dtype=torch.long))
        while len(_CACHE) > 8:  # keep memory bounded in long sweeps
            _CACHE.pop(next(iter(_CACHE)))
    return _CACHE[key]


def clear_cache() -> None:
    """Forget the in-process split tensors (the disk cache stays)."""
    _CACHE.clear()


# ---------------------------------------------------------------------------------------------
# loader benchmark (`peftbench data bench`)
# ---------------------------------------------------------------------------------------------


def bench(task: Task, data_root: Path, split: str, size: int, *, batch: int = 256, limit: int | None = None) -> dict:
    """Images per second: cold decode (no cache) vs warm memory map (random batches, as training reads)."""
    from .images import decode_many

    s = read_split(task, data_root, split)
    if limit is not None and limit < len(s):
        s = Split(s.task, s.name, s.file, s.paths[:limit], s.labels[:limit])
    geo = geometry(task, split, size)
    n = len(s)
    t0 = time.perf_counter()
    decode_many(s.paths, geo.stored, geo.interpolation, _workers(), geo.resize_shorter)
    cold = n / (time.perf_counter() - t0)
    out = {"task": task.name, "split": split, "images": n, "stored": geo.stored, "cold_decode_img_s": cold,
           "workers": _workers()}
    if decoded_dir() is None:
        out["warm_memmap_img_s"] = None
        return out
    if limit is None:
        t0 = time.perf_counter()
        images = decoded_images(task, data_root, s, geo, log=False)  # builds the cache when missing
        out["first_load_s"] = time.perf_counter() - t0
    else:  # a subset: its own throw-away file
        tmp_path = decoded_dir() / f".bench-{os.getpid()}-{uuid.uuid4().hex[:6]}.u8"
        header = _header(task, s, geo, "bench", task.directory(data_root))
        _build(tmp_path, header, s, geo, log=False)
        images = torch.from_numpy(_open(tmp_path, header))
    t0 = time.perf_counter()
    opened = decoded_images(task, data_root, s, geo, log=False) if limit is None else images
    out["open_s"] = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    arr = opened.numpy()  # the memory map itself
    for key, gather in (("warm_memmap_img_s", lambda idx: arr[idx.numpy()]),  # page-cache copies
                        ("torch_index_img_s", lambda idx: opened[idx])):  # torch indexing, for comparison
        gather(torch.randperm(n, generator=g)[:batch])  # warm-up
        t0 = time.perf_counter()
        seen, epochs = 0, 0
        while epochs < 2 or time.perf_counter() - t0 < 0.3:  # random batches, as training reads them
            order = torch.randperm(n, generator=g)
            for i in range(0, n, batch):
                seen += gather(order[i:i + batch]).shape[0]
            epochs += 1
        out[key] = seen / (time.perf_counter() - t0)
    if limit is not None:
        del images, opened
        with contextlib.suppress(OSError):
            tmp_path.unlink()
    return out
