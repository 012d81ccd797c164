"""``--tracker mlflow``: MLflow, one MLflow run per peftbench run (``pip install 'peftbench[mlflow]'``).

Runs go to the experiment named after the sweep (``experiment`` overrides it), on the tracking URI
``uri`` (default ``$MLFLOW_TRACKING_URI``, else a file store ``<runs-dir>/mlruns`` that needs no server:
``mlflow ui --backend-store-uri <runs-dir>/mlruns``). MLflow 3 keeps the file store in maintenance mode
and refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``, which peftbench sets for that default only; a
database or a server (``sqlite:///mlflow.db``, ``http://host:5000``) needs the full ``mlflow`` package.
Tags: ``peftbench.key``, ``peftbench.sweep``, method, task, stage, seed; params: the options and the
hyper-parameters; metrics per epoch ``train_loss``, ``lr``, ``eval_top1`` (step = epoch) and ``top1``;
artifacts ``config.json`` (the run spec) and ``record.json`` (the final record). A run that resumes
continues its MLflow run (found by its ``peftbench.key`` tag).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..store import RunStatus
from ._base import RunInfo, Tracker, TrackerRun, Tracking, final_numbers, register_tracker


def _uri(tracking: Tracking) -> str:
    uri = tracking.option("mlflow", "uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return str(uri)
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (Path(tracking.runs_dir).resolve() / "mlruns").as_uri()


def _flat(prefix: str, d: dict, out: dict) -> dict:
    for k, v in d.items():
        if isinstance(v, dict):
            _flat(f"{prefix}{k}.", v, out)
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]
    return out


class _Run(TrackerRun):
    def __init__(self, client, run_id: str):
        self.c = client
        self.id = run_id

    def epoch(self, entry: dict) -> None:
        from mlflow.entities import Metric

        step, now = int(entry["epoch"]), int(time.time() * 1000)
        metrics = [Metric("train_loss", float(entry["train_loss"]), now, step), Metric("lr", float(entry["lr"]), now, step)]
        if entry.get("eval_top1") is not None:
            metrics.append(Metric("eval_top1", float(entry["eval_top1"]), now, step))
        self.c.log_batch(self.id, metrics=metrics)

    def finish(self, record) -> None:
        from mlflow.entities import Metric

        hp, metrics = final_numbers(record)  # top1 and the parameter counts; the base and the effective lr
        now = int(time.time() * 1000)
        self.c.log_batch(self.id, metrics=[Metric(k.replace("/", "_"), v, now, 0) for k, v in metrics.items()])
        self.c.set_tag(self.id, "peftbench.lr_effective", str(hp["lr_effective"]))
        self.c.log_dict(self.id, record.to_dict(), "record.json")
        self.c.set_tag(self.id, "peftbench.status", str(record.status))
        self.c.set_terminated(self.id, "FINISHED" if record.status == RunStatus.OK else "FAILED")

    def close(self) -> None:
        self.c.set_terminated(self.id, "KILLED")


@register_tracker
class MLflow(Tracker):
    name = "mlflow"
    description = "MLflow: one MLflow run per run, an experiment per sweep (pip install 'peftbench[mlflow]')"
    options = {"uri": "tracking URI (default $MLFLOW_TRACKING_URI, else the file store <runs-dir>/mlruns)",
               "experiment": "experiment name (default: the sweep's name)"}
    requires = "mlflow"
    extra = "mlflow"

    def where(self, tracking: Tracking) -> str:
        name = tracking.option(self.name, "experiment") or tracking.sweep
        return f"experiment {name!r} at {_uri(tracking)}"

    def open(self, spec, run: RunInfo, tracking: Tracking) -> TrackerRun:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=_uri(tracking))
        name = tracking.option(self.name, "experiment") or run.group
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
        found = client.search_runs([exp_id], filter_string=f"tags.`peftbench.key` = '{run.key}'", max_results=1)
        if found:  # the run resumes (or runs again): its MLflow run continues
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            return _Run(client, run_id)
        tags = {f"peftbench.{k}": str(v) for k, v in run.tags.items()}
        tags["mlflow.runName"] = run.name
        r = client.create_run(exp_id, run_name=run.name, tags=tags)
        params = _flat("", {"options": run.config.get("options") or {}, "hparams": run.config.get("hparams") or {}}, {})
        params.update({"method": run.tags["method"], "task": run.tags["task"], "stage": run.tags["stage"],
                       "seed": run.tags["seed"], "backbone": run.tags["backbone"]})
        from mlflow.entities import Param

        client.log_batch(r.info.run_id, params=[Param(k, v) for k, v in sorted(params.items())])
        client.log_dict(r.info.run_id, run.config, "config.json")
        return _Run(client, r.info.run_id)
