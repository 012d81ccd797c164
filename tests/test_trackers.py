"""Experiment trackers (peftbench.trackers, docs/trackers.md), each read back with its own library:
TensorBoard event files through tensorboard's EventAccumulator, an MLflow file store through
MlflowClient, a W&B offline run through wandb's record protobufs; a tracker that raises never fails
or loses a run; trackers change no run key."""
from __future__ import annotations

import glob
import json
import struct

import pytest
from helpers import TINY_BACKBONE, make_data_root

from peftbench.api.schema import Sweep
from peftbench.errors import SettingsError, UnknownNameError
from peftbench.executors.local import LocalExecutor
from peftbench.store import RunStore
from peftbench.sweep.drive import count_runs, drive
from peftbench.sweep.plan import plan
from peftbench.trackers import TRACKERS, Tracker, TrackerRun, Tracking, check_tracking, hooks_for
from peftbench.train.engine import Env

EPOCHS = 3


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("toydata"))


def sweep(data_root, runs, trackers, options=None, methods=("vpt-deep",), seeds=(1,), sweep_name="trk"):
    settings = Sweep(methods=list(methods), suite="testsuite", tasks=["toy"], protocol="fixed",
                             seeds=list(seeds), data_root=str(data_root), backbone=TINY_BACKBONE,
                             **{"epochs": EPOCHS, "batch_size": 16, "lr": (0.05,), "wd": (0.0,)})
    contexts = plan(settings)
    tracking = check_tracking(Tracking(list(trackers), sweep_name, str(runs), dict(options or {})))
    env = Env(quiet=True, tracking=tracking.to_dict(), hooks=hooks_for(tracking))
    store = RunStore(runs)
    drive(contexts, LocalExecutor(env, len(count_runs(contexts))), store)
    return [r for _, r, _ in store.iter_records()], env


