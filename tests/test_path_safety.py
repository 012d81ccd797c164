"""Nothing is ever written outside the folder it is meant for (docs/reliability.md §7): names that come
from run records (suite, method, task, key) or from the user (--sweep-name, --variant) become file names
only through peftbench._io.safe_component."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TINY_BACKBONE, ensure_registered, make_data_root

from peftbench._io import safe_component, unsafe_component
from peftbench.cli import main
from peftbench.errors import SettingsError
from peftbench.store import RunSpec, RunStore

ensure_registered()

HOSTILE = ["../../../x", "/tmp/peftbench-abs-target", "..", ".", "", "a/b", "a\\b", ".hidden", "a\x00b", "\x1b[31mred",
           "x" * 300]


@pytest.mark.parametrize("name", HOSTILE)
def test_unsafe_names_are_refused_with_a_one_line_error(name):
    assert unsafe_component(name)
    with pytest.raises(SettingsError, match="^--sweep-name .*not usable as a file name") as exc:
        safe_component(name, "--sweep-name")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name", ["vpt-deep", "demo_digits", "adapter(r=8)", "lora r=4", "café", "e2vpt-prune", "v1.2"])
def test_ordinary_names_are_safe(name):
    assert unsafe_component(name) is None and safe_component(name, "x") == name


def _record(runs: Path, *, suite: str, seed: int, top1: float = 50.0) -> Path:
    """A consistent record (key recomputed, in its folder; schema 2, before digests) of suite ``suite``."""
    spec = RunSpec(method="linear", task="toy", suite=suite, protocol="fixed", stage="final",
                   train_split="train800val200", eval_split="test",
                   hparams={"lr": 0.1, "wd": 0.0, "epochs": 2, "batch_size": 8}, seed=seed, config="linear")
    rec = {"key": spec.key, "spec": spec.to_dict(), "status": "ok", "schema": 2, "metrics": {"top1": top1},
           "params": {"trainable": 10, "tuned_total_pct": 1.0}, "timing": {}, "ended_at": "2025-01-01T00:00:00"}
    path = runs / "linear" / "toy" / f"{spec.key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.mark.parametrize("suite", ["../../../x", "/tmp/peftbench-abs-target/x", "../../..", "a\x1b[31m"])
def test_a_record_whose_suite_is_a_path_writes_nothing_outside_out(capsys, tmp_path, suite):
    runs = tmp_path / "runs"
    good = _record(runs, suite="testsuite", seed=1)
    bad = _record(runs, suite=suite, seed=2)
    out = tmp_path / "w1" / "w2" / "w3" / "out"
    cmp = tmp_path / "w1" / "w2" / "w3" / "cmp"
    before = _tree(tmp_path)
    assert main(["leaderboard", "--runs-dir", str(runs), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "spec.suite" in err and "not usable as a file name" in err
    assert main(["compare", str(runs), str(runs), "--out", str(cmp)]) == 0
    capsys.readouterr()
    new = _tree(tmp_path) - before
    outside = sorted(p for p in new if not p.startswith(("w1/w2/w3/out", "w1/w2/w3/cmp")) and p not in
                     ("w1", "w1/w2", "w1/w2/w3"))
    assert outside == [bad.relative_to(tmp_path).with_suffix(".quarantined.json").as_posix()]
    assert good.is_file() and not bad.exists()
    assert not Path("/tmp/peftbench-abs-target").exists()
    assert {p.name for p in out.iterdir()} >= {"testsuite-leaderboard.csv", "testsuite-report.html"}


def test_the_writers_refuse_a_name_that_is_a_path(tmp_path):
    from peftbench.results.board import build_board, suite_grid
    from peftbench.results.write import write_suite
    from peftbench.trackers import RunInfo
    from peftbench.trackers.tensorboard import run_dir

    board = build_board([], "../../x", grid=suite_grid("../../x"))
    with pytest.raises(SettingsError, match="^suite '../../x'"):
        write_suite(board, tmp_path / "out")
    spec = RunSpec(method="../../m", task="toy", suite="s", protocol="p", stage="final", train_split="a",
                   eval_split="b", hparams={}, seed=1)
    store = RunStore(tmp_path / "runs")
    for where in (store.record_path, store.checkpoint_path, store.lease_path, lambda s: store.artifact_path(s, "w")):
        with pytest.raises(SettingsError, match="^method '../../m'"):
            where(spec)
    ok = RunSpec(**{**spec.to_dict(), "method": "linear"})
    with pytest.raises(SettingsError, match="artifact"):
        store.artifact_path(ok, "x/../../../y")
    with pytest.raises(SettingsError, match="run key"):
        store.rung_state_path(ok, "../../k")
    info = RunInfo(key="k", name="n", group="../../../../x", config={}, tags={"method": "m", "task": "t",
                                                                             "stage": "final", "seed": "1"})
    with pytest.raises(SettingsError, match="^--sweep-name"):
        run_dir(tmp_path / "tb", info)
    with pytest.raises(SettingsError, match="^--sweep-name"):
        run_dir(tmp_path / "tb", RunInfo(**{**info.__dict__, "group": "/abs"}))
    assert not list(tmp_path.rglob("*"))  # nothing written


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("pathdata"))


@pytest.mark.parametrize("name", ["../../../../x", "/tmp/peftbench-abs-target", "a/b", ".."])
@pytest.mark.parametrize("tracker", [[], ["--tracker", "tensorboard"]])
def test_a_sweep_name_that_is_a_path_is_refused_before_compute(capsys, root, tmp_path, name, tracker):
    runs = tmp_path / "a" / "b" / "runs"
    code = main(["run", "--methods", "linear", "--suite", "testsuite", "--tasks", "toy", "--data-root", str(root),
                 "--runs-dir", str(runs), "--backbone", TINY_BACKBONE, "--protocol", "fixed", "--seeds", "1",
                 "--epochs", "1", "--quiet", "--sweep-name", name, *tracker])
    err = capsys.readouterr().err
    assert code == 2
    (line,) = [x for x in err.splitlines() if "error" in x]
    assert line.startswith("peftbench run: error: --sweep-name") and "not usable as a file name" in line
    assert not list(runs.rglob("*.json")) and not list(tmp_path.rglob("tensorboard"))
    assert not Path("/tmp/peftbench-abs-target").exists()


def test_a_sweep_file_whose_name_is_a_path_is_refused(capsys, root, tmp_path):
    sweep = tmp_path / "s.toml"
    sweep.write_text('name = "../../../x"\nmethods = ["linear"]\nsuite = "testsuite"\ntasks = ["toy"]\n')
    code = main(["run", "--config", str(sweep), "--data-root", str(root), "--runs-dir", str(tmp_path / "runs"),
                 "--backbone", TINY_BACKBONE, "--protocol", "fixed", "--seeds", "1", "--epochs", "1", "--quiet"])
    assert code == 2 and "--sweep-name (or the sweep file's name) '../../../x'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.json"))


def test_an_export_variant_that_is_a_path_is_refused(capsys, tmp_path):
    code = main(["export", "--runs-dir", str(tmp_path / "runs"), "--run", "0123", "--variant", "../../x"])
    assert code == 2 and "--variant '../../x'" in capsys.readouterr().err
