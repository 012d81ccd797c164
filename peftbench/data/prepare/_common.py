"""What the per-task converters of ``peftbench data prepare`` share: the image items they collect, the
NOAH-layout writer (VTAB sizes), seeded carving, source lookup, restricted unpickling."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import DataError
from ...provenance import now
from ...tasks import Task
from ..verify import MANIFEST

NOT_IDENTICAL = ("NOT byte-identical to the released VTAB-1k splits: train800/val200 are drawn "
                 "deterministically from the train/val portions task_adaptation defines")


@dataclass
class Item:
    """One image to write: a file to link/copy, or an array (H, W) / (H, W, 3) uint8 to save as PNG."""

    label: int
    file: Path | None = None
    array: np.ndarray | None = None
    load: Callable[[], np.ndarray] | None = None  # lazily made array (big sources)


@dataclass
class Portions:
    train: list[Item]  # train800 is drawn from it
    val: list[Item]  # val200 is drawn from it
    test: list[Item]  # written whole
    note: str = ""
    source: list[str] = field(default_factory=list)


def seeded_rng(task: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(task.encode()))


def carve(items: list, fractions: tuple[float, ...], rng: np.random.Generator) -> list[list]:
    """Deterministic permutation of ``items`` cut into consecutive parts (the last takes the rest)."""
    order = rng.permutation(len(items))
    parts, start = [], 0
    for frac in fractions[:-1]:
        n = int(frac * len(items))
        parts.append([items[i] for i in order[start:start + n]])
        start += n
    parts.append([items[i] for i in order[start:]])
    return parts


def find(source: Path, *candidates: str, what: str) -> Path:
    """The first existing ``source/<candidate>`` (also one folder further down); a clear error otherwise."""
    source = Path(source)
    for c in candidates:
        for base in [source] + sorted(p for p in source.iterdir() if p.is_dir()) if source.is_dir() else [source]:
            p = base / c
            if p.exists():
                return p
    raise DataError(f"{what}: none of {', '.join(candidates)} found under {source}")


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def save_png(arr: np.ndarray, dst: Path) -> None:
    from PIL import Image

    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    Image.fromarray(np.ascontiguousarray(a)).save(dst, format="PNG")


def write_noah(task: Task, data_root: Path, portions: Portions, *, source: Path, converter: str,
               workers: int = 8, log=print) -> Path:
    """Write train800/val200/train800val200/test in NOAH's layout (into a temp folder, renamed at the end)."""
    d = task.directory(data_root)
    n_train, n_val = task.split_sizes.get("train800", 800), task.split_sizes.get("val200", 200)
    if len(portions.train) < n_train or len(portions.val) < n_val:
        raise DataError(f"{task.name}: the source has only {len(portions.train)} train / {len(portions.val)} val "
                        f"images, VTAB-1k needs {n_train} / {n_val}")
    rng = seeded_rng(task.name + "/draw")
    train800 = [portions.train[i] for i in rng.permutation(len(portions.train))[:n_train]]
    val200 = [portions.val[i] for i in rng.permutation(len(portions.val))[:n_val]]
    tmp = d.with_name(f".{d.name}.preparing-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    lines: dict[str, list[str]] = {}
    jobs = []
    for split, items in (("train800", train800), ("val200", val200), ("test", portions.test)):
        (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i, it in enumerate(items):
            ext = it.file.suffix.lower() if it.file is not None else ".png"
            rel = f"images/{split}/{i:06d}{ext}"
            rows.append(f"{rel} {int(it.label)}")
            jobs.append((it, tmp / rel))
        lines[split] = rows
    lines["train800val200"] = lines["train800"] + lines["val200"]  # same image files, no copies

    def work(job):
        it, dst = job
        if it.file is not None:
            link_or_copy(it.file, dst)
        else:
            save_png(it.array if it.array is not None else it.load(), dst)

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for k, _ in enumerate(pool.map(work, jobs), 1):
            if k % 5000 == 0:
                log(f"  {task.name}: {k}/{len(jobs)} images written")
    for split, rows in lines.items():
        (tmp / f"{split}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    sizes = {s: len(r) for s, r in lines.items()}
    manifest = {
        "prepared_by": f"peftbench data prepare ({converter})",
        "source": [str(s) for s in (portions.source or [source])],
        "identical_to_release": False,
        "split_sizes": sizes,
        "note": NOT_IDENTICAL + ". " + portions.note,
        "seed": f"crc32({task.name!r})",
        "created": now(),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if d.exists():
        old = d.with_name(f".{d.name}.old-{os.getpid()}")
        d.rename(old)
        tmp.rename(d)
        shutil.rmtree(old, ignore_errors=True)
    else:
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(d)
    log(f"{task.name}: wrote {d} ({', '.join(f'{k} {v}' for k, v in sizes.items())}) in {time.time() - t0:.0f}s")
    return d


# ---------------------------------------------------------------------------------------------
# restricted unpickling (CIFAR-100's python pickle batches)
# ---------------------------------------------------------------------------------------------


class SafeUnpickler(pickle.Unpickler):
    """Loads plain data and numpy arrays only; any other global (code) is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            if module.startswith("numpy.core.") and hasattr(np, "_core"):
                module = "numpy._core." + module.split(".", 2)[2]
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a CIFAR batch holds only arrays, lists and numbers")


def load_pickle(path: Path) -> dict:
    with open(path, "rb") as fh:
        try:
            obj = SafeUnpickler(fh, encoding="bytes").load()
        except pickle.UnpicklingError as exc:
            raise DataError(f"{path}: {exc}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}



IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif"}


def class_folders(root: Path) -> list[tuple[str, list[Path]]]:
    out = []
    for c in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name.lower()):
        files = sorted(f for f in c.iterdir() if f.suffix.lower() in IMG_EXT and f.is_file())
        out.append((c.name, files))
    if not out:
        raise DataError(f"{root}: no class folders")
    return out


def loadmat(path: Path) -> dict:
    try:
        import scipy.io
    except ImportError:
        raise DataError(f"{path}: reading .mat files needs scipy (pip install scipy)") from None
    return scipy.io.loadmat(str(path))
