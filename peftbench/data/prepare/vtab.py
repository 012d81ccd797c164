"""VTAB-1k converters: the NOAH layout with VTAB-1k split sizes, from public sources that need no TensorFlow.

The released VTAB-1k splits (NOAH's exported archive) are what the papers used; get them when you can.
Where a public source already sits on disk in a format that needs no TensorFlow (torchvision's on-disk
layouts, the original archives), a converter writes the NOAH layout with the VTAB-1k split *sizes*:

* train800 / val200 are drawn deterministically (a seeded permutation, seed = crc32 of the task name)
  from the train / val portions that google-research/task_adaptation carves out of the dataset
  (same percentages: e.g. Pets 80/20 of trainval, EuroSAT 60/20/20, dSprites 80/10/10);
* test is the official test portion where task_adaptation uses one (CIFAR-100, DTD, Flowers102,
  Pets, SVHN, Patch Camelyon, CLEVR's validation split), otherwise the same carve-out.

**These splits are NOT byte-identical to the released VTAB-1k splits** (TFDS's example order cannot
be reproduced without TFDS); each converted task says so in ``<task>/peftbench_prepared.json``, which
``peftbench data verify`` reports. Images are hard-linked (or copied) from the source when they
already are image files, and written as PNG (lossless) when the source holds arrays. Tasks without a
converter (DMLab, KITTI, Diabetic Retinopathy) need the released archive: their labels come from
TFDS-specific processing.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import DataError
from ...tasks import Task
from . import Converter, Guide, register_converter, register_guide
from ._common import (
    IMG_EXT,
    NOT_IDENTICAL,
    Item,
    Portions,
    carve,
    class_folders,
    find,
    load_pickle,
    loadmat,
    seeded_rng,
    write_noah,
)

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


def convert_cifar100(source: Path, task: str) -> Portions:
    d = find(source, "cifar-100-python", what="CIFAR-100")
    items = {}
    for part in ("train", "test"):
        b = load_pickle(d / part)
        data = np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = list(b["fine_labels"])
        items[part] = [Item(int(y), array=data[i]) for i, y in enumerate(labels)]
    train, val = carve(items["train"], (0.9, 0.1), seeded_rng(task))
    return Portions(train, val, items["test"], "CIFAR-100: train/val = 90/10 of the official train set; "
                    "test = the official test set (10000).", [str(d)])


# ---------------------------------------------------------------------------------------------
# image-folder datasets
# ---------------------------------------------------------------------------------------------

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


def convert_oxford_flowers102(source: Path, task: str) -> Portions:
    d = find(source, "flowers-102", "flowers102", "jpg", what="Flowers102")
    d = d.parent if d.name == "jpg" else d
    labels = loadmat(d / "imagelabels.mat")["labels"].ravel().astype(int) - 1
    setid = loadmat(d / "setid.mat")

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

    train, val = carve(read("trainval"), (0.8, 0.2), seeded_rng(task))
    return Portions(train, val, read("test"), "Pets: train/val = 80/20 of the official trainval list; "
                    "test = the official test list (3669); label = CLASS-ID - 1.", [str(d)])


def convert_svhn(source: Path, task: str) -> Portions:
    parts = {}
    for name in ("train", "test"):
        m = loadmat(find(source, f"{name}_32x32.mat", f"svhn/{name}_32x32.mat", what="SVHN"))
        x, y = m["X"], m["y"].ravel().astype(int) % 10  # label 10 is the digit 0
        parts[name] = [Item(int(y[i]), array=x[:, :, :, i]) for i in range(len(y))]
    train, val = carve(parts["train"], (0.9, 0.1), seeded_rng(task))
    return Portions(train, val, parts["test"], "SVHN cropped digits: train/val = 90/10 of train_32x32; "
                    "test = test_32x32 (26032); label 10 → 0.")


def _folder_dataset(root: Path, task: str, fractions, note: str) -> Portions:
    items = [Item(i, file=f) for i, (_, files) in enumerate(class_folders(root)) for f in files]
    train, val, test = carve(items, fractions, seeded_rng(task))
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
    rng = seeded_rng(task)
    pool, test = [], []
    for i, (_, files) in enumerate(class_folders(root)):  # 102 classes, lower-case sorted as TFDS
        order = rng.permutation(len(files))
        k = CALTECH_TRAIN_PER_CLASS
        pool += [Item(i, file=files[j]) for j in order[:k]]
        test += [Item(i, file=files[j]) for j in sorted(order[k:])]
    train, val = carve(pool, (0.9, 0.1), rng)
    return Portions(train, val, test, "Caltech-101: 30 images per class (seeded) form TFDS-style train, "
                    "the rest test; train/val = 90/10 of it. TFDS drew other 30s: test differs.", [str(root)])


def convert_sun397(source: Path, task: str) -> Portions:
    root = find(source, "SUN397", what="SUN397")
    classes = []
    for letter in sorted(p for p in root.iterdir() if p.is_dir()):
        for c in sorted(p for p in letter.rglob("*") if p.is_dir()):
            if any(f.suffix.lower() in IMG_EXT for f in c.iterdir()):
                classes.append(c)
    items = [Item(i, file=f) for i, c in enumerate(classes)
             for f in sorted(x for x in c.iterdir() if x.suffix.lower() in IMG_EXT)]
    train, val, test = carve(items, (0.7, 0.1, 0.2), seeded_rng(task))
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
    train, val, test = carve(items, (0.8, 0.1, 0.1), seeded_rng("dsprites"))
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

    val, test = carve(items(te), (0.5, 0.5), seeded_rng("smallnorb"))
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

    train, val = carve(items("train"), (0.9, 0.1), seeded_rng("clevr"))
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


def _noah_writer(fn: Callable[[Path, str], Portions]):
    def convert(task: Task, source: Path, data_root: Path, log=print) -> Path:
        return write_noah(task, data_root, fn(source, task.name), source=source, converter=fn.__name__, log=log)
    return convert


for _name, _text in VTAB_SOURCES.items():
    _fn = VTAB_CONVERTERS.get(_name)
    register_converter(Converter(_name, _text, _noah_writer(_fn) if _fn else None))

register_guide(Guide("vtab", (
    "VTAB-1k (NOAH layout): DATA_ROOT/vtab-1k/<folder>/{train800,val200,train800val200,test}.txt + images/",
    "Best: " + ARCHIVE + ", extracted so that DATA_ROOT/vtab-1k/<folder>/ exists.",
    "Otherwise: download a task's public source (below) and run",
    "  peftbench data prepare --suite vtab --task TASK --source SOURCE_DIR --data-root DATA_ROOT",
    "which writes the NOAH layout with VTAB-1k split sizes; " + NOT_IDENTICAL + ".",
)))
