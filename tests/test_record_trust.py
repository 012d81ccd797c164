"""A record is trusted by its contents, never by its file name (docs/reliability.md §8): an edited, renamed
or moved record is quarantined, never reused as done and never ranked; every record peftbench writes, of
every stage, job, search and schema, passes the same checks."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from helpers import TINY_BACKBONE, ensure_registered, make_data_root, tiny_backbone_2x32

from peftbench.cli import main
from peftbench.methods import LINEAR_RECIPE, METHODS, Method, TunedViT, register_method
from peftbench.results.board import load_runs
from peftbench.store import RunSpec, RunStore
from peftbench.store.store import DIGEST, record_problem

ensure_registered()

if "record-trust-v2" not in METHODS:
    @register_method
    class _Versioned(Method):
        """A method whose version was bumped once: its keys hash ``method_version`` 2."""

        name = "record-trust-v2"
        description = "a linear probe at method version 2 (tests)"
        recipe = LINEAR_RECIPE
        frozen_features = True
        version = 2

        def build(self, backbone, num_classes, opts):
            return TunedViT(backbone, num_classes)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("recorddata"))


def run(capsys, root, runs, *extra, methods="linear", seeds="1,2"):
    code = main(["run", "--methods", methods, "--suite", "testsuite", "--tasks", "toy", "--data-root", str(root),
                 "--runs-dir", str(runs), "--backbone", TINY_BACKBONE, "--protocol", "fixed", "--seeds", seeds,
                 "--epochs", "2", "--batch-size", "16", "--quiet", *extra])
    return code, capsys.readouterr().err


def record_files(runs) -> list[Path]:
    return sorted(p for p in Path(runs).glob("*/*/*.json") if "." not in p.stem)


@pytest.fixture(scope="module")
def finished(root, tmp_path_factory):
    """A runs dir with two finished linear runs (seeds 1 and 2) on toy: tests edit a copy of seed 1's record."""
    runs = tmp_path_factory.mktemp("finished") / "runs"
    assert main(["run", "--methods", "linear", "--suite", "testsuite", "--tasks", "toy", "--data-root", str(root),
                 "--runs-dir", str(runs), "--backbone", TINY_BACKBONE, "--protocol", "fixed", "--seeds", "1,2",
                 "--epochs", "2", "--batch-size", "16", "--quiet"]) == 0
    return runs


def _copy(finished, tmp_path) -> tuple[Path, Path, dict]:
    runs = tmp_path / "runs"
    shutil.copytree(finished, runs)
    (path,) = [p for p in record_files(runs) if json.loads(p.read_text())["spec"]["seed"] == 1]
    return runs, path, json.loads(path.read_text())


def _set_seed(rec):
    rec["spec"]["seed"] = 7


def _set_lr(rec):
    rec["spec"]["hparams"]["lr"] = 0.5


def _set_top1(rec):
    rec["metrics"]["top1"] = 99.9


def _set_key(rec):
    rec["key"] = "0123456789abcdef"


def _forge(rec):  # a consistent forgery: seed changed and the key recomputed to match; only the digest tells
    rec["spec"]["seed"] = 7
    rec["key"] = RunSpec.from_dict(rec["spec"]).key


def _drop_digest(rec):
    del rec[DIGEST]


