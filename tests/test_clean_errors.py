"""Bad input, full disks and read-only folders get one line naming the file, the flag or the number, never a raw
traceback; what has nothing to show exits 0 (issue 25, items 8, 10 and 11). Each test feeds the bad input and
checks the outcome: the exit code, the one line, what was (not) written."""
from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import pytest
from helpers import TINY_BACKBONE, ensure_registered, make_data_root

from peftbench.cli import main
from peftbench.errors import PeftbenchError, SettingsError, StoreError

ensure_registered()

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("cleandata"))


@pytest.fixture(scope="module")
def store(root, tmp_path_factory):
    """A run store holding one finished linear-probe run (with its final weights, for export)."""
    runs = tmp_path_factory.mktemp("cleanstore") / "runs"
    assert main(ARGV(root, runs)) == 0
    return runs


def ARGV(root, runs, *extra, methods="linear", tasks="toy", seeds="1", protocol="fixed"):
    argv = ["run", "--methods", methods, "--suite", "testsuite", "--tasks", tasks, "--data-root", str(root),
            "--runs-dir", str(runs), "--backbone", TINY_BACKBONE, "--protocol", protocol, "--epochs", "1",
            "--batch-size", "16", "--quiet", *extra]
    return argv + ([] if "--num-seeds" in extra else ["--seeds", seeds])


