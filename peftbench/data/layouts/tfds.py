"""The TFDS layout (``tfds``): the TFRecord files ``tensorflow_datasets`` prepares, read without TensorFlow and
sliced into VTAB-1k's splits as google-research/task_adaptation defines them (docs/data.md §TFDS).

    <data-root>/<builder>[/<config>]/<version>/dataset_info.json
    <data-root>/<builder>[/<config>]/<version>/<builder>-<split>.tfrecord-00000-of-00004 ...

``<data-root>`` is TFDS's ``data_dir`` (``~/tensorflow_datasets`` by default): the folder VPT's and E^2VPT's
``DATA.DATAPATH`` point at. Each VTAB task names its source in ``Task.sources["tfds"]`` (tasks/vtab.py), as data:

* ``builder``: TFDS's builder and config (``cifar100``, ``diabetic_retinopathy_detection/btgraham-300``);
* ``version``: the version pattern task_adaptation pins (``3.*.*``): the highest prepared version that matches;
* ``splits``: each of our splits as task_adaptation's slice expression, e.g. CIFAR-100's
  ``val200 = "train[n*90//100:n*90//100+200]"``, where ``n`` is the number of examples of the TFDS split named
  before the bracket (task_adaptation computes ``TRAIN_SPLIT_PERCENT * n // 100`` the same way); parts joined
  by ``+`` are concatenated, in order;
* ``label``: a label rule of :data:`LABEL_RULES` (``label``, ``feature:label_azimuth``,
  ``floordiv:label_x_position:2``, ``clevr-count``, ``clevr-closest-distance``, ``kitti-closest-vehicle-distance``),
  each the function task_adaptation applies;
* ``image``: the image feature (``image``), ``scale``: a factor on the decoded pixels (dSprites: 255).

Records are read in TFDS's order (shard 0 first, records in file order), which is the order of
``tfds.load(split=..., shuffle_files=False)``, the way task_adaptation reads them. Every record's framing checksums
are verified; an image is a :class:`~peftbench.data.layouts.Member` (its file, offset and length), decoded when the
decoded-image cache is built. The entries' names (``<shard>@<offset>+<length>``) enter the task fingerprint.
"""
from __future__ import annotations

import ast
import fnmatch
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import DataError
from ...tasks import Task, task_splits
from ..tfrecord import Feature, Record, RecordError, parse_example, scan
from . import Entry, ImageSource, Layout, Member, register_layout

_SHARD = re.compile(r"^(?P<base>.+)-(?P<split>[^-.]+)\.tfrecord-(?P<i>\d+)-of-(?P<n>\d+)$")


# ---------------------------------------------------------------------------------------------
# label rules: google-research/task_adaptation@d7630d3 task_adaptation/data/<dataset>.py
# ---------------------------------------------------------------------------------------------


def _ints(f: dict[str, Feature], key: str) -> np.ndarray:
    if key not in f or f[key].values is None or f[key].kind not in ("int64", "empty"):
        raise DataError(f"feature {key!r} is missing or not integer")
    return f[key].values  # type: ignore[return-value]


def _floats(f: dict[str, Feature], key: str, width: int) -> np.ndarray:
    if key not in f or f[key].values is None or f[key].kind not in ("float", "empty"):
        raise DataError(f"feature {key!r} is missing or not float")
    v = f[key].values
    if v.size % width:  # type: ignore[union-attr]
        raise DataError(f"feature {key!r} holds {v.size} values, not a multiple of {width}")  # type: ignore[union-attr]
    return v.reshape(-1, width)  # type: ignore[union-attr]


def _one(f: dict[str, Feature], key: str) -> int:
    v = _ints(f, key)
    if v.size != 1:
        raise DataError(f"feature {key!r} holds {v.size} values, expected 1")
    return int(v[0])


def _bin(value: float, thresholds: list[float]) -> int:
    """task_adaptation's ``tf.reduce_max(tf.where((thrs - value) < 0))``: the last threshold below ``value``."""
    t = np.asarray(thresholds, dtype=np.float64) - np.float32(value)
    below = np.nonzero(t < 0)[0]
    if below.size == 0:
        raise DataError(f"value {value} is below every threshold {thresholds}")
    return int(below.max())


