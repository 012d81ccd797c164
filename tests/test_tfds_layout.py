"""VTAB-1k read from TFDS's prepared TFRecord files (peftbench.data.layouts.tfds), without TensorFlow.

The reader is checked against independent implementations: the TFRecord framing against TensorBoard's record
writer, the Example decoding against protobuf's own parser (the message built from example.proto's definition),
the slices against google-research/task_adaptation's split arithmetic over TFDS's published split sizes, the label
rules against their task_adaptation formulas, and the tf-bilinear resize against TensorFlow's ResizeBilinear kernel
formula written out directly.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from fixtures_data import write_tfds
from PIL import Image

from peftbench.data import tfrecord
from peftbench.data.layouts import Member, locate
from peftbench.data.layouts import tfds as tl
from peftbench.errors import DataError
from peftbench.tasks import get_suite, get_task


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# the record format against independent implementations
# ---------------------------------------------------------------------------------------------


def test_framing_equals_tensorboards_record_writer(tmp_path):
    rw = pytest.importorskip("tensorboard.summary.writer.record_writer")
    data = [b"", b"a", b"hello world" * 100, bytes(range(256))]
    with open(tmp_path / "tb.tfrecord", "wb") as fh:
        w = rw.RecordWriter(fh)
        for d in data:
            w.write(d)
        w.flush()
    tfrecord.write_records(tmp_path / "ours.tfrecord", data)
    assert (tmp_path / "tb.tfrecord").read_bytes() == (tmp_path / "ours.tfrecord").read_bytes()
    with open(tmp_path / "tb.tfrecord", "rb") as fh:
        assert [r.data for r in tfrecord.scan(fh, "tb")] == data


def test_a_corrupt_record_names_the_file_and_the_record(tmp_path):
    f = tmp_path / "x.tfrecord"
    tfrecord.write_records(f, [b"first", b"second", b"third"])
    raw = bytearray(f.read_bytes())
    raw[12 + 5 + 4 + 12 + 2] ^= 1  # a byte of the second record's data
    f.write_bytes(bytes(raw))
    with open(f, "rb") as fh, pytest.raises(tfrecord.RecordError, match=r"x.tfrecord: record 1 at byte 21: the data"):
        list(tfrecord.scan(fh, str(f)))
    f.write_bytes(bytes(raw[:-3]))  # truncated in the last record
    with pytest.raises(tfrecord.RecordError, match="truncated"):
        tfrecord.count_records(f)


def _example_class():
    """tf.train.Example built by protobuf from example.proto / feature.proto's definitions."""
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="peftbench_test_example.proto", package="tfx", syntax="proto3")

    def msg(name, *fields, nested=()):
        m = fd.message_type.add(name=name)
        for fname, num, typ, label, tname, packed in fields:
            f = m.field.add(name=fname, number=num, type=typ, label=label)
            if tname:
                f.type_name = tname
            if packed:
                f.options.packed = True
        for n in nested:
            m.nested_type.add().CopyFrom(n)
        return m

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    msg("BytesList", ("value", 1, F.TYPE_BYTES, rep, None, False))
    msg("FloatList", ("value", 1, F.TYPE_FLOAT, rep, None, True))
    msg("Int64List", ("value", 1, F.TYPE_INT64, rep, None, True))
    feat = msg("Feature", ("bytes_list", 1, F.TYPE_MESSAGE, opt, ".tfx.BytesList", False),
               ("float_list", 2, F.TYPE_MESSAGE, opt, ".tfx.FloatList", False),
               ("int64_list", 3, F.TYPE_MESSAGE, opt, ".tfx.Int64List", False))
    feat.oneof_decl.add(name="kind")
    for f in feat.field:
        f.oneof_index = 0
    entry = descriptor_pb2.DescriptorProto(name="FeatureEntry")
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt, type_name=".tfx.Feature")
    entry.options.map_entry = True
    msg("Features", ("feature", 1, F.TYPE_MESSAGE, rep, ".tfx.Features.FeatureEntry", False), nested=(entry,))
    msg("Example", ("features", 1, F.TYPE_MESSAGE, opt, ".tfx.Features", False))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tfx.Example"))