EDITS = {"seed 7": (_set_seed, "key field"), "lr 0.5": (_set_lr, "key field"), "top1 99.9": (_set_top1, "digest"),
         "key changed": (_set_key, "key field"), "key recomputed": (_forge, "file name"),
         "digest removed": (_drop_digest, "no digest")}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_record_is_quarantined_and_its_run_trained_again(capsys, root, finished, tmp_path, edit):
    runs, path, rec = _copy(finished, tmp_path)
    change, reason = EDITS[edit]
    change(rec)
    path.write_text(json.dumps(rec, indent=1, sort_keys=True))
    edited = path.read_bytes()
    code, err = run(capsys, root, runs)
    assert code == 0
    moved = path.with_name(path.stem + ".quarantined.json")
    assert moved.read_bytes() == edited  # set aside, never lost, never read as a record again
    assert f"peftbench: warning: {path}: " in err and reason in err and "moved aside to" in err
    assert len([line for line in err.splitlines() if str(path) in line]) == 1  # one line
    assert len(record_files(runs)) == 2
    new = json.loads(path.read_text())  # trained again: the run's own record, not the edited one
    assert new["status"] == "ok" and new["spec"]["seed"] == 1 and new["attempts"] == 1
    assert new["spec"]["hparams"]["lr"] != 0.5 and new["metrics"]["top1"] != 99.9
    assert record_problem(path, new) is None
    assert run(capsys, root, runs)[1].count("moved aside") == 0  # the quarantined file is never read again


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_record_is_not_ranked_and_the_leaderboard_lists_it_as_skipped(capsys, finished, tmp_path, edit):
    runs, path, rec = _copy(finished, tmp_path)
    EDITS[edit][0](rec)
    path.write_text(json.dumps(rec))
    out = tmp_path / "lb"
    assert main(["leaderboard", "--runs-dir", str(runs), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"skipping {path}: " in err and EDITS[edit][1] in err and "moved aside" in err
    (row,) = [r for r in csv.DictReader(open(out / "testsuite-leaderboard.csv")) if r["config"] == "linear"]
    assert row["seeds_min"] == "1"  # only the genuine seed-2 record counts
    seeds = [r["seed"] for r in csv.DictReader(open(out / "testsuite-runs.csv"))]
    assert seeds == ["2"]
    assert "99.9" not in (out / "testsuite-leaderboard.csv").read_text()
    report = (out / "testsuite-report.html").read_text()
    assert 'id="skipped-table"' in report and path.relative_to(runs).as_posix() in report
    assert path.with_name(path.stem + ".quarantined.json").is_file()


def test_a_forged_record_under_its_own_key_is_caught_by_its_digest(finished, tmp_path):
    """Seed changed, key recomputed, file renamed to it: every name agrees, the digest does not."""
    runs, path, rec = _copy(finished, tmp_path)
    _forge(rec)
    forged = path.with_name(f"{rec['key']}.json")
    forged.write_text(json.dumps(rec))
    found, skipped = load_runs(runs, warn=lambda m: None)
    assert sorted(r.spec["seed"] for r in found) == [1, 2]  # the genuine records only
    assert [s.path for s in skipped] == [forged.relative_to(runs).as_posix()] and "digest" in skipped[0].reason


def test_the_leaderboard_report_lists_the_quarantined_record_with_its_reason(finished, tmp_path):
    runs, path, rec = _copy(finished, tmp_path)
    rec["metrics"]["top1"] = 99.9
    path.write_text(json.dumps(rec))
    found, skipped = load_runs(runs, warn=lambda m: None)
    assert [r.spec["seed"] for r in found] == [2] and [s.path for s in skipped] == [path.relative_to(runs).as_posix()]
    assert "digest" in skipped[0].reason and "moved aside" in skipped[0].reason


@pytest.mark.parametrize("where", ["method", "task"])
def test_a_correct_record_copied_into_another_folder_is_quarantined_there(capsys, root, finished, tmp_path, where):
    runs, path, rec = _copy(finished, tmp_path)
    other = runs / "vpt-deep" / "toy" if where == "method" else runs / "linear" / "toy_b"
    other.mkdir(parents=True)
    copy = other / path.name
    shutil.copy(path, copy)
    store = RunStore(runs, warn=lambda m: None)
    spec = RunSpec.from_dict(rec["spec"])
    assert store.load(spec) is not None  # the original stays valid where it belongs
    found, skipped = load_runs(runs, warn=lambda m: None)
    assert path.relative_to(runs).as_posix() in [r.path for r in found] and len(found) == 2
    assert [s.path for s in skipped] == [copy.relative_to(runs).as_posix()] and "folder" in skipped[0].reason
    assert not copy.exists() and copy.with_name(copy.stem + ".quarantined.json").is_file()
    # a copy under another name in the right folder: the file name disagrees with the key
    renamed = path.with_name("fedcba9876543210.json")
    shutil.copy(path, renamed)
    _, skipped = load_runs(runs, warn=lambda m: None)
    assert [s.path for s in skipped] == [renamed.relative_to(runs).as_posix()] and "file name" in skipped[0].reason


def test_status_and_export_never_see_a_quarantined_record(capsys, finished, tmp_path):
    runs, path, rec = _copy(finished, tmp_path)
    rec["spec"]["seed"] = 7
    path.write_text(json.dumps(rec))
    assert main(["status", "--runs-dir", str(runs), "--no-query"]) == 0
    out = capsys.readouterr()
    assert "key field" in out.out + out.err and "seed=7" not in out.out
    assert main(["export", "--run", rec["key"], "--runs-dir", str(runs)]) == 2
    assert "no run with key" in capsys.readouterr().err


def test_records_of_earlier_schemas_verify_and_are_reused(capsys, root, finished, tmp_path):
    """Schema 1 (no schema field) and 2 (no digest): accepted as they are, reused, ranked."""
    for schema in (1, 2):
        runs, path, rec = _copy(finished, tmp_path / f"s{schema}")
        del rec[DIGEST]
        if schema == 1:
            del rec["schema"]
        else:
            rec["schema"] = 2
        path.write_text(json.dumps(rec))
        before = path.read_bytes()
        assert record_problem(path, rec) is None
        code, err = run(capsys, root, runs)
        assert code == 0 and "warning" not in err
        assert path.read_bytes() == before  # reused as done: not trained, not rewritten
        found, skipped = load_runs(runs, warn=lambda m: None)
        assert len(found) == 2 and skipped == []


@pytest.mark.slow
def test_every_record_of_a_normal_sweep_verifies(capsys, demo_root, tmp_path):
    """Every stage and job kind (search, final, halving rungs with stop_epoch and resume_from, e2vpt-prune's
    importance and rewind jobs), fused runs, a method at version 2: each record's key, file name, folder and
    digest agree; nothing is quarantined, the leaderboard skips nothing, a second run trains nothing."""
    runs = tmp_path / "runs"
    argv = ["run", "--methods", "linear,vpt-deep,record-trust-v2,e2vpt-prune", "--suite", "demo", "--tasks",
            "demo_digits", "--data-root", str(demo_root), "--runs-dir", str(runs), "--backbone", tiny_backbone_2x32(),
            "--seeds", "1,2", "--epochs", "3", "--batch-size", "250", "--protocol", "vpt", "--lr", "0.5,2.0",
            "--wd", "0.0", "--search", "halving", "--halving-rungs", "0.34,0.67,1", "--halving-factor", "1.5",
            "--fuse", "2", "--set", "e2vpt-prune.prompt_tokens=4", "--set", "e2vpt-prune.kv_tokens=2",
            "--set", "e2vpt-prune.prune_segments=4", "--set", "vpt-deep.prompt_tokens=2", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    files = record_files(runs)
    recs = {p: json.loads(p.read_text()) for p in files}
    assert all(record_problem(p, r) is None for p, r in recs.items())
    assert all(r.get(DIGEST) and r["schema"] == 3 for r in recs.values())
    kinds = {(r["spec"]["method"], r["spec"]["stage"], r["spec"]["job"]) for r in recs.values()}
    assert any(r["spec"]["hparams"].get("stop_epoch") for r in recs.values())  # halving rungs
    assert any(r["spec"].get("resume_from") for r in recs.values())
    assert any(r.get("fused") for r in recs.values())
    assert any(r["spec"]["method_version"] == 2 for r in recs.values())
    assert {j for _, _, j in kinds} > {"train"}  # jobs other than training
    found, skipped = load_runs(runs, warn=lambda m: None)
    assert skipped == [] and len(found) == len(files)
    before = {p: p.read_bytes() for p in files}
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "moved aside" not in err and not list(runs.rglob("*.quarantined*.json"))
    assert {p: p.read_bytes() for p in record_files(runs)} == before  # every run reused as done