def _floordiv(f: dict[str, Feature], key: str, factor: str) -> int:
    # dsprites.py: tf.math.floordiv(tf.cast(x, tf.float32), class_division_factor) with the factor a Python
    # float (num_original_classes / num_classes), computed in float32
    return int(np.floor(np.float32(_one(f, key)) / np.float32(float(factor))))


def _clevr_count(f: dict[str, Feature]) -> int:
    return int(_ints(f, "objects/size").size) - 3  # clevr.py: tf.size(x["objects"]["size"]) - 3


def _clevr_closest(f: dict[str, Feature]) -> int:
    # clevr.py: min over objects of pixel_coords[:, 2], binned by [0, 8, 8.5, 9, 9.5, 10, 100]
    return _bin(float(_floats(f, "objects/pixel_coords", 3)[:, 2].min()), [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])


def _kitti_closest_vehicle(f: dict[str, Feature]) -> int:
    # kitti.py: vehicles = type < 3 (Car, Van, Truck); z = location[:, 2] of those, with 1000 appended; min;
    # binned by [-100, 8, 20, 999]
    types = _ints(f, "objects/type")
    z = _floats(f, "objects/location", 3)[:, 2]
    if z.shape[0] != types.size:
        raise DataError(f"{types.size} object types but {z.shape[0]} locations")
    dist = min([float(v) for v in z[types < 3]] + [1000.0])
    return _bin(dist, [-100.0, 8.0, 20.0, 999.0])


LABEL_RULES: dict[str, Callable[..., int]] = {
    "label": lambda f: _one(f, "label"),
    "feature": _one,  # feature:<name>  (smallnorb.py: tensors[predicted_attribute])
    "floordiv": _floordiv,  # floordiv:<name>:<factor>  (dsprites.py)
    "clevr-count": _clevr_count,
    "clevr-closest-distance": _clevr_closest,
    "kitti-closest-vehicle-distance": _kitti_closest_vehicle,
}


def label_rule(spec: str) -> Callable[[dict[str, Feature]], int]:
    name, *args = spec.split(":")
    if name not in LABEL_RULES:
        raise DataError(f"unknown TFDS label rule {spec!r}: expected one of {', '.join(sorted(LABEL_RULES))}")
    fn = LABEL_RULES[name]
    return lambda f: fn(f, *args)


# ---------------------------------------------------------------------------------------------
# slice expressions: "train[:800]+train[n*90//100:n*90//100+200]"
# ---------------------------------------------------------------------------------------------

_PART = re.compile(r"^\s*(?P<split>[A-Za-z0-9_]+)\s*(?:\[(?P<a>[^:\]]*):(?P<b>[^\]]*)\])?\s*$")
_OPS = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv)


def _bound(expr: str, n: int) -> int | None:
    """An integer slice bound: an expression of ``n`` with + - * // and integers (None: empty)."""
    if not expr.strip():
        return None
    tree = ast.parse(expr.strip(), mode="eval")

    def ev(node) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id == "n":
            return n
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, _OPS):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.FloorDiv):
                if b == 0:
                    raise DataError(f"slice bound {expr!r} divides by zero")
                return a // b
            return {ast.Add: a + b, ast.Sub: a - b}.get(type(node.op), a * b)
        raise DataError(f"slice bound {expr!r}: only integers, n, + - * // are allowed")

    return ev(tree)


def slices(expr: str, sizes: dict[str, int]) -> list[tuple[str, int, int]]:
    """(TFDS split, start, stop) of each part of a slice expression, with Python's slice semantics."""
    out = []
    for part in _split_plus(expr):
        m = _PART.match(part)
        if not m:
            raise DataError(f"slice {part!r} of {expr!r}: expected <split> or <split>[a:b]")
        split = m["split"]
        if split not in sizes:
            raise DataError(f"slice {expr!r} names TFDS split {split!r}, which is not prepared (there are: "
                            f"{', '.join(sorted(sizes)) or 'none'})")
        n = sizes[split]
        a, b = (_bound(m["a"], n), _bound(m["b"], n)) if m["a"] is not None else (None, None)
        start, stop, _ = slice(a, b).indices(n)
        out.append((split, start, max(start, stop)))
    return out