def test_example_decoding_equals_protobufs_own():
    Example = _example_class()
    ex = Example()
    ex.features.feature["image"].bytes_list.value.append(b"\x89PNG-bytes")
    ex.features.feature["label"].int64_list.value.append(41)
    ex.features.feature["neg"].int64_list.value.extend([-3, 2**40])
    ex.features.feature["objects/pixel_coords"].float_list.value.extend([1.5, -2.25, 9.75, 0.0, 3.0, 8.25])
    ex.features.feature["empty"].bytes_list.SetInParent()
    buf = ex.SerializeToString()
    got = tfrecord.parse_example(buf)
    (s, e), = got["image"].spans
    assert buf[s:e] == b"\x89PNG-bytes"
    assert got["label"].values.tolist() == [41] and got["neg"].values.tolist() == [-3, 2**40]
    assert got["objects/pixel_coords"].values.tolist() == [1.5, -2.25, 9.75, 0.0, 3.0, 8.25]
    assert got["empty"].kind == "bytes" and got["empty"].spans == []
    # and ours, read by protobuf
    mine = tfrecord.encode_example({"image": b"abc", "label": 7, "xy": [0.5, 2.0], "neg": [-1]})
    back = Example.FromString(mine)
    assert back.features.feature["image"].bytes_list.value == [b"abc"]
    assert list(back.features.feature["label"].int64_list.value) == [7]
    assert list(back.features.feature["xy"].float_list.value) == [0.5, 2.0]
    assert list(back.features.feature["neg"].int64_list.value) == [-1]


# ---------------------------------------------------------------------------------------------
# the VTAB sources: slices and labels as task_adaptation computes them
# ---------------------------------------------------------------------------------------------

# the TFDS split sizes of the builder versions task_adaptation / VPT pin (the TFDS catalog pages of each dataset;
# eurosat/rgb, resisc45, dsprites and smallnorb as prepared)
TFDS_SIZES = {
    "cifar100": {"train": 50000, "test": 10000},
    "caltech101": {"train": 3060, "test": 6084},
    "dtd": {"train": 1880, "validation": 1880, "test": 1880},
    "oxford_flowers102": {"train": 1020, "validation": 1020, "test": 6149},
    "oxford_iiit_pet": {"train": 3680, "test": 3669},
    "svhn_cropped": {"train": 73257, "test": 26032, "extra": 531131},
    "sun397/tfds": {"train": 76128, "validation": 10875, "test": 21750},
    "patch_camelyon": {"train": 262144, "validation": 32768, "test": 32768},
    "eurosat/rgb": {"train": 27000},
    "resisc45": {"train": 31500},
    "diabetic_retinopathy_detection/btgraham-300": {"train": 35126, "validation": 10906, "test": 42670},
    "clevr": {"train": 70000, "validation": 15000, "test": 15000},
    "dmlab": {"train": 65550, "validation": 22628, "test": 22735},
    "kitti": {"train": 6347, "validation": 423, "test": 711},
    "dsprites": {"train": 737280},
    "smallnorb": {"train": 24300, "test": 24300},
}


def _task_adaptation_val_start(builder: str, n: dict) -> tuple[str, int]:
    """Where val200 starts, as task_adaptation@d7630d3's data classes compute it (written out independently)."""
    carve = {"cifar100": 90, "caltech101": 90, "oxford_iiit_pet": 80, "svhn_cropped": 90, "clevr": 90,
             "eurosat/rgb": 60, "resisc45": 60, "dsprites": 80}
    if builder in carve:
        return "train", carve[builder] * n["train"] // 100
    if builder == "smallnorb":
        return "test", 0
    return "validation", 0


def test_every_vtab_task_has_a_tfds_source_that_slices_as_task_adaptation():
    tasks = [get_task(n) for n in get_suite("vtab").tasks]
    assert tl.check_sources(tasks) == []
    for t in tasks:
        src = t.sources["tfds"]
        sizes = TFDS_SIZES[src["builder"]]
        parts = {s: tl.slices(src["splits"][s], sizes) for s in ("train800", "val200", "train800val200", "test")}
        assert parts["train800"] == [("train", 0, 800)], t.name
        split, start = _task_adaptation_val_start(src["builder"], sizes)
        assert parts["val200"] == [(split, start, start + 200)], t.name
        assert parts["train800val200"] == parts["train800"] + parts["val200"], t.name
        n_test = sum(b - a for _, a, b in parts["test"])
        assert n_test == t.split_sizes["test"], (t.name, n_test)  # the sizes of task_adaptation's tests
        for s, ps in parts.items():
            assert sum(b - a for _, a, b in ps) == t.split_sizes[s], (t.name, s)


def _feats(**kw) -> dict:
    return tfrecord.parse_example(tfrecord.encode_example(kw))


