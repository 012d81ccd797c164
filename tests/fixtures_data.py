"""Tiny VTAB-1k (NOAH layout) and FGVC (VPT JSON layout) data trees for the data tests.

The trees use exactly the real on-disk layouts, with images in many encodings (RGB/CMYK JPEG, grayscale,
RGBA and palette PNG, odd sizes and aspect ratios) and some odd file names (spaces, unicode). They are
small: the split sizes are declared in ``<task>/peftbench_prepared.json`` (what `peftbench data
verify` checks instead of the official sizes, with a note), so the end-to-end tests stay fast. Pass
``real_sizes=True`` to write the real train800/val200/train800val200 sizes (800/200/1000 lines).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from peftbench.tasks import get_task

FIXTURE_MANIFEST = {"prepared_by": "tests/fixtures_data.py", "source": "synthetic test images",
                    "identical_to_release": False}


def _image(rng: np.random.Generator, label: int, num_classes: int, kind: int, hw=(8, 8)) -> Image.Image:
    """A small image whose colour depends on the label, in one of several modes."""
    h, w = hw
    base = np.full((h, w, 3), (label * 37) % 256, dtype=np.uint8)
    base[..., 1] = (label * 91) % 256
    base = (base.astype(np.int16) + rng.integers(-10, 10, size=base.shape)).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(base, "RGB")
    mode = kind % 5
    if mode == 1:
        im = im.convert("L")
    elif mode == 2:
        im = im.convert("RGBA")
    elif mode == 3:
        im = im.convert("CMYK")
    elif mode == 4:
        im = im.convert("P")
    return im


def _save(im: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        if im.mode not in ("RGB", "L", "CMYK"):
            im = im.convert("RGB")
        im.save(path, quality=95)
    else:
        if im.mode == "CMYK":
            im = im.convert("RGB")
        im.save(path)


def _name(split: str, i: int, kind: int) -> str:
    ext = ".jpg" if kind % 5 in (0, 3) else ".png"
    if i % 7 == 3:
        return f"images/{split}/odd name {i:06d} ü{ext}"  # spaces and unicode
    return f"images/{split}/{i:06d}{ext}"


def vtab_sizes(num_classes: int, real_sizes: bool = False) -> dict[str, int]:
    if real_sizes:
        return {"train800": 800, "val200": 200, "train800val200": 1000, "test": max(num_classes, 20)}
    return {"train800": 24, "val200": 8, "train800val200": 32, "test": max(num_classes, 12)}


def write_vtab_task(data_root: Path, task_name: str, *, real_sizes: bool = False, sizes: dict | None = None,
                    seed: int = 0, manifest: bool = True) -> Path:
    """One VTAB-1k task in NOAH's layout under ``data_root/vtab-1k/<folder>/``. Labels cycle through
    all classes, so test (size ≥ classes) holds every class."""
    task = get_task(task_name)
    d = task.directory(Path(data_root))
    sizes = dict(sizes or vtab_sizes(task.num_classes, real_sizes))
    rng = np.random.default_rng(seed)
    lines: dict[str, list[str]] = {}
    for split in ("train800", "val200", "test"):
        rows = []
        for i in range(sizes[split]):
            y = (i + (3 if split == "val200" else 0)) % task.num_classes
            rel = _name(split, i, i)
            _save(_image(rng, y, task.num_classes, i), d / rel)
            rows.append(f"{rel} {y}")
        lines[split] = rows
    # NOAH writes its own copies of the train800 + val200 images under images/train800val200/
    rows = []
    for j, row in enumerate(lines["train800"] + lines["val200"]):
        rel, y = row.rsplit(" ", 1)
        src = d / rel
        new = str(Path(_name("train800val200", j, 0)).with_suffix(src.suffix))
        (d / new).parent.mkdir(parents=True, exist_ok=True)
        (d / new).write_bytes(src.read_bytes())
        rows.append(f"{new} {y}")
    lines["train800val200"] = rows[:sizes["train800val200"]]
    for split, rows in lines.items():
        (d / f"{split}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    if manifest:  # the sizes that differ from VTAB-1k's are declared (with real_sizes: only test)
        declared = {k: v for k, v in sizes.items() if v != task.split_sizes.get(k)}
        (d / "peftbench_prepared.json").write_text(json.dumps({**FIXTURE_MANIFEST, "split_sizes": declared},
                                                              indent=1))
    return d


def write_vtab_tree(data_root: Path, tasks=("dtd", "eurosat"), **kw) -> Path:
    for t in tasks:
        write_vtab_task(data_root, t, **kw)
    return Path(data_root)


def write_fgvc_task(data_root: Path, task_name: str, *, per_class: dict | None = None, one_based: bool = True,
                    classes: int | None = None, seed: int = 0) -> Path:
    """One FGVC dataset in VPT's layout: ``{train,val,test}.json`` (image path → class id, 1-based by
    default like the official annotation files) and the images under the dataset's image folder.
    ``per_class``: images per class and split (default train 1, val: every 10th class, test 1)."""
    task = get_task(task_name)
    d = task.directory(Path(data_root))
    img_dir = d / task.image_root if task.image_root else d
    c = classes or task.num_classes
    per_class = per_class or {"train": 1, "test": 1}
    rng = np.random.default_rng(seed)
    k = 0
    for split in ("train", "val", "test"):
        mapping = {}
        if split in per_class:
            cls_list = [(cl, per_class[split]) for cl in range(c)]
        else:  # val: a few classes only (a missing class in val is only a note)
            cls_list = [(cl, 1) for cl in range(0, c, 10)]
        for cl, n in cls_list:
            for i in range(n):
                k += 1
                ext = ".jpg" if k % 5 in (0, 3) else ".png"
                folder = f"{cl + 1:03d}.Class_{cl + 1}"
                fname = f"img {split} {i} ü{ext}" if k % 7 == 3 else f"{split}_{cl:04d}_{i}{ext}"
                rel = f"{folder}/{fname}"
                hw = (7 + k % 5, 9 + k % 3)  # not square: the shorter side matters
                _save(_image(rng, cl, c, k, hw), img_dir / rel)
                mapping[rel] = cl + (1 if one_based else 0)
        (d / f"{split}.json").write_text(json.dumps(mapping, ensure_ascii=False), encoding="utf-8")
    return d


def truncate(path: Path, keep: int = 40) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:keep])


def image_of_line(task_dir: Path, split: str, lineno: int) -> Path:
    line = (Path(task_dir) / f"{split}.txt").read_text(encoding="utf-8").splitlines()[lineno - 1]
    return Path(task_dir) / line.rsplit(" ", 1)[0]


def export_vit_npz(model, path: Path, *, extra_head: int | None = 7) -> Path:
    """Write a timm ViT's weights as an original Google/JAX ViT ``.npz`` (the ViT-B_16.npz key names and
    layouts that timm's ``_load_weights`` reads): conv kernels HWIO, dense kernels (in, out), attention
    kernels (D, heads, head_dim) / out (heads, head_dim, D). ``extra_head`` adds ``head/*`` and
    ``pre_logits/*`` arrays as the in21k file has (the backbone must ignore them)."""
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    d = sd["cls_token"].shape[-1]
    heads = model.blocks[0].attn.num_heads
    hd = d // heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    for i in range(len(model.blocks)):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        out[p + "LayerNorm_0/scale"] = sd[b + "norm1.weight"]
        out[p + "LayerNorm_0/bias"] = sd[b + "norm1.bias"]
        out[p + "LayerNorm_2/scale"] = sd[b + "norm2.weight"]
        out[p + "LayerNorm_2/bias"] = sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w = qkv_w[j * d:(j + 1) * d]  # (out=D, in=D)
            out[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = w.T.reshape(d, heads, hd)
            out[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(heads, hd)
        out[p + "MultiHeadDotProductAttention_1/out/kernel"] = \
            sd[b + "attn.proj.weight"].reshape(d, heads, hd).transpose(1, 2, 0)
        out[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            out[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            out[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    if extra_head:
        rng = np.random.default_rng(0)
        out["pre_logits/kernel"] = rng.standard_normal((d, d)).astype(np.float32)
        out["pre_logits/bias"] = np.zeros(d, np.float32)
        out["head/kernel"] = rng.standard_normal((d, extra_head)).astype(np.float32)
        out["head/bias"] = np.zeros(extra_head, np.float32)
    np.savez(path, **{k: np.ascontiguousarray(v) for k, v in out.items()})
    return Path(path)


def write_tfds(root: Path, builder: str, version: str, splits: dict[str, list[int]], records) -> Path:
    """A folder as tensorflow_datasets prepares it: ``splits`` = TFDS split -> its shard lengths;
    ``records(split, i)`` = the serialised Example of record i of that split. dataset_info.json lists the shard
    lengths as TFDS writes them (``shardLengths``, int64 as strings)."""
    from peftbench.data import tfrecord

    d = Path(root) / builder / version
    d.mkdir(parents=True)
    base = builder.split("/")[0]
    info: dict = {"name": base, "version": version, "splits": []}
    for split, lengths in splits.items():
        i = 0
        for k, n in enumerate(lengths):
            tfrecord.write_records(d / f"{base}-{split}.tfrecord-{k:05d}-of-{len(lengths):05d}",
                                   [records(split, j) for j in range(i, i + n)])
            i += n
        info["splits"].append({"name": split, "shardLengths": [str(n) for n in lengths]})
    (d / "dataset_info.json").write_text(json.dumps(info))
    return d


TFDS_TOY = {"builder": "toy_tfds", "version": "1.*.*", "label": "label",
            "splits": {"train800": "train[:6]", "val200": "train[n*60//100:n*60//100+3]",
                       "train800val200": "train[:6]+train[n*60//100:n*60//100+3]", "test": "test"}}


def write_tfds_toy(root: Path) -> str:
    """A 3-class task of the tests' suite held only in the TFDS layout (12 train records in 2 shards, 6 test):
    its name."""
    import io

    from peftbench.data import tfrecord
    from peftbench.tasks import TASKS, Task, register_task

    if "toy_tfds" not in TASKS:
        register_task(Task(name="toy_tfds", suite="testsuite", num_classes=3, description="TFDS-layout toy",
                           layout="tfds", sources={"tfds": TFDS_TOY}, folder="toy_tfds"))

    def rec(split, i):
        buf = io.BytesIO()
        Image.fromarray(np.full((6, 6, 3), (i * 40) % 256, dtype=np.uint8)).save(buf, format="PNG")
        return tfrecord.encode_example({"image": buf.getvalue(), "label": i % 3})

    write_tfds(root, "toy_tfds", "1.0.0", {"train": [7, 5], "test": [6]}, rec)
    return "toy_tfds"