def _split_plus(expr: str) -> list[str]:
    """Split on the + that join parts (not those inside brackets)."""
    parts, depth, cur = [], 0, ""
    for ch in expr:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "+" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


# ---------------------------------------------------------------------------------------------
# the prepared dataset folder
# ---------------------------------------------------------------------------------------------


def _version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else -1 for x in v.split("."))


def builder_dir(data_root: Path, builder: str, version: str) -> Path | None:
    """``<data_root>/<builder>/<highest version matching the pattern>`` (None when none is prepared)."""
    base = Path(data_root) / builder
    if not base.is_dir():
        return None
    found = [d for d in base.iterdir() if d.is_dir() and fnmatch.fnmatch(d.name, version)
             and (d / "dataset_info.json").is_file()]
    return max(found, key=lambda d: _version_key(d.name)) if found else None


@lru_cache(maxsize=64)
def _shards(folder: str, stamp: tuple) -> dict[str, list[tuple[Path, int]]]:
    """TFDS split → its shard files in order, each with its number of records (dataset_info.json's shardLengths
    where it has them, else counted)."""
    from ..tfrecord import count_records

    d = Path(folder)
    info_file = d / "dataset_info.json"
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{info_file}: cannot be read as JSON ({exc})") from None
    lengths = {s.get("name"): [int(x) for x in s.get("shardLengths") or []]
               for s in info.get("splits") or [] if isinstance(s, dict)}
    files: dict[str, list[tuple[int, int, Path]]] = {}
    for f in d.iterdir():
        m = _SHARD.match(f.name)
        if m:
            files.setdefault(m["split"], []).append((int(m["i"]), int(m["n"]), f))
    out: dict[str, list[tuple[Path, int]]] = {}
    for split, fs in files.items():
        fs.sort()
        total = fs[0][1]
        have = [i for i, _, _ in fs]
        if have != list(range(total)) or any(n != total for _, n, _ in fs):
            missing = sorted(set(range(total)) - set(have))
            raise DataError(f"{d}: split {split!r} has {total} shards but {len(fs)} files"
                            + (f" (missing shard {missing[0]:05d})" if missing else ""))
        known = lengths.get(split) or []
        if len(known) == total:
            out[split] = [(f, n) for (_, _, f), n in zip(fs, known)]
        else:
            try:
                out[split] = [(f, count_records(f)) for _, _, f in fs]
            except RecordError as exc:
                raise DataError(str(exc)) from None
    return out


def _stamp(folder: Path) -> tuple:
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(folder).iterdir()))


# the entries of a split, parsed once per process while the folder is unchanged (a fingerprint, the data check and
# the cache each read every split; dSprites' test split is 73,728 Examples)
_ENTRIES: dict[tuple, tuple[list, list]] = {}


def read_records(table: dict[str, list[tuple[Path, int]]],
                 parts: list[tuple[str, int, int]]) -> list[tuple[Path, Record, int]]:
    """(shard file, record, index in its TFDS split) of every record the slice parts select, in order (``table``:
    the folder's :func:`_shards`)."""
    out: list[tuple[Path, Record, int]] = []
    for split, start, stop in parts:
        base = 0
        for f, n in table[split]:
            lo, hi = max(start, base), min(stop, base + n)
            if lo < hi:
                try:
                    with open(f, "rb") as fh:
                        got = [r for r in scan(fh, str(f), want=lambda i, lo=lo - base, hi=hi - base: lo <= i < hi)
                               if isinstance(r, Record)]
                except RecordError as exc:
                    raise DataError(str(exc)) from None
                if len(got) != hi - lo:
                    raise DataError(f"{f}: holds fewer records than dataset_info.json's shardLengths say ({n})")
                out += [(f, r, base + r.index) for r in got]
            base += n
            if base >= stop:
                break
    return out


