"""FGVC converters: VPT's JSON layout from each dataset's official annotation files.

test = the official test set, train/val = a deterministic 90/10 split of the official train set (the
VFPT text's description; Oxford Flowers uses its official train/val split). VPT's own JSON files are
not downloadable any more, so these are not VPT's exact train/val splits either. Images are not
copied: the dataset's image folder is symlinked into the task folder.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ...errors import DataError
from ...provenance import now
from ...tasks import Task
from ..verify import MANIFEST
from . import Converter, Guide, register_converter, register_guide
from ._common import carve, find, loadmat, seeded_rng

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
    train, val = carve(keys, (0.9, 0.1), seeded_rng(task))
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
        labels = loadmat(d / "imagelabels.mat")["labels"].ravel().astype(int)
        setid = loadmat(d / "setid.mat")
        train, val, test = ({f"jpg/image_{i:05d}.jpg": int(labels[i - 1]) for i in setid[k].ravel()}
                            for k in ("trnid", "valid", "tstid"))
        links = {"jpg": d / "jpg"}
        note = "the official train/val/test split (setid.mat); class ids 1..102 as in imagelabels.mat"
    elif name == "stanford_dogs":
        d = find(source, "Images", "stanford_dogs/Images", what="Stanford Dogs").parent

        def read(kind):
            m = loadmat(find(d, f"{kind}_list.mat", f"lists/{kind}_list.mat", what="Stanford Dogs lists"))
            files = [str(x[0][0]) for x in m["file_list"]]
            return {f: int(y) for f, y in zip(files, m["labels"].ravel())}

        train, val = _train_val(read("train"), name)
        test = read("test")
        links = {"Images": d / "Images"}
    elif name == "stanford_cars":
        d = find(source, "stanford_cars", "devkit", what="Stanford Cars")
        d = d.parent if d.name == "devkit" else d

        def read(annos, folder):
            m = loadmat(annos)["annotations"][0]
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
        "created": now()}, indent=1))
    log(f"{name}: wrote {out} (train {len(train)}, val {len(val)}, test {len(test)})")
    return out



for _name, _text in FGVC_SOURCES.items():
    register_converter(Converter(_name, _text, convert_fgvc))

register_guide(Guide("fgvc", (
    "FGVC (VPT JSON layout): DATA_ROOT/fgvc/<folder>/{train,val,test}.json + the dataset's images.",
    "Best: VPT's released split JSON files (no longer downloadable from VPT's links) placed next to the",
    "dataset's images. Otherwise run",
    "  peftbench data prepare --suite fgvc --task TASK --source SOURCE_DIR --data-root DATA_ROOT",
    "which writes JSON splits from the official annotations (test = official test; train/val = a",
    "deterministic 90/10 split of the official train set; Flowers: official train/val) and symlinks the images.",
)))