def test_tensorboard_event_files_read_back(data_root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (rec,), _ = sweep(data_root, tmp_path / "runs", ["tensorboard"])
    folders = glob.glob(str(tmp_path / "runs" / "tensorboard" / "trk" / "vpt-deep" / "toy" / f"final-seed1-{rec.key}"))
    assert len(folders) == 1
    acc = EventAccumulator(folders[0])
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(EPOCHS))
    assert [e.value for e in loss] == pytest.approx([h["train_loss"] for h in rec.history], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([h["lr"] for h in rec.history], rel=1e-6)
    assert acc.Scalars("eval/top1")[-1].value == pytest.approx(rec.top1)
    assert acc.Scalars("final/top1")[0].value == pytest.approx(rec.top1)
    tensors = acc.Tags()["tensors"]
    assert any("config" in t for t in tensors) and any("record" in t for t in tensors)
    assert acc.Scalars("params/trainable")[0].value == rec.params["trainable"]
    # the HParams tab: the run's hyper-parameters (base and effective lr) with its final metrics
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["method"].string_value == "vpt-deep"
    assert session.hparams["lr"].number_value == pytest.approx(rec.spec["hparams"]["lr"])
    assert session.hparams["lr_effective"].number_value == pytest.approx(rec.hparams_effective["lr"])


def test_mlflow_file_store_read_back(data_root, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store_uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    recs, _ = sweep(data_root, tmp_path / "runs", ["mlflow"], {"mlflow": {"uri": store_uri}}, seeds=(1, 2))
    client = MlflowClient(tracking_uri=store_uri)
    exp = client.get_experiment_by_name("trk")  # grouped by sweep: one experiment
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2  # one MLflow run per peftbench run
    by_key = {r.data.tags["peftbench.key"]: r for r in runs}
    assert set(by_key) == {r.key for r in recs}
    for rec in recs:
        run = by_key[rec.key]
        assert run.info.status == "FINISHED" and run.data.tags["peftbench.sweep"] == "trk"
        assert run.data.params["method"] == "vpt-deep" and run.data.params["seed"] == str(rec.spec["seed"])
        hist = client.get_metric_history(run.info.run_id, "train_loss")
        assert [m.step for m in sorted(hist, key=lambda m: m.step)] == list(range(EPOCHS))
        assert [m.value for m in sorted(hist, key=lambda m: m.step)] == pytest.approx([h["train_loss"] for h in rec.history])
        assert run.data.metrics["top1"] == pytest.approx(rec.top1)
        assert run.data.metrics["params_trainable"] == rec.params["trainable"]  # the parameter counts
        assert float(run.data.tags["peftbench.lr_effective"]) == pytest.approx(rec.hparams_effective["lr"])
        local = client.download_artifacts(run.info.run_id, "record.json", str(tmp_path / "dl" / rec.key))
        assert json.loads(open(local).read())["key"] == rec.key


def _wandb_records(path):
    """The records of a W&B offline run file (its LevelDB-style log of wandb's Record protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r)
    return out


def test_wandb_offline_run_read_back(data_root, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (rec,), _ = sweep(data_root, tmp_path / "runs", ["wandb"], {"wandb": {"project": "pb-test"}})
    import hashlib

    wid = f"{rec.key}-{hashlib.sha256(str((tmp_path / 'runs').resolve()).encode()).hexdigest()[:6]}"
    files = glob.glob(str(tmp_path / "runs" / "wandb" / f"offline-run-*-{wid}" / f"run-{wid}.wandb"))
    assert len(files) == 1
    records = _wandb_records(files[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == wid and run.run_group == "trk" and run.job_type == "final"  # unique per store
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["method"] == "vpt-deep" and config["key"] == rec.key
    losses = [json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "history"
              for i in r.history.item if (i.key or "/".join(i.nested_key)) == "train/loss"]
    assert losses == pytest.approx([h["train_loss"] for h in rec.history])
    summary = {(i.key or "/".join(i.nested_key)): i.value_json for r in records
               if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
    assert json.loads(summary["final/top1"]) == pytest.approx(rec.top1)
    assert json.loads(summary["record"])["key"] == rec.key


class _Exploding(Tracker):
    name = "test-exploding"
    description = "raises wherever it can (tests)"
    options = {"when": "start | epoch | finish"}

    def open(self, spec, run, tracking):
        when = tracking.option(self.name, "when")
        if when == "start":
            raise RuntimeError("tracker server unreachable")
        outer = self

        class _R(TrackerRun):
            def epoch(self, entry):
                outer.epochs += 1
                if when == "epoch":
                    raise ConnectionError("lost the connection")

            def finish(self, record):
                raise OSError("disk quota exceeded")

        return _R()

    epochs = 0


@pytest.mark.parametrize("when", ["start", "epoch", "finish"])
def test_a_failing_tracker_never_fails_or_loses_a_run(data_root, tmp_path, when, capsys):
    if "test-exploding" not in TRACKERS:
        TRACKERS.add("test-exploding", _Exploding())
    pytest.importorskip("tensorboard")
    (rec,), env = sweep(data_root, tmp_path / "runs", ["test-exploding", "tensorboard"],
                        {"test-exploding": {"when": when}})
    assert rec.status == "ok" and rec.top1 is not None and len(rec.history) == EPOCHS
    hooks = env.hooks[0]
    assert len(hooks.failures) == 1 and hooks.failures[0].startswith(f"test-exploding {when}")
    err = capsys.readouterr().err
    assert "tracker 'test-exploding' failed" in err and "the run goes on" in err
    # the other tracker got everything
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(glob.glob(str(tmp_path / "runs" / "tensorboard" / "trk" / "*" / "*" / "*"))[0])
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == EPOCHS


def test_trackers_change_no_run_key(data_root, tmp_path):
    pytest.importorskip("tensorboard")
    plain, _ = sweep(data_root, tmp_path / "a", [])
    tracked, _ = sweep(data_root, tmp_path / "b", ["tensorboard"])
    assert [r.key for r in plain] == [r.key for r in tracked]


def test_tracker_errors_before_compute(monkeypatch, tmp_path):
    with pytest.raises(UnknownNameError, match="Did you mean 'tensorboard'"):
        check_tracking(Tracking(["tensorbord"], "s", str(tmp_path)))
    with pytest.raises(SettingsError, match="tracker 'mlflow' has no setting 'urii'"):
        check_tracking(Tracking(["mlflow"], "s", str(tmp_path), {"mlflow": {"urii": "x"}}))
    monkeypatch.setattr(type(TRACKERS.get("wandb")), "requires", "no_such_module_xyz")
    with pytest.raises(SettingsError, match=r"pip install 'peftbench\[wandb\]'"):
        check_tracking(Tracking(["wandb"], "s", str(tmp_path)))


def test_trackers_travel_to_slurm_jobs(data_root, tmp_path):
    """The tracker choice travels in the executor's settings (Env.tracking), not in the run: a SLURM job
    (submitit's debug cluster runs the job function here) makes its own trackers from it."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from peftbench.executors.slurm import SlurmExecutor, make_settings

    runs = tmp_path / "runs"
    contexts = plan(Sweep(methods=["linear"], suite="testsuite", tasks=["toy"], protocol="fixed", seeds=[1, 2],
                                  data_root=str(data_root), backbone=TINY_BACKBONE,
                                  **{"epochs": 2, "batch_size": 16, "lr": (0.05,), "wd": (0.0,)}))
    settings = make_settings(flags={"gpus_per_node": 0, "cpus_per_task": 1}, sets=["cluster = 'debug'", "poll_s = 0.01"])
    tracking = check_tracking(Tracking(["tensorboard"], "on-slurm", str(runs)))
    ex = SlurmExecutor(settings, runs, quiet=True, total=2, log=lambda m: None, tracking=tracking.to_dict())
    drive(contexts, ex, RunStore(runs))
    ex.close()
    recs = [r for _, r, _ in RunStore(runs).iter_records()]
    assert len(recs) == 2 and all(r.status == "ok" and r.get("executor") for r in recs)
    for rec in recs:
        (folder,) = glob.glob(str(runs / "tensorboard" / "on-slurm" / "linear" / "toy" / f"*-{rec.key}"))
        acc = EventAccumulator(folder)
        acc.Reload()
        assert len(acc.Scalars("train/loss")) == 2 and acc.Scalars("final/top1")[0].value == pytest.approx(rec.top1)


def test_cli_tracker_flags_and_the_resolved_sweep(data_root, tmp_path):
    pytest.importorskip("tensorboard")
    from peftbench.api import load_sweep
    from peftbench.cli import main

    runs = tmp_path / "runs"
    assert main(["run", "--methods", "linear", "--suite", "testsuite", "--tasks", "toy", "--protocol", "fixed",
                 "--seeds", "1", "--backbone", TINY_BACKBONE, "--data-root", str(data_root), "--epochs", "2",
                 "--batch-size", "16", "--runs-dir", str(runs), "--quiet", "--tracker", "tb",
                 "--tracker-set", f"tensorboard.dir={tmp_path / 'tb'}", "--sweep-name", "from-cli"]) == 0
    assert len(glob.glob(str(tmp_path / "tb" / "from-cli" / "linear" / "toy" / "final-seed1-*"))) == 1
    resolved = load_sweep(runs / "sweeps" / "from-cli.toml")
    assert resolved.trackers == ["tensorboard"] and resolved.tracker_settings == {"tensorboard": {"dir": str(tmp_path / "tb")}}


def test_the_wandb_run_id_is_unique_per_store_and_per_fresh_attempt(tmp_path):
    from peftbench.trackers import Tracking
    from peftbench.trackers._base import RunInfo
    from peftbench.trackers.wandb import wandb_run_id

    a, b = Tracking(["wandb"], "s", str(tmp_path / "a")), Tracking(["wandb"], "s", str(tmp_path / "b"))
    info = RunInfo(key="k1", name="n", group="s", config={}, tags={})
    assert wandb_run_id(info, a) != wandb_run_id(info, b) and wandb_run_id(info, a).startswith("k1-")
    resumed = RunInfo(key="k1", name="n", group="s", config={}, tags={}, attempt=2, resume_epoch=3)
    assert wandb_run_id(resumed, a) == wandb_run_id(info, a)  # a resumed attempt continues its W&B run
    over = RunInfo(key="k1", name="n", group="s", config={}, tags={}, attempt=2, resume_epoch=0)
    assert wandb_run_id(over, a) == wandb_run_id(info, a) + "-a2"  # a rerun from scratch gets its own


def test_each_tracker_says_in_one_line_where_the_runs_are(tmp_path, monkeypatch):
    from peftbench.trackers import Tracking
    from peftbench.trackers._base import where_lines

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    t = Tracking(["wandb", "tensorboard"], "trk", str(tmp_path / "runs"), {"wandb": {"project": "pb"}})
    lines = where_lines(t)
    assert lines[0] == (f"wandb: project 'pb', group 'trk': offline runs in {tmp_path / 'runs' / 'wandb'} "
                        f"(`wandb sync {tmp_path / 'runs' / 'wandb'}`)")
    assert lines[1].startswith(f"tensorboard: event files in {tmp_path / 'runs' / 'tensorboard' / 'trk'}")