def test_label_rules_equal_task_adaptations_formulas():
    # dsprites.py: floordiv(float32(x), num_original / 16)
    for v in range(32):
        assert tl.label_rule("floordiv:label_x_position:2")(_feats(label_x_position=v)) == math.floor(v / 2.0)
    got = [tl.label_rule("floordiv:label_orientation:2.5")(_feats(label_orientation=v)) for v in range(40)]
    assert got == [math.floor(v / 2.5) for v in range(40)] and set(got) == set(range(16))
    # clevr.py: number of objects - 3; closest: min pixel_coords z binned by [0, 8, 8.5, 9, 9.5, 10, 100]
    assert tl.label_rule("clevr-count")(_feats(**{"objects/size": [0, 1, 1, 0, 1]})) == 2
    thr = [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0]
    for zs in ([12.0, 8.7, 9.9], [7.5], [10.2, 11.0], [9.0, 9.2]):
        coords = [c for z in zs for c in (10.0, 20.0, z)]
        want = max(i for i, t in enumerate(thr) if t - min(zs) < 0)
        assert tl.label_rule("clevr-closest-distance")(_feats(**{"objects/pixel_coords": coords})) == want
    # kitti.py: vehicles (type < 3: Car, Van, Truck), their location z with 1000 appended, min, binned by
    # [-100, 8, 20, 999]
    kthr = [-100.0, 8.0, 20.0, 999.0]
    for types, zs in (([0, 3, 2], [25.0, 3.0, 14.0]), ([3, 5], [2.0, 4.0]), ([1], [5.0]), ([2, 0], [40.0, 30.5])):
        loc = [c for z in zs for c in (1.0, 1.5, z)]
        dist = min([z for ty, z in zip(types, zs) if ty < 3] + [1000.0])
        want = max(i for i, t in enumerate(kthr) if t - dist < 0)
        f = _feats(**{"objects/type": types, "objects/location": loc})
        assert tl.label_rule("kitti-closest-vehicle-distance")(f) == want
    assert tl.label_rule("feature:label_azimuth")(_feats(label_azimuth=17)) == 17
    with pytest.raises(DataError, match="unknown TFDS label rule 'clever-count'"):
        tl.label_rule("clever-count")


# ---------------------------------------------------------------------------------------------
# a prepared TFDS folder, read end to end
# ---------------------------------------------------------------------------------------------

COLOURS = [(i * 25, 255 - i * 20, (i * 70) % 256) for i in range(10)]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """CIFAR-100 as TFDS prepares it (sizes of cifar100:3.0.2): record i of a split has label i % 100 and a
    uniform 8x8 image of colour COLOURS[i % 10] (the train split in 3 shards)."""
    root = tmp_path_factory.mktemp("tfds")
    pngs = [_png(np.full((8, 8, 3), c, dtype=np.uint8)) for c in COLOURS]
    cache = {}

    def rec(split, i):
        key = (i % 100, i % 10, split == "test")
        if key not in cache:
            cache[key] = tfrecord.encode_example({"image": pngs[i % 10], "label": i % 100, "id": b"x"})
        return cache[key]

    write_tfds(root, "cifar100", "3.0.2", {"train": [20000, 20000, 10000], "test": [10000]}, rec)
    (root / "cifar100" / "3.0.1").mkdir()  # an older, unprepared version: not picked
    return root


def test_the_tfds_form_is_found_and_sliced_as_task_adaptation(cifar_root, monkeypatch):
    from peftbench.data.splits import read_split

    monkeypatch.setenv("PEFTBENCH_CACHE", "off")
    task = get_task("cifar100")
    layout, d = locate(task, cifar_root)
    assert layout.name == "tfds" and d == cifar_root / "cifar100" / "3.0.2"
    val = read_split(task, cifar_root, "val200")
    assert list(val.labels) == [i % 100 for i in range(45000, 45200)]  # train[45000:45200]: in the third shard
    tv = read_split(task, cifar_root, "train800val200")
    assert list(tv.labels) == [i % 100 for i in range(800)] + [i % 100 for i in range(45000, 45200)]
    assert all(isinstance(p, Member) for p in tv.paths)
    assert str(tv.paths[0]).startswith(str(d / "cifar100-train.tfrecord-00000-of-00003@"))
    from peftbench.data.images import decode

    px = decode(val.paths[7], 4)
    assert px.shape == (4, 4, 3) and tuple(px[0, 0]) == COLOURS[45007 % 10]


def test_verify_and_fingerprint_on_the_tfds_form(cifar_root, monkeypatch, tmp_path):
    from peftbench.data.splits import fingerprint
    from peftbench.data.verify import verify_task

    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))
    task = get_task("cifar100")
    rep = verify_task(task, cifar_root, progress=False)
    assert rep.ok, rep.defects
    assert rep.splits["test"]["entries"] == 10000 and rep.splits["test"]["classes"] == 100
    assert rep.fingerprint == fingerprint(task, cifar_root)
    again = verify_task(task, cifar_root, progress=False)
    assert again.from_stamp  # unchanged shards: only stat'ed


def test_noah_files_win_when_both_forms_are_there(cifar_root, tmp_path):
    task = get_task("cifar100")
    (tmp_path / "vtab-1k" / "cifar").mkdir(parents=True)
    (tmp_path / "cifar100").symlink_to(cifar_root / "cifar100")
    assert locate(task, tmp_path)[0].name == "noah"
    assert locate(task, tmp_path / "nowhere")[0].name == "noah"  # neither: the main form, whose error says how