def one_line_error(err: str, *needles: str) -> str:
    """The error line of ``err`` (stderr), checked to be one line holding every needle, without a traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def records(runs) -> list[Path]:
    return [p for p in Path(runs).glob("*/*/*.json") if "." not in p.stem]


# ---------------------------------------------------------------------------------------------
# item 8: the run count and the workers are bounded
# ---------------------------------------------------------------------------------------------


def test_a_sweep_over_its_run_limit_is_refused_before_anything_is_built(capsys, root, tmp_path, monkeypatch):
    from peftbench.sweep import plan

    def never(*a, **k):
        raise AssertionError("planning went past the run-count check")

    monkeypatch.setattr(plan, "create_backbone", never)
    monkeypatch.setattr(plan, "require_verified", never)
    monkeypatch.setattr(plan, "read_split", never)
    runs = tmp_path / "runs"
    assert main(ARGV(root, runs, "--max-runs", "3", tasks="toy,toy_b", seeds="1,2")) == 2
    one_line_error(capsys.readouterr().err, "at least 4 runs", "1 method(s) × 2 task(s) × at least 2 run(s) each",
                   "limit of 3", "--max-runs")
    # the default limit (100,000): a 1000 × 1000 lr × wd grid is 1,000,001 runs, refused at once
    grid = ",".join(str(0.001 * (i + 1)) for i in range(1000))
    assert main(ARGV(root, runs, "--lr", grid, "--wd", grid, protocol="vpt")) == 2
    one_line_error(capsys.readouterr().err, "at least 1,000,001 runs", "limit of 100,000")
    assert not runs.exists() or not records(runs)


def test_the_run_limit_counts_every_planned_run_and_comes_from_the_one_declaration(capsys, root, tmp_path):
    from peftbench import Sweep
    from peftbench.api import load_sweep, plan_sweep

    # the vpt protocol searches the recipe's grid (not given: not in the first bound), counted when planned
    assert main(ARGV(root, tmp_path / "runs", "--max-runs", "5", "--dry-run", protocol="vpt")) == 2
    line = one_line_error(capsys.readouterr().err, "the sweep plans at least", "limit of 5")
    assert int(line.split("at least ")[1].split(" runs")[0].replace(",", "")) > 5
    assert main(ARGV(root, tmp_path / "runs", "--max-runs", "0")) == 2
    one_line_error(capsys.readouterr().err, "--max-runs: 0 is below its minimum 1")
    f = tmp_path / "sweep.toml"
    f.write_text(f"methods = ['linear']\nsuite = 'testsuite'\ntasks = ['toy', 'toy_b']\nmax_runs = 1\n"
                 f"data_root = '{root}'\nbackbone = '{TINY_BACKBONE}'\nprotocol = 'fixed'\nseeds = [1]\n")
    assert load_sweep(f).max_runs == 1
    assert main(["run", "--config", str(f), "--runs-dir", str(tmp_path / "runs"), "--dry-run"]) == 2
    one_line_error(capsys.readouterr().err, "at least 2 runs", "limit of 1")
    with pytest.raises(SettingsError, match=r"Sweep\(max_runs=...\): 'many' is not an integer"):
        Sweep(methods=["linear"], max_runs="many")
    with pytest.raises(SettingsError, match="at least 2 runs"):
        plan_sweep(Sweep(methods=["linear"], suite="testsuite", tasks=["toy", "toy_b"], data_root=str(root),
                         backbone=TINY_BACKBONE, protocol="fixed", seeds=[1], max_runs=1), check_data=False)
    assert main(["run", "--config", str(f), "--runs-dir", str(tmp_path / "runs"), "--dry-run", "--max-runs", "2"]) == 0


def test_local_workers_are_bounded_by_the_cores_and_warned_about_beyond_the_devices(capsys, root, tmp_path,
                                                                                    monkeypatch):
    from peftbench.executors import EXECUTORS, _base

    monkeypatch.setattr(_base, "cores", lambda: 2)
    runs = tmp_path / "runs"
    assert main(ARGV(root, runs, "--workers", "9", "--dry-run")) == 2
    one_line_error(capsys.readouterr().err, "--workers 9", "4 training processes per CPU core", "2 core(s)",
                   "at most 8")
    assert main(ARGV(root, runs, "--workers", "3", "--dry-run")) == 0
    err = capsys.readouterr().err
    assert "warning: --workers 3: 3 CPU workers on 2 CPU core(s) share the cores" in err
    assert main(ARGV(root, runs, "--workers", "2", "--dry-run")) == 0
    assert "warning" not in capsys.readouterr().err
    # GPUs (no GPU needed to check the arithmetic): more workers than devices share a device's memory
    assert _base.check_local_workers(2, ["cuda:0", "cuda:1"]) == []
    (line,) = _base.check_local_workers(5, ["cuda:0", "cuda:1"])
    assert "3 workers share cuda:0" in line and "2 workers share cuda:1" in line
    with pytest.raises(SettingsError, match="--workers 9: more than 4"):
        _base.check_local_workers(9, ["cuda:0"])
    # executors whose workers run elsewhere (SLURM array tasks, Ray tasks) are not bounded by this machine
    assert EXECUTORS.get("slurm").check_workers({"workers": 1000}, "cpu") == []
    assert EXECUTORS.get("local").check_workers({"workers": 4}, "cpu") == ["--workers 4: 4 CPU workers on 2 CPU "
                                                                         "core(s) share the cores (one torch thread "
                                                                         "each), so the sweep is no faster than with 2"]


# ---------------------------------------------------------------------------------------------
# item 10: full disks, read-only folders, safetensors' errors, corrupt journals, deep nesting
# ---------------------------------------------------------------------------------------------


def test_a_full_disk_while_writing_the_resolved_sweep_is_one_line_before_any_run(capsys, root, tmp_path, monkeypatch):
    from peftbench import _io

    def full(path, text, fsync=True):
        raise ENOSPC

    monkeypatch.setattr(_io, "atomic_write_text", full)
    runs = tmp_path / "runs"
    assert main(ARGV(root, runs)) == 2
    one_line_error(capsys.readouterr().err, "cannot write the resolved sweep file", str(runs / "sweeps"),
                   "No space left on device")
    assert not records(runs)


def test_a_full_disk_while_writing_the_final_leaderboard_keeps_the_runs_and_names_the_file(capsys, root, tmp_path,
                                                                                          monkeypatch):
    from peftbench.results import write

    def full(path, data, fsync=True):
        raise ENOSPC

    monkeypatch.setattr(write, "atomic_write_bytes", full)
    runs = tmp_path / "runs"
    assert main(ARGV(root, runs)) == 2
    captured = capsys.readouterr()
    line = one_line_error(captured.err, "cannot write", str(runs / "leaderboard"), "No space left on device",
                          "the run records are kept")
    assert line.startswith("peftbench: error: ")
    assert "leaderboard: not written" in captured.out and "top1" in captured.out  # the summary is still shown
    (rec,) = records(runs)
    assert json.loads(rec.read_text())["status"] == "ok"
    assert main(["leaderboard", "--runs-dir", str(runs), "--no-plots"]) == 2
    one_line_error(capsys.readouterr().err, "peftbench leaderboard: error: cannot write", "No space left on device")


def test_safetensors_own_error_while_saving_a_checkpoint_is_a_store_error_naming_the_file(capsys, root, tmp_path,
                                                                                         monkeypatch):
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    from peftbench.store import checkpoints

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    path = tmp_path / "k.ckpt.safetensors"
    with pytest.raises(StoreError, match=f"cannot write the checkpoint {path}: .*No space left on device"):
        checkpoints.save(path, state={"w": torch.zeros(2)}, optimizer={"state": {}, "param_groups": []}, rng={},
                         info={"epoch": 0})
    assert not list(tmp_path.iterdir())  # no temporary file left behind
    # inside a sweep: the run is recorded failed with that line, the sweep reports it, exit 1
    runs = tmp_path / "runs"
    assert main(ARGV(root, runs, methods="vpt-deep")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "1 run(s) failed" in err
    (rec,) = [json.loads(p.read_text()) for p in records(runs)]
    last = rec["error"].strip().splitlines()[-1]  # a one-epoch run's first tensors are its final weights
    assert rec["status"] == "failed" and last.startswith("peftbench.errors.StoreError: cannot write the trained tensors")
    assert "No space left on device" in last and f"{rec['key']}.final.safetensors" in last


def _deny_under(monkeypatch, folder: Path):
    """Every atomic write under ``folder`` fails as on a read-only folder (also when the tests run as root)."""
    from peftbench import _io
    from peftbench.store import checkpoints

    real = _io.atomic_write

    def guarded(path, write, *, fsync=True):
        if Path(path).resolve().is_relative_to(folder.resolve()):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, write, fsync=fsync)

    monkeypatch.setattr(_io, "atomic_write", guarded)
    monkeypatch.setattr(checkpoints, "atomic_write", guarded)


def test_leaderboard_compare_and_export_into_a_read_only_folder_name_the_file(capsys, store, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    _deny_under(monkeypatch, ro)
    assert main(["leaderboard", "--runs-dir", str(store), "--out", str(ro), "--no-plots"]) == 2
    one_line_error(capsys.readouterr().err, "peftbench leaderboard: error: cannot write", str(ro), "Permission denied")
    assert main(["compare", str(store), str(store), "--out", str(ro)]) == 2
    one_line_error(capsys.readouterr().err, "peftbench compare: error: cannot write", str(ro / "testsuite-compare.csv"),
                   "Permission denied")
    (rec,) = records(store)
    key = rec.stem
    assert main(["export", "--runs-dir", str(store), "--run", key, "--out", str(ro / "m.safetensors")]) == 2
    one_line_error(capsys.readouterr().err, "peftbench export: error: cannot write the exported weights",
                   str(ro / "m.safetensors"), "Permission denied")
    assert not list(ro.iterdir())


def test_a_really_read_only_output_folder(capsys, store, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root): the monkeypatched test covers it")
        for argv in (["leaderboard", "--runs-dir", str(store), "--out", str(ro / "lb"), "--no-plots"],
                     ["compare", str(store), str(store), "--out", str(ro / "cmp")]):
            assert main(argv) == 2
            one_line_error(capsys.readouterr().err, "cannot", str(ro), "Permission denied")
    finally:
        ro.chmod(0o700)


def test_safetensors_own_error_while_exporting_names_the_file(capsys, store, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def broken(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    (rec,) = records(store)
    out = tmp_path / "m.safetensors"
    assert main(["export", "--runs-dir", str(store), "--run", rec.stem, "--out", str(out)]) == 2
    one_line_error(capsys.readouterr().err, "cannot write the exported weights", str(out), "No space left on device")
    assert not out.exists()


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", json.dumps({"pid": "abc", "heartbeat": 1}).encode(),
                                     json.dumps({"pid": 1, "heartbeat": 1e18, "host": "h", "runs": [1, 2]}).encode(),
                                     json.dumps({"pid": 1, "heartbeat": 1e18, "host": "h", "argv": [1]}).encode(),
                                     json.dumps([1, 2]).encode(), b"[" * 100_000 + b"]" * 100_000],
                         ids=["garbage", "not-utf8", "pid-abc", "runs-a-list", "argv-ints", "a-list", "deep"])
def test_a_corrupt_sweep_journal_is_set_aside_and_status_goes_on(capsys, store, tmp_path, content):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(store, runs)
    journals = runs / ".peftbench" / "sweeps"
    journals.mkdir(parents=True, exist_ok=True)
    bad = journals / "otherhost-123.json"
    bad.write_bytes(content)
    assert main(["status", "--runs-dir", str(runs), "--no-query"]) == 0
    out = capsys.readouterr().out
    assert "Traceback" not in out and "done" in out
    assert f"warning: {bad}: not a sweep journal" in out and "set aside as otherhost-123.json.corrupt-" in out
    assert not bad.exists() and len(list(journals.glob("otherhost-123.json.corrupt-*"))) == 1
    assert main(["status", "--runs-dir", str(runs), "--no-query"]) == 0  # once set aside, it is not read again
    assert "warning" not in capsys.readouterr().out


def test_a_driver_sets_a_corrupt_journal_aside_too(capsys, tmp_path):
    from peftbench.store.journal import FOLDER, Journal

    runs = tmp_path / "runs"
    (runs / FOLDER).mkdir(parents=True)
    bad = runs / FOLDER / "otherhost-7.json"
    bad.write_text('{"pid": "abc"}')
    Journal(runs, argv=["peftbench", "run"]).close()
    err = capsys.readouterr().err
    assert f"peftbench: warning: {bad}: not a sweep journal (pid 'abc' is not a process id); set aside" in err
    assert not bad.exists()


@pytest.mark.parametrize("n", [-5, 0, 10**9])
def test_params_refuses_a_number_of_classes_that_is_no_head(capsys, n):
    assert main(["params", "--method", "linear", "--num-classes", str(n), "--backbone", TINY_BACKBONE]) == 2
    one_line_error(capsys.readouterr().err, f"peftbench params: error: --num-classes {n}", "from 1 to 1,000,000")
    assert main(["params", "--method", "linear", "--num-classes", "3", "--backbone", TINY_BACKBONE]) == 0
    capsys.readouterr()


DEEP = 100_000


@pytest.mark.parametrize("text", ["methods = " + "[" * DEEP + "]" * DEEP + "\n",
                                  "methods = ['linear']\n[options]\nx = " + "{a = " * DEEP + "1" + "}" * DEEP + "\n"],
                         ids=["array", "inline-table"])
def test_a_sweep_file_nested_100000_deep_is_one_line_naming_it(capsys, tmp_path, text):
    f = tmp_path / "deep.toml"
    f.write_text(text)
    assert main(["run", "--config", str(f), "--dry-run"]) == 2
    one_line_error(capsys.readouterr().err, f"peftbench run: error: {f}: nested too deeply")


def test_an_executor_profile_or_a_value_nested_100000_deep_is_one_line(capsys, root, tmp_path):
    from peftbench._io import toml_value

    f = tmp_path / "profile.toml"
    f.write_text("workers = " + "[" * DEEP + "]" * DEEP + "\n")
    assert main(ARGV(root, tmp_path / "runs", "--executor-profile", str(f), "--dry-run")) == 2
    one_line_error(capsys.readouterr().err, f"--executor-profile {f}: nested too deeply")
    assert toml_value("[" * DEEP + "]" * DEEP) == "[" * DEEP + "]" * DEEP  # not a TOML literal: the string


def test_a_record_nested_100000_deep_is_reported_not_raised(capsys, store, tmp_path):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(store, runs)
    (rec,) = records(runs)
    deep = rec.with_name("0" * 16 + ".json")
    deep.write_bytes(b"[" * DEEP + b"]" * DEEP)
    assert main(["status", "--runs-dir", str(runs), "--no-query"]) == 0
    out = capsys.readouterr().out
    assert "Traceback" not in out and "nested too deeply" in out
    assert main(["leaderboard", "--runs-dir", str(runs), "--no-plots"]) == 0
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# item 11: nothing to show exits 0; settings that would be ignored are refused
# ---------------------------------------------------------------------------------------------


def test_status_of_a_missing_folder_or_a_file_says_no_runs_yet(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    assert main(["status", "--runs-dir", str(missing), "--no-query"]) == 0
    assert "no runs yet" in capsys.readouterr().out and not missing.exists()
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["status", "--runs-dir", str(f), "--no-query"]) == 0
    assert "no runs yet" in capsys.readouterr().out and f.read_text() == "x"
    assert main(["status", "--runs-dir", str(missing), "--no-query", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == []


def test_compare_with_an_empty_or_unrelated_store_is_an_empty_comparison(capsys, root, store, tmp_path):
    empty, other = tmp_path / "empty", tmp_path / "empty2"
    empty.mkdir()
    other.mkdir()
    assert main(["compare", str(empty), str(other), "--out", str(tmp_path / "c0")]) == 0
    captured = capsys.readouterr()
    assert "nothing to compare" in captured.out and "Traceback" not in captured.err
    assert not (tmp_path / "c0").exists()
    assert main(["compare", str(empty), str(store), "--out", str(tmp_path / "c1")]) == 0
    out = capsys.readouterr().out
    assert "only in B: linear" in out and (tmp_path / "c1" / "testsuite-compare.csv").is_file()
    assert main(["compare", str(store), str(empty), "--out", str(tmp_path / "c2")]) == 0
    assert "only in A: linear" in capsys.readouterr().out
    assert main(["compare", str(store), str(root), "--out", str(tmp_path / "c3")]) == 0  # a folder of images
    assert "only in A: linear" in capsys.readouterr().out


def test_leaderboard_compared_with_an_empty_folder_exits_0(capsys, store, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "lb"
    assert main(["leaderboard", "--runs-dir", str(store), "--compare", str(empty), "--out", str(out), "--no-plots"]) == 0
    assert (out / "testsuite-compare.csv").is_file() and (out / "testsuite-leaderboard.csv").is_file()


def test_tracker_settings_without_their_tracker_are_refused(capsys, root, tmp_path):
    from peftbench import Sweep
    from peftbench.api import plan_sweep

    runs = tmp_path / "runs"
    assert main(ARGV(root, runs, "--tracker-set", "wandb.project=x", "--dry-run")) == 2
    one_line_error(capsys.readouterr().err, "settings of tracker 'wandb' given", "--tracker wandb")
    f = tmp_path / "sweep.toml"
    f.write_text("methods = ['linear']\n[tracking.wandb]\nproject = 'x'\n")
    assert main(["run", "--config", str(f), "--suite", "testsuite", "--tasks", "toy", "--data-root", str(root),
                 "--backbone", TINY_BACKBONE, "--runs-dir", str(runs), "--dry-run"]) == 2
    one_line_error(capsys.readouterr().err, "settings of tracker 'wandb' given")
    with pytest.raises(SettingsError, match="settings of tracker 'mlflow' given"):
        plan_sweep(Sweep(methods=["linear"], suite="testsuite", tasks=["toy"], backbone=TINY_BACKBONE,
                         tracker_settings={"mlflow": {"uri": "x"}}), check_data=False)
    # --tracker on the command line replaces the file's trackers: the file's settings of the others go with them
    f.write_text("methods = ['linear']\n[tracking]\ntrackers = ['wandb']\n[tracking.wandb]\nproject = 'x'\n")
    assert main(["run", "--config", str(f), "--suite", "testsuite", "--tasks", "toy", "--data-root", str(root),
                 "--backbone", TINY_BACKBONE, "--runs-dir", str(runs), "--protocol", "fixed", "--seeds", "1",
                 "--tracker", "tensorboard", "--dry-run"]) == 0


# ---------------------------------------------------------------------------------------------
# follow-ups: text from records on the terminal; registry names that are file names
# ---------------------------------------------------------------------------------------------

HOSTILE = "\x1b[31mred\x1b[2J\x07"


def test_the_sweep_summary_and_progress_never_print_a_control_character():
    from peftbench.store import RunSpec
    from peftbench.sweep.drive import print_summary
    from peftbench.sweep.progress import SweepProgress

    buf = io.StringIO()
    print_summary([{"config": HOSTILE, "task": "t\x1b]0;title\x07", "stage": "final", "top1": 50.0, "std": None, "n": 1,
                    "tuned_pct": 1.0, "failed": 0, "error": "boom\x1b[2J\nsecond line"}], file=buf)
    text = buf.getvalue()
    assert "\x1b" not in text and "\x07" not in text and "\\x1b[31mred" in text and "boom\\x1b[2J second line" in text
    spec = RunSpec(method="linear", task="t\x1b[31m", suite="s", protocol="fixed", stage="final", train_split="a",
                   eval_split="b", hparams={"epochs": 2, "lr": 0.1, "wd": 0.0}, seed=1, config=HOSTILE)
    for mode in ("lines", "bar"):
        stream = io.StringIO()
        progress = SweepProgress([spec], stream=stream, mode=mode, interval_s=0.0)
        progress.run_started(spec)
        progress.epoch(spec, {"epoch": 0})
        progress.message(f"[local] {spec.label()} failed: {HOSTILE}")
        progress.run_finished(spec)
        progress.close()
        text = stream.getvalue()
        assert "\x1b[31m" not in text and "\x07" not in text and "\x1b[2J" not in text, (mode, text)
        assert "\\x1b[31m" in text


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", ".hidden", "\x1b[31mred", "", "x" * 201])
def test_a_registry_refuses_a_plugin_name_that_is_not_a_file_name(name):
    from peftbench._registry import Registry, UnsafeName
    from peftbench.methods import METHODS, Method

    reg: Registry = Registry("widget")
    with pytest.raises(UnsafeName) as exc:
        reg.add(name, object())
    assert "\n" not in str(exc.value) and "widget name" in str(exc.value) and "not usable as a file name" in str(exc.value)
    with pytest.raises(UnsafeName, match="widget alias"):
        reg.add("fine", object(), aliases=[name])
    assert "fine" not in reg

    class Evil(Method):
        description = "a method whose name is a path"

    Evil.name = name or "../evil"
    with pytest.raises(PeftbenchError, match="method name .* not usable as a file name"):
        METHODS.register_class(Evil)
    assert Evil.name not in METHODS


def test_an_os_error_no_command_foresaw_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    """The last resort of the command line: a raw disk or permission error becomes one line with its file."""
    import peftbench.executors as executors

    def denied(*a, **kw):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "some" / "file.json"))

    monkeypatch.setattr(executors, "collect", denied)
    assert main(["status", "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert f"{tmp_path / 'some' / 'file.json'}: Permission denied" in err
