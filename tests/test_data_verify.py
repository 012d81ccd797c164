"""`peftbench data verify`: every defect named (file, line, what), fingerprints, the stamp cache, the
VTAB-1k task table and aliases, and the sweep refusing data that fails."""
import json
import shutil

import pytest
from fixtures_data import image_of_line, truncate, write_fgvc_task, write_vtab_task

from peftbench.api.schema import Sweep
from peftbench.cli import main
from peftbench.data.splits import fingerprint
from peftbench.data.verify import MANIFEST, verify_task
from peftbench.errors import DataError
from peftbench.sweep.plan import plan
from peftbench.tasks import get_suite, get_task


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    write_vtab_task(root, "eurosat")
    write_fgvc_task(root, "oxford_flowers")
    return root


@pytest.fixture
def root(pristine, tmp_path):
    """A fresh copy of the fixture tree that a test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(pristine, dst)
    return dst


def eurosat_dir(root):
    return root / "vtab-1k" / "eurosat"


def verify(root, task="eurosat"):
    return verify_task(get_task(task), root, progress=False)


def edit_line(f, lineno, new):
    lines = f.read_text(encoding="utf-8").splitlines()
    lines[lineno - 1] = new
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# the VTAB-1k table
# ---------------------------------------------------------------------------------------------

TEST_SIZES = {"cifar100": 10000, "caltech101": 6084, "dtd": 1880, "oxford_flowers102": 6149, "oxford_iiit_pet": 3669,
              "svhn": 26032, "sun397": 21750, "patch_camelyon": 32768, "eurosat": 5400, "resisc45": 6300,
              "diabetic_retinopathy": 42670, "clevr_count": 15000, "clevr_distance": 15000, "dmlab": 22735,
              "kitti_distance": 711, "dsprites_location": 73728, "dsprites_orientation": 73728,
              "smallnorb_azimuth": 12150, "smallnorb_elevation": 12150}


def test_vtab_tasks_groups_classes_and_split_sizes():
    tasks = [get_task(t) for t in get_suite("vtab").tasks]
    assert len(tasks) == 19
    assert sum(t.num_classes for t in tasks) == 100 + 102 + 47 + 102 + 37 + 10 + 397 + 2 + 10 + 45 + 5 + 8 + 6 + 6 \
        + 4 + 16 + 16 + 18 + 9
    for t in tasks:
        assert t.split_sizes == {"train800": 800, "val200": 200, "train800val200": 1000, "test": TEST_SIZES[t.name]}
        assert t.group in ("natural", "specialized", "structured")


@pytest.mark.parametrize("alias,name", [
    ("cifar", "cifar100"), ("CIFAR_100", "cifar100"), ("oxford_pet", "oxford_iiit_pet"), ("pets", "oxford_iiit_pet"),
    ("kitti", "kitti_distance"), ("dsprites_loc", "dsprites_location"), ("dsprites_ori", "dsprites_orientation"),
    ("smallnorb_azi", "smallnorb_azimuth"), ("smallnorb_ele", "smallnorb_elevation"), ("clevr_dist", "clevr_distance"),
    ("vtab-cifar(num_classes=100)", "cifar100"),
    ('vtab-smallnorb(predicted_attribute="label_azimuth")', "smallnorb_azimuth"),
    ('vtab-smallnorb(predicted_attribute="label_elevation")', "smallnorb_elevation"),
    ('vtab-dsprites(predicted_attribute="label_x_position",num_classes=16)', "dsprites_location"),
    ("vtab-dsprites(num_classes=16, predicted_attribute='label_orientation')", "dsprites_orientation"),
    ('vtab-kitti(task="closest_vehicle_distance")', "kitti_distance"),
    ('clevr(task="count_all")', "clevr_count"), ('vtab-clevr(task="closest_object_distance")', "clevr_distance"),
    ('vtab-diabetic_retinopathy(config="btgraham-300")', "diabetic_retinopathy"),
    ("CUB", "cub200"), ("OxfordFlowers", "oxford_flowers"), ("StanfordDogs", "stanford_dogs"),
    ("StanfordCars", "stanford_cars"), ("nabirds", "nabirds"), ("CUB_200_2011", "cub200"),
])
def test_aliases(alias, name):
    assert get_task(alias).name == name


def test_vpt_names_survive_the_comma_split_of_tasks(tmp_path):
    from peftbench.api.schema import _split as _names

    text = 'dtd,vtab-dsprites(predicted_attribute="label_x_position",num_classes=16),kitti'
    assert [get_task(n).name for n in _names(text)] == ["dtd", "dsprites_location", "kitti_distance"]


# ---------------------------------------------------------------------------------------------
# clean data
# ---------------------------------------------------------------------------------------------


def test_clean_tree_passes_with_fingerprint_and_a_note_about_declared_sizes(root):
    rep = verify(root)
    assert rep.ok, rep.defects
    assert rep.fingerprint == fingerprint(get_task("eurosat"), root)
    assert any("not the released vtab split" in n and "test 12 (official: 5400)" in n for n in rep.notes)
    rep = verify(root, "oxford_flowers")
    assert rep.ok, rep.defects


def test_official_sizes_apply_without_the_manifest(root):
    (eurosat_dir(root) / MANIFEST).unlink()
    rep = verify(root)
    assert not rep.ok
    want = {"train800.txt: 24 valid entries, expected 800", "val200.txt: 8 valid entries, expected 200",
            "train800val200.txt: 32 valid entries, expected 1000", "test.txt: 12 valid entries, expected 5400"}
    for w in want:
        assert any(w in d for d in rep.defects), (w, rep.defects)


def test_stamp_cache_skips_decoding_and_notices_a_changed_image(root, monkeypatch):
    assert verify(root).ok
    import peftbench.data.images as images

    monkeypatch.setattr(images, "check_image", lambda p: pytest.fail("decoded again"))
    rep = verify(root)
    assert rep.ok and rep.from_stamp
    monkeypatch.undo()
    img = image_of_line(eurosat_dir(root), "test", 2)
    truncate(img)
    rep = verify(root)
    assert not rep.from_stamp and not rep.ok


# ---------------------------------------------------------------------------------------------
# each defect, named
# ---------------------------------------------------------------------------------------------


def test_missing_image(root):
    img = image_of_line(eurosat_dir(root), "val200", 3)
    img.unlink()
    rep = verify(root)
    f = eurosat_dir(root) / "val200.txt"
    assert f"{f}:3: image {img} does not exist" in rep.defects


def test_truncated_image(root):
    img = image_of_line(eurosat_dir(root), "test", 1)  # a JPEG
    truncate(img, 60)
    rep = verify(root)
    msg = next(d for d in rep.defects if str(img) in d)
    assert msg.startswith(f"{eurosat_dir(root) / 'test.txt'}:1: image {img} cannot be decoded")


def test_bad_line_and_label_out_of_range_and_duplicate_all_listed(root):
    f = eurosat_dir(root) / "train800.txt"
    lines = f.read_text().splitlines()
    edit_line(f, 2, "images/train800/000001.png")  # no label
    edit_line(f, 5, lines[4].rsplit(" ", 1)[0] + " 10")  # 10 classes: 0..9
    edit_line(f, 6, lines[5].rsplit(" ", 1)[0] + " x")
    edit_line(f, 7, lines[0])  # the first image again
    rep = verify(root)
    assert f"{f}:2: expected '<image path> <label>', got 'images/train800/000001.png'" in rep.defects
    assert f"{f}:5: label 10 is outside the task's classes 0..9" in rep.defects
    assert f"{f}:6: label 'x' is not an integer" in rep.defects
    assert any(d.startswith(f"{f}:7: image ") and "listed again (first on line 1)" in d for d in rep.defects)
    assert f"{f}: 20 valid entries, expected 24 (declared in {MANIFEST})" in rep.defects


def test_wrong_split_size(root):
    f = eurosat_dir(root) / "val200.txt"
    f.write_text("".join(f.read_text().splitlines(keepends=True)[:-1]))
    rep = verify(root)
    assert rep.defects == [f"{f}: 7 valid entries, expected 8 (declared in {MANIFEST})"]


def test_class_missing_from_test(root):
    f = eurosat_dir(root) / "test.txt"
    lines = f.read_text().splitlines()
    keep = [ln for ln in lines if not ln.endswith(" 4")]
    m = json.loads((eurosat_dir(root) / MANIFEST).read_text())
    m["split_sizes"]["test"] = len(keep)
    (eurosat_dir(root) / MANIFEST).write_text(json.dumps(m))
    f.write_text("\n".join(keep) + "\n")
    rep = verify(root)
    assert rep.defects == [f"{f}: class(es) 4 have no example in test (every class of eurosat must occur in test)"]


def test_missing_split_file_and_missing_folder(root, tmp_path):
    (eurosat_dir(root) / "val200.txt").unlink()
    rep = verify(root)
    assert any("split file" in d and "val200.txt is missing" in d for d in rep.defects)
    rep = verify(tmp_path / "nowhere")
    assert not rep.ok and "does not exist" in rep.defects[0] and "--data-root" in rep.defects[0]


def test_fgvc_defects(root):
    d = root / "fgvc" / "OxfordFlower"
    train = json.loads((d / "train.json").read_text())
    first = next(iter(train))
    (d / first).unlink()  # an image
    test = json.loads((d / "test.json").read_text())
    drop = [k for k, v in test.items() if v == 5]
    for k in drop:
        del test[k]
    key = next(iter(test))
    test[key] = "seven"
    (d / "test.json").write_text(json.dumps(test))
    (d / "val.json").write_text('{"a.jpg": 1, "a.jpg": 2}')
    rep = verify(root, "oxford_flowers")
    assert f"{d / 'train.json'}: key {first!r}: image {d / first} does not exist" in rep.defects
    assert any(x.startswith(f"{d / 'test.json'}: entry 1 ({key!r}): class id 'seven' is not an integer")
               for x in rep.defects)
    # raw id 5 (1-based) is label 4; entry 1 (class 0) is invalid, so label 0 is missing too
    assert any("test.json: class(es) 0, 4 have no example in test" in x for x in rep.defects)
    assert any("'a.jpg' is listed more than once" in x for x in rep.defects)


# ---------------------------------------------------------------------------------------------
# the command and the sweep
# ---------------------------------------------------------------------------------------------


def test_cli_verify_exit_codes_and_report(root, capsys):
    assert main(["data", "verify", "--suite", "vtab", "--tasks", "eurosat", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    fp = fingerprint(get_task("eurosat"), root)
    assert f"eurosat: OK; fingerprint {fp}" in out and "1/1 task(s) OK" in out
    img = image_of_line(eurosat_dir(root), "train800", 4)
    img.unlink()
    assert main(["data", "verify", "--suite", "vtab", "--tasks", "eurosat", "--data-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"defect: {eurosat_dir(root) / 'train800.txt'}:4: image {img} does not exist" in out
    assert "1 FAILED" in out


def test_sweep_refuses_bad_data_before_any_compute_unless_told(root):
    truncate(image_of_line(eurosat_dir(root), "test", 1), 60)
    settings = Sweep(methods=["linear"], suite="vtab", tasks=["eurosat"], data_root=str(root),
                             backbone="demo-vit-random", seeds=[1])
    with pytest.raises(DataError) as exc:
        plan(settings)
    msg = str(exc.value)
    assert "data verification failed for 1 task(s) (eurosat)" in msg and "test.txt:1: image" in msg
    assert "--no-verify-data" in msg
    settings.verify_data = False
    assert len(plan(settings)) == 1  # the split lists themselves are fine


def test_cli_run_flag_no_verify_data(root, tmp_path, capsys):
    f = eurosat_dir(root) / "test.txt"
    f.write_text("".join(f.read_text().splitlines(keepends=True)[:-1]))  # 11 lines, 12 declared
    argv = ["run", "--methods", "linear", "--suite", "vtab", "--tasks", "eurosat", "--data-root", str(root),
            "--backbone", "demo-vit-random", "--epochs", "1", "--num-seeds", "1", "--lr", "0.1", "--wd", "0",
            "--quiet", "--runs-dir", str(tmp_path / "runs")]
    assert main(argv) == 2
    assert f"{f}: 11 valid entries, expected 12" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before any run
    assert main(argv + ["--no-verify-data"]) == 0
    (rec,) = list((tmp_path / "runs").rglob("*.json"))
    assert json.loads(rec.read_text())["status"] == "ok"
