"""Offline demo tasks written in the NOAH VTAB-1k on-disk layout.

Five small image-classification tasks that need no download, so the harness can
run end to end on any machine.  They are disjoint from Fashion-MNIST, which
pretrains the demo backbone (scripts/pretrain_demo_backbone.py).

  digits        scikit-learn's bundled 8x8 digits (1797 images), natural
  animals       animal-mnist's 10,000 28x28 animal silhouettes, natural
  dsprites_loc  procedural dSprites-like shapes, label = x-position bin, structured
  dsprites_ori  procedural dSprites-like shapes, label = orientation bin, structured
  clevr_count   procedural CLEVR-like scenes, label = number of objects - 1, structured

On-disk layout written by :func:`materialise` (the layout of NOAH's exported
VTAB-1k, every image a 32x32 RGB PNG)::

    task_dir/images/train800/000000.png ... 000799.png
    task_dir/images/val200/000000.png   ... 000199.png
    task_dir/images/test/000000.png     ... (test_size - 1)
    task_dir/train800.txt        800 lines  "images/train800/NNNNNN.png <label>"
    task_dir/val200.txt          200 lines  "images/val200/NNNNNN.png <label>"
    task_dir/train800val200.txt  1000 lines: the train800 lines then the val200 lines,
                                 pointing at the SAME image files (NOAH writes its
                                 own copies under images/train800val200/; we do not,
                                 there is no images/train800val200/ directory)
    task_dir/test.txt            test_size lines "images/test/NNNNNN.png <label>"

Every line is "<path relative to task_dir> <int label>".  The split of a task is
a deterministic shuffle of its pool of images: the first 800 go to train800,
the next 200 to val200, the next test_size to test.

Generation is deterministic: the same (task, seed) gives byte-identical files
(given the same numpy, Pillow, zlib and scikit-learn versions).
This module is pure numpy/PIL/scikit-learn and does not import peftbench.
"""

from __future__ import annotations

import errno
import gzip
import importlib
import importlib.util
import io
import math
import os
import pickle
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMG_SIZE = 32
N_TRAIN, N_VAL = 800, 200

DEMO_TASKS: dict[str, dict] = {
    "digits": {
        "num_classes": 10,
        "description": "scikit-learn's bundled 8x8 handwritten digits, upscaled to 32x32 (label = digit).",
        "group": "natural",
        "test_size": 797,  # 1797 - 800 - 200: all the remaining images
    },
    "animals": {
        "num_classes": 10,
        "description": "animal-mnist's 28x28 animal silhouettes, resized to 32x32 (label = animal class).",
        "group": "natural",
        "test_size": 1000,
    },
    "dsprites_loc": {
        "num_classes": 8,
        "description": "dSprites-like white shape (square/ellipse/heart) on black (label = x-position bin).",
        "group": "structured",
        "test_size": 500,
    },
    "dsprites_ori": {
        "num_classes": 8,
        "description": "dSprites-like large white asymmetric shape (arrow/L/heart) on black (label = 45-degree orientation bin).",
        "group": "structured",
        "test_size": 500,
    },
    "clevr_count": {
        "num_classes": 6,
        "description": "CLEVR-like scene of 1-6 coloured circles/squares on grey (label = object count - 1).",
        "group": "structured",
        "test_size": 500,
    },
}

ANIMAL_MNIST_HINT = "pip install --no-deps animal-mnist==0.4"


# ----------------------------------------------------------------------------- safe unpickling