def test_a_broken_tfds_folder_is_one_clear_error(tmp_path):
    from peftbench.data.splits import read_split

    task = get_task("dtd")
    d = write_tfds(tmp_path, "dtd", "3.0.1", {"train": [900], "validation": [300], "test": [50, 50]},
                   lambda s, i: tfrecord.encode_example({"image": b"not an image", "label": i % 47}))
    (d / "dtd-test.tfrecord-00001-of-00002").unlink()
    with pytest.raises(DataError, match=r"split 'test' has 2 shards but 1 files \(missing shard 00001\)"):
        read_split(task, tmp_path, "test")
    with pytest.raises(DataError, match=r"dtd-validation.tfrecord-00000-of-00001: record 0 .*"):
        # an Example without the label the rule needs
        d2 = write_tfds(tmp_path / "b", "dtd", "3.0.1", {"train": [800], "validation": [200], "test": [1]},
                        lambda s, i: tfrecord.encode_example({"image": b"x", "lbl": 1}))
        read_split(task, tmp_path / "b", "val200")
    assert d2.is_dir()


def test_dsprites_masks_are_scaled_and_grey_images_tiled(tmp_path):
    f = tmp_path / "m.tfrecord"
    mask = (np.arange(64).reshape(8, 8) % 3 == 0).astype(np.uint8)  # TFDS stores 0/1
    data = _png(mask)
    tfrecord.write_records(f, [data])
    from peftbench.data.images import decode

    got = decode(Member(f, 12, len(data), scale=255), 8)
    assert got.shape == (8, 8, 3) and (got == (mask * 255)[:, :, None]).all()
    grey = decode(Member(f, 12, len(data)), 8)  # smallNORB-like: one channel repeated
    assert (grey == mask[:, :, None]).all()


# ---------------------------------------------------------------------------------------------
# tf.image.resize
# ---------------------------------------------------------------------------------------------


def _tf_resize_bilinear(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """TensorFlow's ResizeBilinear with half_pixel_centers=True (tensorflow/core/kernels/image/
    resize_bilinear_op.cc compute_interpolation_weights + compute_lerp), written out in float64."""
    ih, iw, _ = img.shape

    def weights(out_size, in_size):
        scale = in_size / out_size
        out = []
        for i in range(out_size):
            x = (i + 0.5) * scale - 0.5
            lo = max(math.floor(x), 0)
            hi = min(math.ceil(x), in_size - 1)
            out.append((lo, hi, x - math.floor(x)))
        return out

    ys, xs = weights(oh, ih), weights(ow, iw)
    res = np.zeros((oh, ow, img.shape[2]))
    im = img.astype(np.float64)
    for y, (y0, y1, ly) in enumerate(ys):
        for x, (x0, x1, lx) in enumerate(xs):
            top = im[y0, x0] + (im[y0, x1] - im[y0, x0]) * lx
            bottom = im[y1, x0] + (im[y1, x1] - im[y1, x0]) * lx
            res[y, x] = top + (bottom - top) * ly
    return res


@pytest.mark.parametrize("shape,out", [((5, 7), (16, 12)), ((23, 31), (8, 8)), ((6, 6), (6, 9))])
def test_tf_bilinear_equals_tensorflows_kernel(shape, out):
    from peftbench.data.images import tf_bilinear, tf_resize

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    want = _tf_resize_bilinear(img, *out)
    assert np.abs(tf_resize(img, *out) - want).max() < 1e-9
    got = tf_bilinear(img, *out)
    assert np.abs(got.astype(np.float64) - want).max() <= 0.5 + 1e-9  # rounded to uint8 for the cache


def test_a_run_on_tfds_records_its_pipeline(cifar_root, tmp_path, monkeypatch):
    """One linear-probe run on the TFDS form: the record names the tfds files and the tf-bilinear resize."""
    from helpers import tiny_backbone_2x32

    from peftbench.cli import main

    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    code = main(["run", "--methods", "linear", "--suite", "vtab", "--tasks", "cifar100", "--data-root",
                 str(cifar_root), "--runs-dir", str(runs), "--backbone", tiny_backbone_2x32(), "--protocol", "fixed",
                 "--seeds", "1", "--epochs", "1", "--batch-size", "250", "--quiet"])
    assert code == 0
    recs = [json.loads(p.read_text()) for p in runs.rglob("*.json") if p.parent.name == "cifar100"
            and "." not in p.stem]
    assert recs
    dp = recs[0]["data_pipeline"]
    assert dp["layout"] == "tfds" and dp["interpolation"] == "tf-bilinear"
    assert recs[0]["num_eval"] == 10000
