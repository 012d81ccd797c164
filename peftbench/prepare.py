"""``peftbench data prepare``: how to get each task's data, and TF-free converters where possible.

The released VTAB-1k splits (NOAH's exported archive: ``vtab-1k/<task>/{train800,val200,
train800val200,test}.txt`` + ``images/``) are what the papers used; get them when you can. Where a
public source already sits on disk in a format that needs no TensorFlow (torchvision's on-disk
layouts, the original archives), a converter writes the NOAH layout with the VTAB-1k split *sizes*:

* train800 / val200 are drawn deterministically (a seeded permutation, seed = crc32 of the task name)
  from the train / val portions that google-research/task_adaptation carves out of the dataset
  (same percentages: e.g. Pets 80/20 of trainval, EuroSAT 60/20/20, dSprites 80/10/10);
* test is the official test portion where task_adaptation uses one (CIFAR-100, DTD, Flowers102,
  Pets, SVHN, Patch Camelyon, CLEVR's validation split), otherwise the same carve-out.

**These splits are NOT byte-identical to the released VTAB-1k splits** (TFDS's example order cannot
be reproduced without TFDS, so other images land in train800/val200, and for the carved-out tests
in test). Each converted task says so in ``<task>/peftbench_prepared.json`` (with its split sizes,
which ``peftbench data verify`` then checks) and the verify report prints it. Images are hard-linked
(or copied) from the source when they already are image files, and written as PNG (lossless)
when the source holds arrays; nothing is re-encoded as JPEG.

Tasks without a converter (DMLab, KITTI, Diabetic Retinopathy) need the released VTAB-1k archive:
their labels come from TFDS-specific processing (KITTI's closest-vehicle bins over TFDS's own
train/val/test split of the KITTI object benchmark, DMLab's TFDS export, Retinopathy's btgraham-300
preprocessing).

FGVC converters write VPT's JSON layout from each dataset's official annotation files: test = the
official test set, train/val = a deterministic 90/10 split of the official train set (the VFPT text's
description; Oxford Flowers uses its official train/val split). VPT's own JSON files are not
downloadable any more, so these are not VPT's exact train/val splits either. Images are not copied:
the dataset's image folder is symlinked into the task folder.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .task import DataError, Task, get_task

MANIFEST = "peftbench_prepared.json"

NOT_IDENTICAL = ("NOT byte-identical to the released VTAB-1k splits: train800/val200 are drawn "
                 "deterministically from the train/val portions task_adaptation defines")


# ---------------------------------------------------------------------------------------------
# instructions
# ---------------------------------------------------------------------------------------------

ARCHIVE = ("the released VTAB-1k archive (NOAH's export, `vtab-1k/<task>/...`; see NOAH's README, "
           "`data/vtab-source/get_vtab1k.py` regenerates it with TensorFlow + TFDS)")

VTAB_SOURCES: dict[str, str] = {
    "cifar100": "torchvision CIFAR100(root, download=True) → <source>/cifar-100-python/{train,test} (python pickle batches)",
    "caltech101": "torchvision Caltech101 → <source>/caltech101/101_ObjectCategories/<class>/*.jpg "
                  "(the 101_ObjectCategories archive; BACKGROUND_Google is kept as a class, as in TFDS)",
    "dtd": "torchvision DTD → <source>/dtd/dtd/{images,labels} (or the dtd-r1.0.1 archive: dtd/{images,labels}); "
           "partition 1 (train1/val1/test1), as TFDS",
    "oxford_flowers102": "torchvision Flowers102 → <source>/flowers-102/{jpg/,imagelabels.mat,setid.mat}",
    "oxford_iiit_pet": "torchvision OxfordIIITPet → <source>/oxford-iiit-pet/{images/,annotations/trainval.txt,test.txt}",
    "svhn": "torchvision SVHN (train and test) → <source>/train_32x32.mat, test_32x32.mat (read with scipy)",
    "sun397": "torchvision SUN397 / the SUN397.tar.gz archive → <source>/SUN397/<letter>/<class>/*.jpg "
              "(70/10/20 carve like TFDS sun397/tfds)",
    "patch_camelyon": "torchvision PCAM → <source>/pcam/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 "
                      "(read with h5py)",
    "eurosat": "torchvision EuroSAT → <source>/eurosat/2750/<Class>/*.jpg (RGB)",
    "resisc45": "the NWPU-RESISC45 archive, extracted → <source>/NWPU-RESISC45/<class>/*.jpg",
    "diabetic_retinopathy": "needs the VTAB-1k archive: Kaggle images + TF's btgraham-300 preprocessing",
    "clevr_count": "torchvision CLEVRClassification / CLEVR_v1.0.zip → <source>/clevr/CLEVR_v1.0/"
                   "{images/{train,val},scenes/CLEVR_{train,val}_scenes.json}",
    "clevr_distance": "as clevr_count (labels from the scenes' pixel_coords depth, task_adaptation's thresholds)",
    "dmlab": "needs the VTAB-1k archive: the DMLab frames exist only as TFDS's export",
    "kitti_distance": "needs the VTAB-1k archive: its labels need TFDS kitti 3.2.0's own split of the object benchmark",
    "dsprites_location": "the dSprites file dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz "
                         "(github.com/deepmind/dsprites-dataset) → <source>/",
    "dsprites_orientation": "as dsprites_location",
    "smallnorb_azimuth": "the smallNORB files smallnorb-5x46789x9x18x6x2x96x96-training-{dat,cat,info}.mat and "
                         "smallnorb-5x01235x9x18x6x2x96x96-testing-{dat,cat,info}.mat (optionally .gz) → <source>/",
    "smallnorb_elevation": "as smallnorb_azimuth",
}

FGVC_SOURCES: dict[str, str] = {
    "cub200": "the CUB_200_2011 archive, extracted → <source>/CUB_200_2011/{images/,images.txt,"
              "image_class_labels.txt,train_test_split.txt}",
    "nabirds": "the NABirds archive, extracted → <source>/nabirds/{images/,images.txt,image_class_labels.txt,"
               "train_test_split.txt}",
    "oxford_flowers": "Flowers102 as for VTAB → <source>/flowers-102/{jpg/,imagelabels.mat,setid.mat} "
                      "(official train/val/test)",
    "stanford_dogs": "the Stanford Dogs archives, extracted → <source>/{Images/,train_list.mat,test_list.mat} "
                     "(or torchvision-free: lists/)",
    "stanford_cars": "torchvision StanfordCars → <source>/stanford_cars/{cars_train/,cars_test/,devkit/"
                     "cars_train_annos.mat,cars_test_annos_withlabels.mat}",
}


def instructions(suite: str, task: str | None = None) -> str:
    """The printed (and documented) instructions for a suite or one task."""
    if suite == "vtab":
        tasks = [get_task(task).name] if task else list(VTAB_SOURCES)
        lines = [
            "VTAB-1k (NOAH layout): DATA_ROOT/vtab-1k/<folder>/{train800,val200,train800val200,test}.txt + images/",
            "Best: " + ARCHIVE + ", extracted so that DATA_ROOT/vtab-1k/<folder>/ exists.",
            "Otherwise: download a task's public source (below) and run",
            "  peftbench data prepare --suite vtab --task TASK --source SOURCE_DIR --data-root DATA_ROOT",
            "which writes the NOAH layout with VTAB-1k split sizes; " + NOT_IDENTICAL + ".",
            "",
        ]
        for t in tasks:
            conv = "converter" if t in VTAB_CONVERTERS else "archive only"
            lines.append(f"  {t:<22} [{conv}] {VTAB_SOURCES[t]}")
        return "\n".join(lines)
    if suite == "fgvc":
        tasks = [get_task(task).name] if task else list(FGVC_SOURCES)
        lines = [
            "FGVC (VPT JSON layout): DATA_ROOT/fgvc/<folder>/{train,val,test}.json + the dataset's images.",
            "Best: VPT's released split JSON files (no longer downloadable from VPT's links) placed next to the",
            "dataset's images. Otherwise run",
            "  peftbench data prepare --suite fgvc --task TASK --source SOURCE_DIR --data-root DATA_ROOT",
            "which writes JSON splits from the official annotations (test = official test; train/val = a",
            "deterministic 90/10 split of the official train set; Flowers: official train/val) and symlinks the images.",
            "",
        ]
        for t in tasks:
            lines.append(f"  {t:<16} {FGVC_SOURCES[t]}")
        return "\n".join(lines)
    if suite == "demo":
        return "The demo tasks build themselves on first use (no download); nothing to prepare."
    raise DataError(f"unknown suite {suite!r} for prepare (vtab | fgvc)")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


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


def _rng(task: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(task.encode()))


def _carve(items: list, fractions: tuple[float, ...], rng: np.random.Generator) -> list[list]:
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


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _save_png(arr: np.ndarray, dst: Path) -> None:
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
    rng = _rng(task.name + "/draw")
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
            _link_or_copy(it.file, dst)
        else:
            _save_png(it.array if it.array is not None else it.load(), dst)

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
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
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
# CIFAR-100: python pickle batches, read with a restricted unpickler
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


def convert_cifar100(source: Path, task: str) -> Portions:
    d = find(source, "cifar-100-python", what="CIFAR-100")
    items = {}
    for part in ("train", "test"):
        b = load_pickle(d / part)
        data = np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = list(b["fine_labels"])
        items[part] = [Item(int(y), array=data[i]) for i, y in enumerate(labels)]
    train, val = _carve(items["train"], (0.9, 0.1), _rng(task))
    return Portions(train, val, items["test"], "CIFAR-100: train/val = 90/10 of the official train set; "
                    "test = the official test set (10000).", [str(d)])


# ---------------------------------------------------------------------------------------------
# image-folder datasets
# ---------------------------------------------------------------------------------------------

_IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif"}


def _class_folders(root: Path) -> list[tuple[str, list[Path]]]:
    out = []
    for c in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name.lower()):
        files = sorted(f for f in c.iterdir() if f.suffix.lower() in _IMG_EXT and f.is_file())
        out.append((c.name, files))
    if not out:
        raise DataError(f"{root}: no class folders")
    return out


def convert_dtd(source: Path, task: str) -> Portions:
    labels_dir = find(source, "dtd/dtd/labels", "dtd/labels", "labels", what="DTD")
    images = labels_dir.parent / "images"
    classes = sorted(p.name for p in images.iterdir() if p.is_dir())
    index = {c: i for i, c in enumerate(classes)}

    def read(name):
        rows = (labels_dir / f"{name}1.txt").read_text().split()
        return [Item(index[r.split("/")[0]], file=images / r) for r in rows]

    return Portions(read("train"), read("val"), read("test"),
                    "DTD partition 1: train800 from train1, val200 from val1, test = test1 (1880).", [str(labels_dir.parent)])


def _loadmat(path: Path) -> dict:
    try:
        import scipy.io
    except ImportError:
        raise DataError(f"{path}: reading .mat files needs scipy (pip install scipy)") from None
    return scipy.io.loadmat(str(path))


def convert_oxford_flowers102(source: Path, task: str) -> Portions:
    d = find(source, "flowers-102", "flowers102", "jpg", what="Flowers102")
    d = d.parent if d.name == "jpg" else d
    labels = _loadmat(d / "imagelabels.mat")["labels"].ravel().astype(int) - 1
    setid = _loadmat(d / "setid.mat")

    def items(key):
        return [Item(int(labels[i - 1]), file=d / "jpg" / f"image_{i:05d}.jpg") for i in setid[key].ravel()]

    return Portions(items("trnid"), items("valid"), items("tstid"),
                    "Flowers102: train800 from the official train set, val200 from the official val set, "
                    "test = the official test set (6149); label = imagelabels - 1.", [str(d)])


def convert_oxford_iiit_pet(source: Path, task: str) -> Portions:
    d = find(source, "oxford-iiit-pet", "annotations", what="Oxford-IIIT Pets")
    d = d.parent if d.name == "annotations" else d

    def read(name):
        out = []
        for line in (d / "annotations" / f"{name}.txt").read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                img, cls = line.split()[:2]
                out.append(Item(int(cls) - 1, file=d / "images" / f"{img}.jpg"))
        return out

    train, val = _carve(read("trainval"), (0.8, 0.2), _rng(task))
    return Portions(train, val, read("test"), "Pets: train/val = 80/20 of the official trainval list; "
                    "test = the official test list (3669); label = CLASS-ID - 1.", [str(d)])


def convert_svhn(source: Path, task: str) -> Portions:
    parts = {}
    for name in ("train", "test"):
        m = _loadmat(find(source, f"{name}_32x32.mat", f"svhn/{name}_32x32.mat", what="SVHN"))
        x, y = m["X"], m["y"].ravel().astype(int) % 10  # label 10 is the digit 0
        parts[name] = [Item(int(y[i]), array=x[:, :, :, i]) for i in range(len(y))]
    train, val = _carve(parts["train"], (0.9, 0.1), _rng(task))
    return Portions(train, val, parts["test"], "SVHN cropped digits: train/val = 90/10 of train_32x32; "
                    "test = test_32x32 (26032); label 10 → 0.")


def _folder_dataset(root: Path, task: str, fractions, note: str) -> Portions:
    items = [Item(i, file=f) for i, (_, files) in enumerate(_class_folders(root)) for f in files]
    train, val, test = _carve(items, fractions, _rng(task))
    return Portions(train, val, test, note, [str(root)])


def convert_eurosat(source: Path, task: str) -> Portions:
    root = find(source, "eurosat/2750", "2750", "EuroSAT", what="EuroSAT (RGB)")
    return _folder_dataset(root, task, (0.6, 0.2, 0.2),
                           "EuroSAT RGB: 60/20/20 carve of all 27000 images as task_adaptation does, but not "
                           "TFDS's order: test is a different 20%.")


def convert_resisc45(source: Path, task: str) -> Portions:
    root = find(source, "NWPU-RESISC45", "resisc45", what="RESISC45")
    return _folder_dataset(root, task, (0.6, 0.2, 0.2),
                           "RESISC45: 60/20/20 carve as task_adaptation does, but not TFDS's order: test is a "
                           "different 20%.")


CALTECH_TRAIN_PER_CLASS = 30  # TFDS caltech101's train split: 30 random images per class


def convert_caltech101(source: Path, task: str) -> Portions:
    root = find(source, "caltech101/101_ObjectCategories", "101_ObjectCategories", what="Caltech-101")
    rng = _rng(task)
    pool, test = [], []
    for i, (_, files) in enumerate(_class_folders(root)):  # 102 classes, lower-case sorted as TFDS
        order = rng.permutation(len(files))
        k = CALTECH_TRAIN_PER_CLASS
        pool += [Item(i, file=files[j]) for j in order[:k]]
        test += [Item(i, file=files[j]) for j in sorted(order[k:])]
    train, val = _carve(pool, (0.9, 0.1), rng)
    return Portions(train, val, test, "Caltech-101: 30 images per class (seeded) form TFDS-style train, "
                    "the rest test; train/val = 90/10 of it. TFDS drew other 30s: test differs.", [str(root)])


def convert_sun397(source: Path, task: str) -> Portions:
    root = find(source, "SUN397", what="SUN397")
    classes = []
    for letter in sorted(p for p in root.iterdir() if p.is_dir()):
        for c in sorted(p for p in letter.rglob("*") if p.is_dir()):
            if any(f.suffix.lower() in _IMG_EXT for f in c.iterdir()):
                classes.append(c)
    items = [Item(i, file=f) for i, c in enumerate(classes)
             for f in sorted(x for x in c.iterdir() if x.suffix.lower() in _IMG_EXT)]
    train, val, test = _carve(items, (0.7, 0.1, 0.2), _rng(task))
    return Portions(train, val, test, "SUN397: 70/10/20 carve like TFDS sun397/tfds, not TFDS's draw.", [str(root)])


def convert_patch_camelyon(source: Path, task: str) -> Portions:
    try:
        import h5py
    except ImportError:
        raise DataError("Patch Camelyon's .h5 files need h5py (pip install h5py)") from None
    parts = {}
    for name in ("train", "valid", "test"):
        fx = find(source, f"camelyonpatch_level_2_split_{name}_x.h5", f"pcam/camelyonpatch_level_2_split_{name}_x.h5",
                  what="Patch Camelyon")
        fy = fx.with_name(fx.name.replace("_x.h5", "_y.h5"))
        with h5py.File(fy, "r") as h:
            y = np.asarray(h["y"]).reshape(-1).astype(int)

        h = h5py.File(fx, "r")  # kept open while converting; h5py serialises reads from the threads
        parts[name] = [Item(int(y[i]), load=(lambda i=i, x=h["x"]: np.asarray(x[i]))) for i in range(len(y))]
    return Portions(parts["train"], parts["valid"], parts["test"],
                    "Patch Camelyon: train800 from the official train, val200 from valid, test = official test (32768).")


def convert_dsprites(source: Path, task: str) -> Portions:
    f = find(source, "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz", what="dSprites")
    with np.load(f, allow_pickle=False) as z:  # the npz's 'metadata' (a pickle) is never read
        imgs = z["imgs"]
        latents = z["latents_classes"]
    column, original = (4, 32) if task == "dsprites_location" else (3, 40)
    factor = original / 16
    labels = np.floor(latents[:, column] / factor).astype(int)
    items = [Item(int(labels[i]), load=(lambda i=i: imgs[i] * 255)) for i in range(len(labels))]
    train, val, test = _carve(items, (0.8, 0.1, 0.1), _rng("dsprites"))
    return Portions(train, val, test, f"dSprites: 80/10/10 carve as task_adaptation (same permutation for both "
                    f"dSprites tasks), not TFDS's order; label = floor(latent / {factor:g}).", [str(f)])


def _read_norb(path: Path) -> np.ndarray:
    """The smallNORB binary matrix format (magic, ndim, dims, data; little-endian)."""
    import gzip

    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    magic, ndim = struct.unpack("<ii", raw[:8])
    dtypes = {0x1E3D4C55: np.uint8, 0x1E3D4C54: np.int32}
    if magic not in dtypes:
        raise DataError(f"{path}: not a smallNORB matrix file (magic {magic:#x})")
    dims = struct.unpack(f"<{max(3, ndim)}i", raw[8:8 + 4 * max(3, ndim)])[:ndim]
    data = np.frombuffer(raw, dtype=dtypes[magic], offset=8 + 4 * max(3, ndim))
    return data.reshape(dims)


def convert_smallnorb(source: Path, task: str) -> Portions:
    def part(prefix):
        base = {}
        for kind in ("dat", "info"):
            base[kind] = _read_norb(find(source, f"{prefix}-{kind}.mat", f"{prefix}-{kind}.mat.gz", what="smallNORB"))
        return base

    tr = part("smallnorb-5x46789x9x18x6x2x96x96-training")
    te = part("smallnorb-5x01235x9x18x6x2x96x96-testing")
    column, div = (2, 2) if task == "smallnorb_azimuth" else (1, 1)  # azimuth 0,2,..,34 → 0..17

    def items(p):
        return [Item(int(p["info"][i, column] // div), array=p["dat"][i, 0]) for i in range(len(p["info"]))]

    val, test = _carve(items(te), (0.5, 0.5), _rng("smallnorb"))
    return Portions(items(tr), val, test, "smallNORB: train = official training set; val/test = the two halves "
                    "of a seeded permutation of the official test set (task_adaptation: its first/second half in "
                    "TFDS order); left camera image.")


def convert_clevr(source: Path, task: str) -> Portions:
    root = find(source, "clevr/CLEVR_v1.0", "CLEVR_v1.0", what="CLEVR v1.0")
    thresholds = np.array([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])

    def label(scene):
        objs = scene["objects"]
        if task == "clevr_count":
            return len(objs) - 3
        dist = min(o["pixel_coords"][2] for o in objs)
        return int(np.max(np.nonzero(thresholds - dist < 0)[0]))

    def items(split):
        scenes = json.loads((root / "scenes" / f"CLEVR_{split}_scenes.json").read_text())["scenes"]
        return [Item(label(s), file=root / "images" / split / s["image_filename"]) for s in scenes]

    train, val = _carve(items("train"), (0.9, 0.1), _rng("clevr"))
    return Portions(train, val, items("val"), "CLEVR: train/val = 90/10 of the official train split; test = the "
                    "official validation split (15000), as task_adaptation.", [str(root)])


VTAB_CONVERTERS: dict[str, Callable[[Path, str], Portions]] = {
    "cifar100": convert_cifar100, "caltech101": convert_caltech101, "dtd": convert_dtd,
    "oxford_flowers102": convert_oxford_flowers102, "oxford_iiit_pet": convert_oxford_iiit_pet,
    "svhn": convert_svhn, "sun397": convert_sun397, "patch_camelyon": convert_patch_camelyon,
    "eurosat": convert_eurosat, "resisc45": convert_resisc45, "clevr_count": convert_clevr,
    "clevr_distance": convert_clevr, "dsprites_location": convert_dsprites,
    "dsprites_orientation": convert_dsprites, "smallnorb_azimuth": convert_smallnorb,
    "smallnorb_elevation": convert_smallnorb,
}


# ---------------------------------------------------------------------------------------------
# FGVC: JSON splits from the official annotations
# ---------------------------------------------------------------------------------------------


def _symlink_dir(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() and dst.resolve() == src.resolve():
            return
        raise DataError(f"{dst} exists already; remove it or choose another --data-root")
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        dst.symlink_to(src.resolve(), target_is_directory=True)
    except OSError:
        shutil.copytree(src, dst)


def _train_val(entries: dict[str, int], task: str) -> tuple[dict, dict]:
    keys = sorted(entries)
    train, val = _carve(keys, (0.9, 0.1), _rng(task))
    return {k: entries[k] for k in sorted(train)}, {k: entries[k] for k in sorted(val)}


def _cub_like(source: Path, folder: str) -> tuple[Path, dict, dict]:
    d = find(source, folder, "images.txt", what=folder)
    d = d.parent if d.name == "images.txt" else d
    images = dict(line.split(maxsplit=1) for line in (d / "images.txt").read_text().splitlines() if line.strip())
    labels = dict(line.split() for line in (d / "image_class_labels.txt").read_text().splitlines() if line.strip())
    is_train = dict(line.split() for line in (d / "train_test_split.txt").read_text().splitlines() if line.strip())
    train = {images[i].strip(): int(labels[i]) for i in images if is_train[i] == "1"}
    test = {images[i].strip(): int(labels[i]) for i in images if is_train[i] == "0"}
    return d, train, test


def convert_fgvc(task: Task, source: Path, data_root: Path, log=print) -> Path:
    out = task.directory(data_root)
    out.mkdir(parents=True, exist_ok=True)
    name = task.name
    note = "test = the official test set; train/val = a seeded 90/10 split of the official train set"
    if name in ("cub200", "nabirds"):
        d, train_all, test = _cub_like(source, "CUB_200_2011" if name == "cub200" else "nabirds")
        train, val = _train_val(train_all, name)
        links = {"images": d / "images"}
    elif name == "oxford_flowers":
        d = find(source, "flowers-102", "flowers102", what="Flowers102")
        labels = _loadmat(d / "imagelabels.mat")["labels"].ravel().astype(int)
        setid = _loadmat(d / "setid.mat")
        train, val, test = ({f"jpg/image_{i:05d}.jpg": int(labels[i - 1]) for i in setid[k].ravel()}
                            for k in ("trnid", "valid", "tstid"))
        links = {"jpg": d / "jpg"}
        note = "the official train/val/test split (setid.mat); class ids 1..102 as in imagelabels.mat"
    elif name == "stanford_dogs":
        d = find(source, "Images", "stanford_dogs/Images", what="Stanford Dogs").parent

        def read(kind):
            m = _loadmat(find(d, f"{kind}_list.mat", f"lists/{kind}_list.mat", what="Stanford Dogs lists"))
            files = [str(x[0][0]) for x in m["file_list"]]
            return {f: int(y) for f, y in zip(files, m["labels"].ravel())}

        train, val = _train_val(read("train"), name)
        test = read("test")
        links = {"Images": d / "Images"}
    elif name == "stanford_cars":
        d = find(source, "stanford_cars", "devkit", what="Stanford Cars")
        d = d.parent if d.name == "devkit" else d

        def read(annos, folder):
            m = _loadmat(annos)["annotations"][0]
            return {f"{folder}/{str(a['fname'][0])}": int(a["class"][0][0]) for a in m}

        train, val = _train_val(read(d / "devkit" / "cars_train_annos.mat", "cars_train"), name)
        test = read(find(d, "cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat",
                         what="Stanford Cars test labels"), "cars_test")
        links = {"cars_train": d / "cars_train", "cars_test": d / "cars_test"}
    else:
        raise DataError(f"no FGVC converter for {name!r}")
    for sub, src in links.items():
        _symlink_dir(src, (out / task.image_root / sub) if task.image_root and sub != task.image_root
                     else out / sub)
    for split, mapping in (("train", train), ("val", val), ("test", test)):
        (out / f"{split}.json").write_text(json.dumps(mapping, indent=0, ensure_ascii=False), encoding="utf-8")
    (out / MANIFEST).write_text(json.dumps({
        "prepared_by": "peftbench data prepare (fgvc)", "source": str(source), "identical_to_release": False,
        "split_sizes": {"train": len(train), "val": len(val), "test": len(test)},
        "note": "not VPT's released JSON splits: " + note,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    log(f"{name}: wrote {out} (train {len(train)}, val {len(val)}, test {len(test)})")
    return out


FGVC_CONVERTERS = {"cub200", "nabirds", "oxford_flowers", "stanford_dogs", "stanford_cars"}


def _converted(label: str, source: Path, fn, *args, **kw):
    """A converter's result; a source file that is missing or malformed becomes a DataError naming it."""
    try:
        return fn(*args, **kw)
    except DataError:
        raise
    except (OSError, KeyError, ValueError, IndexError, TypeError) as exc:
        raise DataError(f"{label}: cannot convert the source under {source}: {type(exc).__name__}: {exc}") from None