# The only globals a pickled numpy array needs.  numpy>=2 moved numpy.core to
# numpy._core (the old name still works but warns), so both spellings are allowed.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays; any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")
        if module.startswith("numpy.core."):
            try:  # prefer numpy>=2's real location, avoiding its deprecation warning
                return getattr(importlib.import_module("numpy._core." + module[len("numpy.core.") :]), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def restricted_loads(data: bytes):
    """``pickle.loads`` restricted to numpy arrays (see :class:`RestrictedUnpickler`)."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


# ----------------------------------------------------------------------------- image helpers


def _resize_gray(images: np.ndarray) -> np.ndarray:
    """(N,h,w) uint8 grayscale -> (N,32,32,3) uint8 RGB, PIL bilinear resize."""
    out = np.empty((len(images), IMG_SIZE, IMG_SIZE, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        small = Image.fromarray(im).resize((IMG_SIZE, IMG_SIZE), Image.BILINEAR)
        out[i] = np.asarray(small)[:, :, None]
    return out


def _balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """n labels with every class equally often (+-1), in random order."""
    return rng.permutation(np.arange(n) % num_classes)


# Procedural sprites are drawn at SS x resolution and box-downsampled (anti-aliasing).
SS = 4


def _shape_polygon(shape: str) -> np.ndarray:
    """Vertices (K,2) of a shape inside the unit disk, centred near the origin."""
    if shape == "square":
        return np.array([[-0.7, -0.7], [0.7, -0.7], [0.7, 0.7], [-0.7, 0.7]])
    if shape == "ellipse":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        return np.stack([np.cos(t), 0.55 * np.sin(t)], 1)
    if shape == "heart":  # classic parametric heart, scaled into the unit disk
        t = np.linspace(0, 2 * np.pi, 60, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # y points down
        pts = np.stack([x, y + 2.5], 1)
        return pts / np.abs(pts).max() * 0.95
    if shape == "arrow":  # points along +x
        return np.array([[1.0, 0.0], [0.15, 0.65], [0.15, 0.25], [-0.9, 0.25], [-0.9, -0.25], [0.15, -0.25], [0.15, -0.65]])
    if shape == "ell":  # the letter L: no rotational nor mirror symmetry
        return np.array([[-0.55, -0.8], [-0.1, -0.8], [-0.1, 0.35], [0.6, 0.35], [0.6, 0.8], [-0.55, 0.8]])
    raise ValueError(shape)


def _render_sprite(shape: str, radius: float, angle: float, cx: float, cy: float) -> np.ndarray:
    """White shape on black, (32,32) uint8. angle in radians, centre/radius in pixels."""
    pts = _shape_polygon(shape)
    c, s = math.cos(angle), math.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]]) * radius + [cx, cy]  # rotate, scale, move
    big = Image.new("L", (IMG_SIZE * SS, IMG_SIZE * SS), 0)
    ImageDraw.Draw(big).polygon([(float(x * SS), float(y * SS)) for x, y in pts], fill=255)
    return np.asarray(big.resize((IMG_SIZE, IMG_SIZE), Image.BOX))


# ----------------------------------------------------------------------------- task generators
# Each returns (images (N,32,32,3) uint8, labels (N,) int64), already in split order.


def _gen_digits(rng: np.random.Generator, n: int):
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    d = load_digits()
    imgs = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    order = rng.permutation(len(imgs))[:n]
    return _resize_gray(imgs[order]), d.target[order].astype(np.int64)


def _animal_mnist_dir() -> Path:
    spec = importlib.util.find_spec("animal_mnist")  # locates without importing (it imports tensorflow)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the 'animals' demo task needs the animal-mnist package: {ANIMAL_MNIST_HINT}")
    d = Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"
    if not (d / "animal_data_version_3.gz").is_file():
        raise RuntimeError(f"animal-mnist data files not found in {d}: {ANIMAL_MNIST_HINT}")
    return d


def _gen_animals(rng: np.random.Generator, n: int):
    d = _animal_mnist_dir()
    with gzip.open(d / "animal_data_version_3.gz", "rb") as f:
        imgs = np.asarray(restricted_loads(f.read()), dtype=np.uint8)
    with gzip.open(d / "animal_label_version_3.gz", "rb") as f:
        labels = np.asarray(restricted_loads(f.read()), dtype=np.int64)
    if imgs.shape[1:] != (28, 28) or len(imgs) != len(labels):
        raise RuntimeError(f"unexpected animal-mnist arrays {imgs.shape}, {labels.shape}")
    order = rng.permutation(len(imgs))[:n]  # the files are sorted by class
    return _resize_gray(imgs[order]), labels[order]


def _gen_dsprites(rng: np.random.Generator, n: int, factor: str):
    """dSprites-like: one shape, random scale/rotation/position; label = a binned factor.

    loc: label = x-position bin; centre x in [4,28) split into 8 bins of 3 px; shapes
         square/ellipse/heart with any rotation; centre y uniform.
    ori: label = rotation bin, 8 bins of 45 degrees over [0,360); shapes have no
         rotational symmetry (arrow, L, heart) so every angle is distinguishable.
         The shapes are large (radius 9-12 px) and near the centre (centre in
         [13,19]^2): with small shapes anywhere, orientation is at chance level for
         linear probes on any of our features (and on raw pixels).
    """
    shapes = ("square", "ellipse", "heart") if factor == "loc" else ("arrow", "ell", "heart")
    labels = _balanced_labels(n, 8, rng)
    imgs = np.empty((n, IMG_SIZE, IMG_SIZE, 3), dtype=np.uint8)
    for i, lab in enumerate(labels):
        shape = shapes[rng.integers(len(shapes))]
        if factor == "loc":
            lo, hi = 4.0, 28.0
            radius = rng.uniform(4.0, 7.0)
            angle = rng.uniform(0, 2 * np.pi)
            cx = lo + (lab + rng.uniform(0, 1)) * (hi - lo) / 8
            cy = rng.uniform(lo, hi)
        else:
            lo, hi = 13.0, 19.0
            radius = rng.uniform(9.0, 12.0)
            angle = (lab + rng.uniform(0, 1)) * (2 * np.pi / 8)
            cx, cy = rng.uniform(lo, hi, size=2)
        imgs[i] = _render_sprite(shape, radius, angle, cx, cy)[:, :, None]
    return imgs, labels.astype(np.int64)


_CLEVR_COLOURS = np.array(
    [[200, 40, 40], [40, 160, 60], [50, 80, 210], [220, 200, 40], [150, 60, 190], [40, 190, 200], [230, 130, 40],
     [240, 240, 240]],
    dtype=np.float64,
)


def _gen_clevr_count(rng: np.random.Generator, n: int):
    """CLEVR-like: 1-6 coloured circles/squares, non-overlapping, on grey with noise."""
    labels = _balanced_labels(n, 6, rng)
    imgs = np.empty((n, IMG_SIZE, IMG_SIZE, 3), dtype=np.uint8)
    for i, lab in enumerate(labels):
        bg = int(rng.integers(95, 150))
        big = Image.new("RGB", (IMG_SIZE * SS, IMG_SIZE * SS), (bg, bg, bg))
        draw = ImageDraw.Draw(big)
        placed: list[tuple[float, float, float]] = []
        for _ in range(lab + 1):
            r = rng.uniform(2.2, 4.0)
            # Rejection-sample a position not touching earlier objects; after 200 tries
            # accept an overlap (rare: 6 objects of r<=4 fit easily in 32x32).
            for _try in range(200):
                x, y = rng.uniform(r + 0.5, IMG_SIZE - r - 0.5, size=2)
                if all((x - px) ** 2 + (y - py) ** 2 > (r + pr + 1.0) ** 2 for px, py, pr in placed):
                    break
            placed.append((x, y, r))
            colour = np.clip(_CLEVR_COLOURS[rng.integers(len(_CLEVR_COLOURS))] * rng.uniform(0.75, 1.1), 0, 255)
            box = [(x - r) * SS, (y - r) * SS, (x + r) * SS, (y + r) * SS]
            fill = tuple(int(v) for v in colour)
            if rng.random() < 0.5:
                draw.ellipse(box, fill=fill)
            else:
                r2 = r * 0.85  # squares a bit smaller so areas are comparable
                draw.rectangle([(x - r2) * SS, (y - r2) * SS, (x + r2) * SS, (y + r2) * SS], fill=fill)
        img = np.asarray(big.resize((IMG_SIZE, IMG_SIZE), Image.BOX)).astype(np.float64)
        img += rng.normal(0, 4.0, img.shape)  # mild sensor noise
        imgs[i] = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return imgs, labels.astype(np.int64)


_GENERATORS = {
    "digits": _gen_digits,
    "animals": _gen_animals,
    "dsprites_loc": lambda rng, n: _gen_dsprites(rng, n, "loc"),
    "dsprites_ori": lambda rng, n: _gen_dsprites(rng, n, "ori"),
    "clevr_count": _gen_clevr_count,
}


def generate(task: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All images of a task in split order: (800 + 200 + test_size, 32, 32, 3) uint8 and labels."""
    if task not in DEMO_TASKS:
        raise KeyError(f"unknown demo task {task!r}; known: {sorted(DEMO_TASKS)}")
    n = N_TRAIN + N_VAL + DEMO_TASKS[task]["test_size"]
    # One independent stream per (seed, task); crc32 is stable across runs (unlike hash()).
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    imgs, labels = _GENERATORS[task](rng, n)
    assert imgs.shape == (n, IMG_SIZE, IMG_SIZE, 3) and imgs.dtype == np.uint8, imgs.shape
    return imgs, labels


# ----------------------------------------------------------------------------- writing


def _write_split(root: Path, split: str, imgs: np.ndarray, labels: np.ndarray) -> list[str]:
    (root / "images" / split).mkdir(parents=True)
    lines = []
    for i, (img, lab) in enumerate(zip(imgs, labels)):
        rel = f"images/{split}/{i:06d}.png"
        # PIL writes no timestamp or other varying metadata into PNGs: deterministic bytes.
        Image.fromarray(img).save(root / rel, format="PNG")
        lines.append(f"{rel} {int(lab)}")
    return lines


def _write_list(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def materialise(task: str, task_dir: Path, seed: int = 0) -> None:
    """Write ``task`` into ``task_dir`` in the NOAH VTAB-1k layout (see module docstring).

    Atomic and safe under concurrency: the task is built in a temporary sibling
    directory and renamed into place; if ``task_dir`` exists by then (another
    process won the race) ours is discarded.  If ``task_dir`` already exists on
    entry with its test.txt it is assumed complete and left untouched.
    """
    task_dir = Path(task_dir)
    if task not in DEMO_TASKS:
        raise KeyError(f"unknown demo task {task!r}; known: {sorted(DEMO_TASKS)}")
    if (task_dir / "test.txt").is_file():  # task dirs only appear complete (atomic rename)
        return
    task_dir.parent.mkdir(parents=True, exist_ok=True)
    imgs, labels = generate(task, seed)

    tmp = Path(tempfile.mkdtemp(prefix=f".{task_dir.name}.tmp-", dir=task_dir.parent))
    try:
        a, b = N_TRAIN, N_TRAIN + N_VAL
        train = _write_split(tmp, "train800", imgs[:a], labels[:a])
        val = _write_split(tmp, "val200", imgs[a:b], labels[a:b])
        test = _write_split(tmp, "test", imgs[b:], labels[b:])
        _write_list(tmp / "train800.txt", train)
        _write_list(tmp / "val200.txt", val)
        _write_list(tmp / "train800val200.txt", train + val)
        _write_list(tmp / "test.txt", test)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.rename(tmp, task_dir)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # Another process renamed its copy into place first: keep theirs, drop ours.
            shutil.rmtree(tmp, ignore_errors=True)
            if not (task_dir / "test.txt").is_file():
                raise RuntimeError(f"{task_dir} exists but is not a complete demo task; remove it") from e
            return
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


if __name__ == "__main__":  # python tasks/_demo_data.py OUT_DIR [seed]: materialise all tasks
    import sys
    import time

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo_data")
    seed_arg = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    for name in DEMO_TASKS:
        t0 = time.time()
        materialise(name, out / name, seed_arg)
        print(f"{name}: {out / name} ({time.time() - t0:.1f}s)")
