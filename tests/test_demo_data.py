"""Tests of the offline demo tasks (tasks/demo_data.py)."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _load():
    # Loaded by path: demo_data is standalone and must not need peftbench installed.
    spec = importlib.util.spec_from_file_location("demo_data_under_test", REPO / "tasks" / "_demo_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


dd = _load()
TASKS = list(dd.DEMO_TASKS)
SPLITS = ("train800", "val200", "train800val200", "test")


def _read_list(task_dir: Path, split: str) -> list[tuple[str, int]]:
    out = []
    for line in (task_dir / f"{split}.txt").read_text().splitlines():
        rel, lab = line.split(" ")
        out.append((rel, int(lab)))
    return out


def test_registry():
    assert set(TASKS) == {"digits", "animals", "dsprites_loc", "dsprites_ori", "clevr_count"}
    for info in dd.DEMO_TASKS.values():
        assert info["group"] in {"natural", "specialized", "structured"}
        assert info["num_classes"] >= 2 and info["test_size"] > 0 and info["description"]


def test_module_does_not_import_peftbench():
    lines = (REPO / "tasks" / "_demo_data.py").read_text().splitlines()
    imports = [ln.strip() for ln in lines if ln.strip().startswith(("import ", "from "))]
    assert imports and not [ln for ln in imports if "peftbench" in ln]


@pytest.mark.parametrize("task", TASKS)
def test_materialise(task, tmp_path):
    info = dd.DEMO_TASKS[task]
    task_dir = tmp_path / "a" / task
    dd.materialise(task, task_dir, seed=0)

    lists = {s: _read_list(task_dir, s) for s in SPLITS}
    assert len(lists["train800"]) == 800
    assert len(lists["val200"]) == 200
    assert len(lists["test"]) == info["test_size"]
    assert lists["train800val200"] == lists["train800"] + lists["val200"]
    for split in ("train800", "val200", "test"):
        assert all(rel.startswith(f"images/{split}/") and rel.endswith(".png") for rel, _ in lists[split])

    labels = np.array([lab for s in ("train800", "val200", "test") for _, lab in lists[s]])
    assert labels.min() >= 0 and labels.max() < info["num_classes"]
    # Every class is present in the training split (labels are balanced-ish).
    assert len(np.unique([lab for _, lab in lists["train800"]])) == info["num_classes"]

    # All listed files exist; a sample decodes to 32x32 RGB.
    all_paths = [rel for s in ("train800", "val200", "test") for rel, _ in lists[s]]
    assert all((task_dir / rel).is_file() for rel in all_paths)
    for rel in all_paths[::97]:
        with Image.open(task_dir / rel) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32)
            assert np.asarray(im).std() > 0  # not blank

    # Determinism: a second materialisation is byte-identical.
    other = tmp_path / "b" / task
    dd.materialise(task, other, seed=0)
    for s in SPLITS:
        assert (task_dir / f"{s}.txt").read_bytes() == (other / f"{s}.txt").read_bytes()
    for rel in all_paths[::53]:
        assert (task_dir / rel).read_bytes() == (other / rel).read_bytes()

    # No temporary directories are left behind.
    assert sorted(p.name for p in task_dir.parent.iterdir()) == [task]


def test_seed_changes_data(tmp_path):
    dd.materialise("dsprites_ori", tmp_path / "s0", seed=0)
    dd.materialise("dsprites_ori", tmp_path / "s1", seed=1)
    assert (tmp_path / "s0" / "test.txt").read_bytes() != (tmp_path / "s1" / "test.txt").read_bytes()


def test_existing_task_is_left_alone(tmp_path):
    task_dir = tmp_path / "digits"
    dd.materialise("digits", task_dir)
    marker = task_dir / "test.txt"
    mtime = marker.stat().st_mtime_ns
    dd.materialise("digits", task_dir)
    assert marker.stat().st_mtime_ns == mtime


def test_concurrent_materialise(tmp_path):
    task_dir = tmp_path / "clevr_count"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: dd.materialise("clevr_count", task_dir, seed=0), range(4)))
    assert len(_read_list(task_dir, "test")) == dd.DEMO_TASKS["clevr_count"]["test_size"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clevr_count"]


def test_unknown_task(tmp_path):
    with pytest.raises(KeyError):
        dd.materialise("nope", tmp_path / "nope")


def test_missing_animal_mnist_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "animal_mnist" else real(name, *a))
    with pytest.raises(RuntimeError, match="pip install --no-deps animal-mnist==0.4"):
        dd.generate("animals")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_os_system():
    with pytest.raises(pickle.UnpicklingError):
        dd.restricted_loads(pickle.dumps(_Evil()))
    # Protocol-0 GLOBAL opcode spelled out by hand: os.system("echo pwned").
    with pytest.raises(pickle.UnpicklingError):
        dd.restricted_loads(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(pickle.UnpicklingError):
        dd.RestrictedUnpickler(io.BytesIO(pickle.dumps(_Evil(), protocol=2))).load()


def test_restricted_unpickler_loads_numpy_arrays():
    for arr in (np.arange(12, dtype=np.uint8).reshape(3, 4), np.array([3, 1, 2], dtype=np.int64)):
        for proto in (3, 4):  # the animal-mnist files are protocol 4
            out = dd.restricted_loads(pickle.dumps(arr, protocol=proto))
            assert out.dtype == arr.dtype and np.array_equal(out, arr)


ASSETS = REPO / "peftbench" / "assets"


@pytest.mark.skipif(not (ASSETS / "demo_vit.safetensors").is_file(), reason="demo backbone not built")
def test_demo_backbone_assets_match_provenance():
    """The committed demo backbone matches its json and loads into the recorded timm model."""
    import hashlib
    import json

    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file

    meta = json.loads((ASSETS / "demo_vit.json").read_text())
    blob = (ASSETS / "demo_vit.safetensors").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == meta["safetensors_sha256"]
    kwargs = dict(meta["timm_create_model"])
    model = timm.create_model(kwargs.pop("model_name"), **kwargs)
    state = load_file(str(ASSETS / "demo_vit.safetensors"))
    assert set(state) == set(model.state_dict())  # backbone only: no classifier head
    model.load_state_dict(state, strict=True)
    assert model.num_features == 96
