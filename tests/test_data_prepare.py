"""`peftbench data prepare`: the converters, on small fake sources written in the real formats (pickle
batches, .mat, .h5, .npz, the smallNORB binary matrices, CLEVR scene JSON, image folders), the
restricted unpickler, the instructions, and the FGVC JSON writers."""
import json
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from peftbench.cli import main
from peftbench.data import prepare as prep
from peftbench.data.prepare import vtab as prep_vtab
from peftbench.data.splits import read_split
from peftbench.data.verify import MANIFEST, verify_task
from peftbench.errors import DataError
from peftbench.tasks import get_task


@pytest.fixture(autouse=True)
def _small(tmp_path, monkeypatch):
    """VTAB-1k's 800/200 become 6/3 so that the fake sources stay tiny."""
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))
    for name in prep_vtab.VTAB_CONVERTERS:
        t = get_task(name)
        monkeypatch.setitem(t.split_sizes, "train800", 6)
        monkeypatch.setitem(t.split_sizes, "val200", 3)
        monkeypatch.setitem(t.split_sizes, "train800val200", 9)
    monkeypatch.setattr(prep_vtab, "CALTECH_TRAIN_PER_CLASS", 2)


def img(path, label=0, size=(6, 5), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((size[1], size[0], 3), label * 7 % 256, np.uint8)
    im = Image.fromarray(a).convert(mode)
    im.save(path, quality=90) if path.suffix == ".jpg" else im.save(path)
    return path


def convert(name, source, root, complete=True):
    (task, d), = prep.prepare(get_task(name).suite, [name], source, root, log=lambda m: None)
    assert d == task.directory(root)
    m = json.loads((d / MANIFEST).read_text())
    assert m["identical_to_release"] is False and "NOT byte-identical" in m["note"]
    rep = verify_task(task, root, progress=False)
    defects = rep.defects if complete else [x for x in rep.defects if "have no example" not in x]
    assert not defects, defects
    assert any("not the released vtab split" in n for n in rep.notes)
    sizes = {s: len(read_split(task, root, s)) for s in ("train800", "val200", "train800val200", "test")}
    assert sizes["train800"] == 6 and sizes["val200"] == 3 and sizes["train800val200"] == 9
    assert m["split_sizes"] == sizes
    return task, d, sizes


def labels_of(task, root, split):
    return list(read_split(task, root, split).labels)


# ---------------------------------------------------------------------------------------------
# VTAB converters
# ---------------------------------------------------------------------------------------------


def cifar_batch(path, n, seed, py2_names=True):
    rng = np.random.default_rng(seed)
    d = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"fine_labels": [i % 100 for i in range(n)],
         b"coarse_labels": [0] * n, b"filenames": [b"x.png"] * n, b"batch_label": b"training batch"}
    raw = pickle.dumps(d, protocol=2)
    if py2_names:  # the real files were written by Python 2 / old numpy
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return d


def test_cifar100(tmp_path):
    src = tmp_path / "src"
    cifar_batch(src / "cifar-100-python" / "train", 40, 0)
    test = cifar_batch(src / "cifar-100-python" / "test", 100, 1, py2_names=False)
    task, d, sizes = convert("cifar100", src, tmp_path / "data")
    assert sizes["test"] == 100 and labels_of(task, tmp_path / "data", "test") == list(range(100))
    # pixels: CHW rows of the batch → the PNG, losslessly
    png = np.asarray(Image.open(d / "images" / "test" / "000007.png"))
    assert np.array_equal(png, test[b"data"][7].reshape(3, 32, 32).transpose(1, 2, 0))


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))

    f = tmp_path / "cifar-100-python" / "train"
    f.parent.mkdir(parents=True)
    f.write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match=r"refusing to load (posix|os|nt)\.system"):
        prep_vtab.load_pickle(f)


