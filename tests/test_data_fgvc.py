"""FGVC: VPT's JSON layout per dataset, class-id mapping, the crop geometry against torchvision's
transforms, and the tensor augmentation."""
import json

import numpy as np
import pytest
import torch
from fixtures_data import write_fgvc_task
from PIL import Image

from peftbench.data.images import decode
from peftbench.data.layouts.vpt_json import VptJsonLayout
from peftbench.data.loader import load_split
from peftbench.data.splits import read_split
from peftbench.data.transforms import geometry, random_crop_flip, resize_length
from peftbench.errors import DataError
from peftbench.tasks import get_task


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("name,folder,images", [
    ("cub200", "CUB_200_2011", "images"), ("nabirds", "nabirds", "images"), ("oxford_flowers", "OxfordFlower", ""),
    ("stanford_dogs", "Stanford-dogs", "Images"), ("stanford_cars", "Stanford-cars", ""),
])
def test_image_folders_follow_vpt(tmp_path, name, folder, images):
    d = write_fgvc_task(tmp_path, name, classes=3)
    assert d == tmp_path / "fgvc" / folder
    split = read_split(get_task(name), tmp_path, "train")
    base = d / images if images else d
    assert all(p.is_file() and p.is_relative_to(base) for p in split.paths)
    assert split.labels == (0, 1, 2)  # 1-based ids in the file, 0-based labels


def test_class_ids_zero_based_sparse_or_one_based_give_the_same_labels(tmp_path):
    task = get_task("cub200")
    for i, (one_based, offset) in enumerate([(True, 0), (False, 0), (False, 1000)]):
        root = tmp_path / str(i)
        d = write_fgvc_task(root, "cub200", classes=4, one_based=one_based)
        if offset:  # NABirds-style sparse ids
            for split in ("train", "val", "test"):
                m = json.loads((d / f"{split}.json").read_text())
                (d / f"{split}.json").write_text(json.dumps({k: v * 7 + offset for k, v in m.items()}))
        assert VptJsonLayout().read(task, d, "train").labels == (0, 1, 2, 3)
        assert VptJsonLayout().read(task, d, "test").labels == (0, 1, 2, 3)


def test_json_errors_name_the_file_and_entry(tmp_path):
    task = get_task("oxford_flowers")
    d = write_fgvc_task(tmp_path, "oxford_flowers", classes=3)
    (d / "val.json").write_text('{"a.jpg": 1,')
    with pytest.raises(DataError, match=r"val\.json:1: not valid JSON"):
        VptJsonLayout().read(task, d, "val")
    (d / "val.json").write_text('["a.jpg"]')
    with pytest.raises(DataError, match=r"val\.json: expected a JSON object"):
        VptJsonLayout().read(task, d, "val")
    (d / "val.json").write_text('{"a.jpg": 1.5}')
    with pytest.raises(DataError, match=r"val\.json: entry 1 \('a\.jpg'\): class id 1\.5 is not an integer"):
        VptJsonLayout().read(task, d, "val")
    (d / "val.json").unlink()
    with pytest.raises(DataError, match=r"split file .*val\.json is missing"):
        VptJsonLayout().read(task, d, "val")


# ---------------------------------------------------------------------------------------------
# geometry: exactly torchvision's Resize(256) → CenterCrop(224) for evaluation
# ---------------------------------------------------------------------------------------------


def test_resize_length_matches_vpt():
    assert [resize_length(s) for s in (224, 384, 448, 32)] == [256, 438, 512, 36]


@pytest.mark.parametrize("hw", [(300, 451), (451, 300), (256, 256), (200, 180), (20, 300)])
def test_eval_geometry_equals_torchvision(tmp_path, hw):
    tv = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(0)
    path = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 255, size=(*hw, 3), dtype=np.uint8)).save(path)
    ref = tv.Compose([tv.Resize(256), tv.CenterCrop(224)])(Image.open(path).convert("RGB"))
    ours = decode(path, 224, resize_shorter=256)
    assert np.array_equal(ours, np.asarray(ref))
    # the stored training square: Resize(256) then the centre 256 x 256
    ref = tv.Compose([tv.Resize(256), tv.CenterCrop(256)])(Image.open(path).convert("RGB"))
    assert np.array_equal(decode(path, 256, resize_shorter=256), np.asarray(ref))


def test_split_geometry_per_role():
    fg, vt = get_task("cub200"), get_task("dtd")
    assert geometry(fg, "train", 224).stored == 256 and geometry(fg, "train", 224).resize_shorter == 256
    assert (geometry(fg, "val", 224).stored, geometry(fg, "val", 224).resize_shorter) == (224, 256)
    assert (geometry(fg, "test", 224).stored, geometry(fg, "test", 224).resize_shorter) == (224, 256)
    assert (geometry(vt, "train800", 224).stored, geometry(vt, "test", 224).resize_shorter) == (224, None)


def test_fgvc_load_split_shapes(tmp_path):
    write_fgvc_task(tmp_path, "stanford_dogs", classes=3)
    task = get_task("stanford_dogs")
    train = load_split(task, tmp_path, "train", 32)
    test = load_split(task, tmp_path, "test", 32)
    assert train.images.shape == (3, 3, 36, 36) and test.images.shape == (3, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# the augmentation
# ---------------------------------------------------------------------------------------------


def test_random_crop_flip_is_a_crop_or_its_mirror_and_seeded():
    x = torch.arange(2 * 3 * 10 * 12, dtype=torch.int64).reshape(2, 3, 10, 12).to(torch.uint8)
    torch.manual_seed(3)
    y = random_crop_flip(x, 8)
    torch.manual_seed(3)
    assert torch.equal(y, random_crop_flip(x, 8))
    assert y.shape == (2, 3, 8, 8) and y.dtype == torch.uint8
    for n in range(2):
        found = False
        for top in range(3):
            for left in range(5):
                crop = x[n, :, top:top + 8, left:left + 8]
                found |= torch.equal(y[n], crop) or torch.equal(y[n], crop.flip(-1))
        assert found


def test_random_crop_flip_statistics():
    torch.manual_seed(0)
    x = torch.zeros(4000, 1, 5, 5, dtype=torch.uint8)
    x[:, :, :, 0] = 1  # a marker in the left column
    y = random_crop_flip(x, 5)  # no room to move: only the flip varies
    flipped = (y[:, 0, 0, -1] == 1).float().mean().item()
    assert 0.45 < flipped < 0.55
    x = torch.zeros(4000, 1, 6, 6, dtype=torch.uint8)
    x[:, :, 0, :] = 1  # a marker in the top row
    kept = (random_crop_flip(x, 5)[:, 0, 0, :].sum(1) > 0).float().mean().item()
    assert 0.45 < kept < 0.55  # top offset 0 or 1, equally likely


def test_random_crop_flip_rejects_small_images():
    with pytest.raises(ValueError, match="smaller than the crop"):
        random_crop_flip(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), 5)
