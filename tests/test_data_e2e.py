"""End to end on fixture trees in the real layouts: `peftbench run` on VTAB-1k (dtd, eurosat) and FGVC
(oxford_flowers) data, verified first, decoded into the cache, trained and recorded with the fingerprint."""
import json

import pytest
from fixtures_data import write_fgvc_task, write_vtab_task, write_vtab_tree

from peftbench.cli import main
from peftbench.data.splits import fingerprint
from peftbench.data.verify import verify_task
from peftbench.tasks import get_task


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))


def records(runs):
    return [json.loads(p.read_text()) for p in sorted(runs.rglob("*.json"))]


def run(root, runs, suite, tasks):
    return main(["run", "--methods", "linear", "--suite", suite, "--tasks", tasks, "--data-root", str(root),
                 "--backbone", "demo-vit-random", "--epochs", "1", "--num-seeds", "1", "--lr", "0.1", "--wd", "0",
                 "--quiet", "--runs-dir", str(runs)])


def test_vtab_run_on_noah_layout(tmp_path, capsys):
    root = write_vtab_tree(tmp_path / "data", ("dtd", "eurosat"))
    assert run(root, tmp_path / "runs", "vtab", "dtd,eurosat") == 0
    err = capsys.readouterr().err
    assert "data verified: 2 task(s)" in err
    recs = {r["spec"]["task"]: r for r in records(tmp_path / "runs")}
    assert set(recs) == {"dtd", "eurosat"}
    for name, r in recs.items():
        assert r["status"] == "ok"
        assert r["spec"]["data_fingerprint"] == fingerprint(get_task(name), root)
        assert (r["spec"]["train_split"], r["spec"]["eval_split"]) == ("train800val200", "test")
        assert r["num_train"] == 32 and r["num_eval"] == max(get_task(name).num_classes, 12)  # fixture sizes
    assert list((tmp_path / "cache" / "decoded").glob("dtd-test-*.u8"))


def test_fgvc_run_on_vpt_json_layout(tmp_path):
    root = tmp_path / "data"
    write_fgvc_task(root, "oxford_flowers")
    assert run(root, tmp_path / "runs", "fgvc", "OxfordFlowers") == 0
    (r,) = records(tmp_path / "runs")
    assert r["status"] == "ok" and r["spec"]["task"] == "oxford_flowers"
    assert (r["spec"]["train_split"], r["spec"]["eval_split"]) == ("train", "test")
    assert r["timing"]["cached_features"] is False  # augmented: the backbone runs every step
    assert r["num_train"] == 102 and r["num_eval"] == 102 and r["image_size"] == 32
    decoded = sorted(p.name for p in (tmp_path / "cache" / "decoded").glob("*.u8"))
    assert any("-train-" in n and "-s36c36-" in n for n in decoded)  # stored for random 32-crops
    assert any("-test-" in n and "-s36c32-" in n for n in decoded)  # Resize(36) → CenterCrop(32)


def test_fixture_with_real_train_sizes_passes_the_official_counts(tmp_path):
    root = tmp_path / "data"
    write_vtab_task(root, "eurosat", real_sizes=True)
    rep = verify_task(get_task("eurosat"), root, progress=False)
    assert rep.ok, rep.defects
    assert {k: v["entries"] for k, v in rep.splits.items()} == \
        {"train800": 800, "val200": 200, "train800val200": 1000, "test": 20}
    assert any("test 20 (official: 5400)" in n for n in rep.notes)