def test_dtd(tmp_path):
    base = tmp_path / "src" / "dtd" / "dtd"
    classes = [f"class{c:02d}" for c in range(47)]
    rows = {"train1": [], "val1": [], "test1": []}
    for c, name in enumerate(classes):
        for split in rows:
            rel = f"{name}/{name}_{split}.jpg"
            img(base / "images" / rel, c)
            rows[split].append(rel)
    for split, r in rows.items():
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{split}.txt").write_text("\n".join(r) + "\n")
    task, d, sizes = convert("dtd", tmp_path / "src", tmp_path / "data")
    assert sizes["test"] == 47 and labels_of(task, tmp_path / "data", "test") == list(range(47))


def flowers_source(root, per_class=(1, 1, 1)):
    import scipy.io

    d = root / "flowers-102"
    labels, setid, k = [], {"trnid": [], "valid": [], "tstid": []}, 0
    for c in range(102):
        for key, n in zip(setid, per_class):
            for _ in range(n):
                k += 1
                img(d / "jpg" / f"image_{k:05d}.jpg", c)
                labels.append(c + 1)
                setid[key].append(k)
    scipy.io.savemat(d / "imagelabels.mat", {"labels": np.array([labels])})
    scipy.io.savemat(d / "setid.mat", {k: np.array([v]) for k, v in setid.items()})
    return d


def test_oxford_flowers102(tmp_path):
    flowers_source(tmp_path / "src")
    task, d, sizes = convert("oxford_flowers102", tmp_path / "src", tmp_path / "data")
    assert sizes["test"] == 102 and labels_of(task, tmp_path / "data", "test") == list(range(102))


def test_oxford_iiit_pet(tmp_path):
    d = tmp_path / "src" / "oxford-iiit-pet"
    lines = {"trainval": [], "test": []}
    for c in range(37):
        for split, n in (("trainval", 1), ("test", 1)):
            name = f"Breed{c}_{split}"
            img(d / "images" / f"{name}.jpg", c, mode="L" if c % 3 == 0 else "RGB")  # Pets has grayscale files
            lines[split].append(f"{name} {c + 1} {1 + c % 2} {c // 2 + 1}")
    (d / "annotations").mkdir(parents=True)
    for split, r in lines.items():
        (d / "annotations" / f"{split}.txt").write_text("\n".join(r) + "\n")
    task, _, sizes = convert("oxford_iiit_pet", tmp_path / "src", tmp_path / "data")
    assert sizes["test"] == 37 and labels_of(task, tmp_path / "data", "test") == list(range(37))


def test_svhn(tmp_path):
    import scipy.io

    (tmp_path / "src").mkdir()
    for name, n in (("train", 40), ("test", 10)):
        x = np.random.default_rng(0).integers(0, 255, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[i % 10 + 1] for i in range(n)])  # 1..10, 10 is the digit 0
        scipy.io.savemat(tmp_path / "src" / f"{name}_32x32.mat", {"X": x, "y": y})
    task, _, sizes = convert("svhn", tmp_path / "src", tmp_path / "data")
    assert sizes["test"] == 10 and labels_of(task, tmp_path / "data", "test") == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]


@pytest.mark.parametrize("name,folder", [("eurosat", "eurosat/2750"), ("resisc45", "NWPU-RESISC45")])
def test_image_folder_carves(tmp_path, name, folder):
    classes = get_task(name).num_classes
    for c in range(classes):
        for i in range(5):
            img(tmp_path / "src" / folder / f"Class{c:02d}" / f"Class{c:02d}_{i}.jpg", c)
    task, _, sizes = convert(name, tmp_path / "src", tmp_path / "data", complete=False)
    assert sizes["test"] == classes * 5 - int(0.6 * classes * 5) - int(0.2 * classes * 5)