@register_layout
class TfdsLayout(Layout):
    name = "tfds"
    aliases = ("tensorflow-datasets", "tfrecord")
    description = ("the TFRecord files tensorflow_datasets prepares (VPT's and E^2VPT's data), sliced as "
                   "task_adaptation does")
    # VPT's preprocess_fn (src/data/datasets/tf_dataset.py): tf.image.resize(image, [224, 224]), bilinear,
    # no antialiasing, half-pixel centres
    interpolation = "tf-bilinear"

    @staticmethod
    def source(task: Task) -> dict:
        src = task.sources.get("tfds")
        if not isinstance(src, dict) or not {"builder", "version", "splits"} <= set(src):
            raise DataError(f"task {task.name!r} has no TFDS source (Task.sources['tfds'] with builder, version, "
                            "splits)")
        return src

    def task_dir(self, task: Task, data_root: Path) -> Path | None:
        src = self.source(task)
        return builder_dir(Path(data_root), src["builder"], src["version"])

    def split_file(self, task: Task, task_dir: Path, split: str) -> Path:
        return Path(task_dir) / "dataset_info.json"

    def image(self, task: Task, task_dir: Path, rel: str) -> ImageSource:
        m = re.match(r"^(?P<f>.+)@(?P<o>\d+)\+(?P<n>\d+)$", rel)
        if not m:
            raise DataError(f"task {task.name!r}: {rel!r} is not a TFRecord member (<shard>@<offset>+<length>)")
        return Member(Path(task_dir) / m["f"], int(m["o"]), int(m["n"]), int(self.source(task).get("scale", 1)))

    def entries(self, task: Task, task_dir: Path, split: str) -> tuple[list[Entry], list[str]]:
        stamp = _stamp(Path(task_dir))
        key = (task.name, repr(sorted(self.source(task).items())), str(task_dir), split, stamp)
        if key not in _ENTRIES:
            while len(_ENTRIES) >= 32:
                _ENTRIES.pop(next(iter(_ENTRIES)))
            _ENTRIES[key] = self._entries(task, task_dir, split, _shards(str(task_dir), stamp))
        out, defects = _ENTRIES[key]
        return list(out), list(defects)

    def _entries(self, task: Task, task_dir: Path, split: str,
                 table: dict[str, list[tuple[Path, int]]]) -> tuple[list[Entry], list[str]]:
        src = self.source(task)
        if split not in src["splits"]:
            raise DataError(f"task {task.name!r}: its TFDS source defines no split {split!r} "
                            f"(it defines {', '.join(sorted(src['splits']))})")
        sizes = {s: sum(n for _, n in fs) for s, fs in table.items()}
        expr = src["splits"][split]
        rule = label_rule(src.get("label", "label"))
        key = src.get("image", "image")
        out: list[Entry] = []
        defects: list[str] = []
        for f, rec, i in read_records(table, slices(expr, sizes)):
            where = f"{f}: record {rec.index} ({split} = {expr}; TFDS index {i})"
            try:
                feats = parse_example(rec.data)
                y = rule(feats)
                img = feats.get(key)
                if img is None or img.kind != "bytes" or len(img.spans) != 1:
                    raise DataError(f"feature {key!r} is missing or not one encoded image")
            except (DataError, RecordError) as exc:
                defects.append(f"{where}: {exc}")
                continue
            if not 0 <= y < task.num_classes:
                defects.append(f"{where}: label {y} is outside the task's classes 0..{task.num_classes - 1}")
                continue
            s, e = img.spans[0]
            out.append((where, f"{f.name}@{rec.start + s}+{e - s}", y))
        if not out and not defects:
            defects.append(f"{task_dir}: {split} = {expr} selects no record")
        return out, defects

    def check_folder(self, task: Task, task_dir: Path, split: str) -> Path:
        if task_dir is None or not Path(task_dir).is_dir():
            raise DataError(f"task {task.name!r}: no prepared TFDS folder. {task.how_to_get}".strip())
        return super().check_folder(task, task_dir, split)

    def read(self, task: Task, task_dir: Path, split: str):
        self.check_folder(task, task_dir, split)
        return super().read(task, task_dir, split)


def check_sources(tasks) -> list[str]:
    """Problems of the TFDS sources of ``tasks`` (rules, splits) without any data: for the task registry's test."""
    problems = []
    for t in tasks:
        src = t.sources.get("tfds")
        if src is None:
            continue
        try:
            label_rule(src.get("label", "label"))
            missing = set(task_splits(t)) - set(src["splits"])
            if missing:
                problems.append(f"{t.name}: no TFDS slice for {sorted(missing)}")
        except DataError as exc:
            problems.append(f"{t.name}: {exc}")
    return problems