def prepare(suite: str, tasks: list[str] | None, source: Path, data_root: Path, log=print) -> list[tuple[Task, Path]]:
    """Convert every requested task that has a converter (all whose source is found when ``tasks`` is
    None); a requested task without a converter or without its source raises with instructions."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"--source {source} does not exist")
    names = [get_task(t).name for t in tasks] if tasks else None
    out = []
    if suite == "vtab":
        for name in names or list(VTAB_CONVERTERS):
            task = get_task(name)
            if task.suite != "vtab":
                raise DataError(f"task {name!r} is not a VTAB task")
            if name not in VTAB_CONVERTERS:
                raise DataError(f"{name}: no TF-free converter; it needs {VTAB_SOURCES[name]}")
            try:
                portions = _converted(name, source, VTAB_CONVERTERS[name], source, name)
            except DataError as exc:
                if names is not None:
                    raise
                log(f"{name}: skipped ({exc})")  # all tasks: skip those whose source is absent
                continue
            out.append((task, write_noah(task, Path(data_root), portions, source=source,
                                         converter=VTAB_CONVERTERS[name].__name__, log=log)))
        return out
    if suite == "fgvc":
        for name in names or sorted(FGVC_CONVERTERS):
            task = get_task(name)
            if task.suite != "fgvc":
                raise DataError(f"task {name!r} is not an FGVC task")
            try:
                out.append((task, _converted(name, source, convert_fgvc, task, source, Path(data_root), log=log)))
            except DataError as exc:
                if names is not None:
                    raise
                log(f"{name}: skipped ({exc})")
        return out
    raise DataError(f"prepare: unknown suite {suite!r} (vtab | fgvc)")