def test_caltech101_keeps_background_as_a_class(tmp_path):
    root = tmp_path / "src" / "caltech101" / "101_ObjectCategories"
    names = ["BACKGROUND_Google", "Faces", "Faces_easy"] + [f"cat{c:03d}" for c in range(99)]
    for c, n in enumerate(names):
        for i in range(3):
            img(root / n / f"image_{i:04d}.jpg", c)
    task, _, sizes = convert("caltech101", tmp_path / "src", tmp_path / "data")
    assert sizes["test"] == 102  # 3 per class, 2 to the TFDS-style train pool


def test_sun397(tmp_path):
    root = tmp_path / "src" / "SUN397"
    for c in range(397):
        for i in range(2):
            img(root / "a" / f"class{c:03d}" / f"sun_{i}.jpg", c)
    task, _, sizes = convert("sun397", tmp_path / "src", tmp_path / "data", complete=False)
    assert sizes["test"] == 794 - int(0.7 * 794) - int(0.1 * 794)


def test_patch_camelyon(tmp_path):
    h5py = pytest.importorskip("h5py")
    d = tmp_path / "src" / "pcam"
    d.mkdir(parents=True)
    for name, n in (("train", 12), ("valid", 6), ("test", 4)):
        with h5py.File(d / f"camelyonpatch_level_2_split_{name}_x.h5", "w") as h:
            h["x"] = np.random.default_rng(1).integers(0, 255, (n, 96, 96, 3), dtype=np.uint8)
        with h5py.File(d / f"camelyonpatch_level_2_split_{name}_y.h5", "w") as h:
            h["y"] = np.array([i % 2 for i in range(n)], dtype=np.uint8).reshape(n, 1, 1, 1)
    task, _, sizes = convert("patch_camelyon", tmp_path / "src", tmp_path / "data")
    assert sizes["test"] == 4 and labels_of(task, tmp_path / "data", "test") == [0, 1, 0, 1]


def test_dsprites_both_tasks(tmp_path):
    n = 400
    latents = np.zeros((n, 6), dtype=np.int64)
    latents[:, 3] = np.arange(n) % 40  # orientation
    latents[:, 4] = (np.arange(n) * 7) % 32  # x position
    imgs = np.zeros((n, 64, 64), dtype=np.uint8)
    for i in range(n):  # the index, in binary, in the first row: to check every label below
        imgs[i, 0, :16] = [(i >> b) & 1 for b in range(16)]
    (tmp_path / "src").mkdir()
    np.savez_compressed(tmp_path / "src" / "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz",
                        imgs=imgs, latents_classes=latents)
    for name, col, factor in (("dsprites_location", 4, 2.0), ("dsprites_orientation", 3, 2.5)):
        task, d, sizes = convert(name, tmp_path / "src", tmp_path / "data", complete=False)  # a 10% carve
        assert sizes["test"] == 40
        split = read_split(task, tmp_path / "data", "test")
        for path, y in zip(split.paths, split.labels):
            px = np.asarray(Image.open(path))
            assert set(np.unique(px)) <= {0, 255}
            i = sum(int(px[0, b] > 0) << b for b in range(16))
            assert y == int(latents[i, col] // factor)


def norb_file(path, arr, magic):
    path.parent.mkdir(parents=True, exist_ok=True)
    dims = list(arr.shape) + [1] * max(0, 3 - arr.ndim)
    path.write_bytes(struct.pack("<ii", magic, arr.ndim) + struct.pack(f"<{len(dims)}i", *dims) + arr.tobytes())


def test_smallnorb_binary_format(tmp_path):
    src = tmp_path / "src"
    for prefix, n in (("smallnorb-5x46789x9x18x6x2x96x96-training", 20),
                      ("smallnorb-5x01235x9x18x6x2x96x96-testing", 72)):
        dat = np.random.default_rng(0).integers(0, 255, (n, 2, 96, 96), dtype=np.uint8)
        info = np.zeros((n, 4), dtype=np.int32)
        info[:, 1] = np.arange(n) % 9  # elevation
        info[:, 2] = (np.arange(n) % 18) * 2  # azimuth 0, 2, ..., 34
        norb_file(src / f"{prefix}-dat.mat", dat, 0x1E3D4C55)
        norb_file(src / f"{prefix}-info.mat", info, 0x1E3D4C54)
        norb_file(src / f"{prefix}-cat.mat", np.zeros(n, np.int32), 0x1E3D4C54)
    for name in ("smallnorb_azimuth", "smallnorb_elevation"):
        task, _, sizes = convert(name, src, tmp_path / "data")
        assert sizes["test"] == 36
        assert max(labels_of(task, tmp_path / "data", "test")) == task.num_classes - 1


def test_clevr_count_and_distance_labels(tmp_path):
    root = tmp_path / "src" / "clevr" / "CLEVR_v1.0"
    for split, n in (("train", 30), ("val", 48)):
        scenes = []
        for i in range(n):
            name = f"CLEVR_{split}_{i:06d}.png"
            img(root / "images" / split / name, i)
            k = 3 + i % 8  # 3..10 objects
            depth = [7.0, 8.2, 8.7, 9.2, 9.7, 12.0][i % 6]
            objs = [{"pixel_coords": [10, 10, depth + j]} for j in range(k)]
            scenes.append({"image_filename": name, "objects": objs})
        (root / "scenes").mkdir(parents=True, exist_ok=True)
        (root / "scenes" / f"CLEVR_{split}_scenes.json").write_text(json.dumps({"scenes": scenes}))
    task, _, _ = convert("clevr_count", tmp_path / "src", tmp_path / "data")
    assert labels_of(task, tmp_path / "data", "test")[:9] == [0, 1, 2, 3, 4, 5, 6, 7, 0]
    task, _, _ = convert("clevr_distance", tmp_path / "src", tmp_path / "data")
    assert labels_of(task, tmp_path / "data", "test")[:7] == [0, 1, 2, 3, 4, 5, 0]


def test_tasks_without_converter_and_missing_sources(tmp_path):
    (tmp_path / "src").mkdir()
    for name in ("dmlab", "kitti", "diabetic_retinopathy"):
        with pytest.raises(DataError, match="needs the VTAB-1k archive"):
            prep.prepare("vtab", [name], tmp_path / "src", tmp_path / "data")
    with pytest.raises(DataError, match="cifar-100-python"):
        prep.prepare("vtab", ["cifar"], tmp_path / "src", tmp_path / "data")


def test_instructions_cli(capsys):
    assert main(["data", "prepare", "--suite", "vtab"]) == 0
    out = capsys.readouterr().out
    assert "NOT byte-identical" in out and "[archive only]" in out and "cifar-100-python" in out
    assert main(["data", "prepare", "--suite", "fgvc", "--task", "CUB"]) == 0
    assert "image_class_labels.txt" in capsys.readouterr().out


def test_cli_prepare_converts_and_verifies(tmp_path, capsys):
    flowers_source(tmp_path / "src")
    assert main(["data", "prepare", "--suite", "vtab", "--task", "flowers102", "--source", str(tmp_path / "src"),
                 "--data-root", str(tmp_path / "data")]) == 0
    assert "oxford_flowers102: OK" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# FGVC converters
# ---------------------------------------------------------------------------------------------


def cub_like(d, classes, ids=None, per_class=(3, 1)):
    ids = ids or list(range(1, classes + 1))
    images, labels, split, k = [], [], [], 0
    for c, cid in enumerate(ids):
        for i in range(sum(per_class)):
            k += 1
            rel = f"{cid:04d}.Class {cid}/img_{i}.jpg"
            img(d / "images" / rel, c)
            images.append(f"{k} {rel}")
            labels.append(f"{k} {cid}")
            split.append(f"{k} {1 if i < per_class[0] else 0}")
    (d / "images.txt").write_text("\n".join(images) + "\n")
    (d / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (d / "train_test_split.txt").write_text("\n".join(split) + "\n")


def test_fgvc_cub_and_nabirds_sparse_ids(tmp_path):
    cub_like(tmp_path / "src" / "CUB_200_2011", 200)
    ((task, d),) = prep.prepare("fgvc", ["cub"], tmp_path / "src", tmp_path / "data", log=lambda m: None)
    assert (d / "images").is_symlink()
    rep = verify_task(task, tmp_path / "data", progress=False)
    assert rep.ok, rep.defects
    train = json.loads((d / "train.json").read_text())
    val = json.loads((d / "val.json").read_text())
    assert len(train) + len(val) == 600 and len(json.loads((d / "test.json").read_text())) == 200
    sparse = [3 * i + 100 for i in range(5)]  # NABirds' leaf ids are not contiguous
    cub_like(tmp_path / "src2" / "nabirds", 5, ids=sparse)
    ((task, d),) = prep.prepare("fgvc", ["nabirds"], tmp_path / "src2", tmp_path / "data", log=lambda m: None)
    assert list(read_split(task, tmp_path / "data", "test").labels) == [0, 1, 2, 3, 4]


def test_fgvc_flowers_dogs_cars(tmp_path):
    import scipy.io

    flowers_source(tmp_path / "src", per_class=(1, 1, 1))
    dogs = tmp_path / "src" / "dogs"
    for kind, n in (("train", 3), ("test", 1)):
        files, labels = [], []
        for c in range(120):
            for i in range(n):
                rel = f"n{c:08d}-Breed{c}/n{c:08d}_{kind}{i}.jpg"
                img(dogs / "Images" / rel, c)
                files.append(rel)
                labels.append(c + 1)
        cell = np.empty((len(files), 1), dtype=object)
        for i, f in enumerate(files):
            cell[i, 0] = np.array([f])
        scipy.io.savemat(dogs / f"{kind}_list.mat", {"file_list": cell, "labels": np.array(labels)[:, None]})
    cars = tmp_path / "src" / "stanford_cars"
    for kind, annos in (("train", "devkit/cars_train_annos.mat"), ("test", "cars_test_annos_withlabels.mat")):
        rows = []
        for c in range(196):
            for i in range(3 if kind == "train" else 1):
                fname = f"{c:03d}{i}.jpg"
                img(cars / f"cars_{kind}" / fname, c)
                rows.append((fname, c + 1))
        ann = np.zeros((1, len(rows)), dtype=[("fname", "O"), ("class", "O")])
        for i, (fname, c) in enumerate(rows):
            ann[0, i]["fname"] = np.array([fname])
            ann[0, i]["class"] = np.array([[c]], dtype=np.uint8)
        (cars / annos).parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(cars / annos, {"annotations": ann})
    done = prep.prepare("fgvc", ["oxford_flowers", "stanford_dogs", "stanford_cars"], tmp_path / "src",
                        tmp_path / "data", log=lambda m: None)
    for task, d in done:
        rep = verify_task(task, tmp_path / "data", progress=False)
        assert rep.ok, (task.name, rep.defects)
        m = json.loads((d / MANIFEST).read_text())
        assert m["identical_to_release"] is False
    flowers = get_task("oxford_flowers")
    assert len(read_split(flowers, tmp_path / "data", "val")) == 102  # the official val split


def test_malformed_source_and_all_tasks_mode(tmp_path):
    labels = tmp_path / "bad" / "dtd" / "dtd" / "labels"
    labels.mkdir(parents=True)
    (labels.parent / "images").mkdir()
    with pytest.raises(DataError, match=r"dtd: cannot convert the source under .*train1\.txt"):
        prep.prepare("vtab", ["dtd"], tmp_path / "bad", tmp_path / "data")
    flowers_source(tmp_path / "src")  # all tasks: what is found is converted, the rest is skipped
    skipped = []
    done = prep.prepare("vtab", None, tmp_path / "src", tmp_path / "data", log=skipped.append)
    assert [t.name for t, _ in done] == ["oxford_flowers102"]
    assert any(m.startswith("cifar100: skipped") for m in skipped)
