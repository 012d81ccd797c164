"""``--tracker wandb``: Weights & Biases, one W&B run per peftbench run (``pip install 'peftbench[wandb]'``).

The W&B run's id is the run key + 6 hex digits of the run store's path (two stores of one sweep, the compare
workflow, never write into one W&B run), + ``-a<attempt>`` for an attempt that starts the run over (a rerun of a
stale or failed run gets its own W&B run; an attempt that resumes a checkpoint continues its W&B run); the config
keeps the run key (``key``) for joining. W&B prints its banners only with ``--verbose`` (``WANDB_SILENT``
otherwise, unless set). Its name is the run's label,
its group the sweep and its job type the stage; its config is the run spec. Per epoch it logs
``train/loss``, ``train/lr`` and ``eval/top1`` (step = epoch); at the end the summary holds the final
metrics and the whole record (``summary["record"]``). Log in as usual (``wandb login``,
``WANDB_API_KEY``); ``WANDB_MODE=offline`` (or ``mode = "offline"``) writes the runs under
``<dir>/wandb/offline-run-*`` for a later ``wandb sync``.
"""
from __future__ import annotations

from pathlib import Path

from ..store import RunStatus
from ._base import RunInfo, Tracker, TrackerRun, Tracking, register_tracker


def wandb_run_id(run: RunInfo, tracking: Tracking) -> str:
    """The W&B run id of a peftbench run: unique per run store, and per attempt that starts the run over."""
    import hashlib

    store = hashlib.sha256(str(Path(tracking.runs_dir).resolve()).encode()).hexdigest()[:6]
    over = run.attempt > 1 and run.resume_epoch == 0
    return f"{run.key}-{store}" + (f"-a{run.attempt}" if over else "")


def _clean(d: dict) -> dict:
    """W&B values: numbers, strings, booleans, lists and dicts of them; None becomes a string."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = _clean(v)
        elif v is None:
            out[k] = "None"
        else:
            out[k] = v
    return out


class _Run(TrackerRun):
    def __init__(self, run):
        self.run = run

    def epoch(self, entry: dict) -> None:
        data = {"epoch": int(entry["epoch"]), "train/loss": float(entry["train_loss"]), "train/lr": float(entry["lr"])}
        if entry.get("eval_top1") is not None:
            data["eval/top1"] = float(entry["eval_top1"])
        self.run.log(data, step=int(entry["epoch"]))

    def finish(self, record) -> None:
        summary = {"status": str(record.status), "record": _clean(record.to_dict())}
        if record.top1 is not None:
            summary["final/top1"] = float(record.top1)
        for k in ("trainable", "tuned_total_pct"):
            if record.params.get(k) is not None:
                summary[f"params/{k}"] = record.params[k]
        self.run.summary.update(summary)
        self.run.finish(exit_code=0 if record.status == RunStatus.OK else 1)

    def close(self) -> None:
        self.run.finish(exit_code=1)


@register_tracker
class WandB(Tracker):
    name = "wandb"
    aliases = ("weights-and-biases", "w&b")
    description = "Weights & Biases: one W&B run per run, grouped by sweep (pip install 'peftbench[wandb]')"
    options = {"project": "W&B project (default $WANDB_PROJECT, else 'peftbench')",
               "entity": "W&B entity (team or user; default: yours)",
               "mode": "online | offline | disabled (default $WANDB_MODE, else online)",
               "dir": "where W&B keeps its local files (default <runs-dir>)",
               "tags": "list of tags added to every run"}
    requires = "wandb"
    extra = "wandb"

    def where(self, tracking: Tracking) -> str:
        import os

        opt = lambda k, d=None: tracking.option(self.name, k, d)  # noqa: E731
        project = opt("project") or os.environ.get("WANDB_PROJECT") or "peftbench"
        mode = opt("mode") or os.environ.get("WANDB_MODE") or "online"
        folder = Path(opt("dir") or tracking.runs_dir) / "wandb"
        if mode == "offline":
            return f"project {project!r}, group {tracking.sweep!r}: offline runs in {folder} (`wandb sync {folder}`)"
        return f"project {project!r}, group {tracking.sweep!r} (local files in {folder})"

    def open(self, spec, run: RunInfo, tracking: Tracking) -> TrackerRun:
        import os

        if not tracking.verbose:
            os.environ.setdefault("WANDB_SILENT", "true")  # (about 24 banner lines per run otherwise)
        import wandb

        opt = lambda k, d=None: tracking.option(self.name, k, d)  # noqa: E731
        folder = Path(opt("dir") or tracking.runs_dir)
        folder.mkdir(parents=True, exist_ok=True)
        kwargs = dict(project=opt("project") or os.environ.get("WANDB_PROJECT") or "peftbench", entity=opt("entity"),
                      group=run.group, job_type=run.tags["stage"], name=run.name, id=wandb_run_id(run, tracking),
                      resume="allow",
                      config=_clean(run.config), dir=str(folder),
                      tags=[run.tags["method"], run.tags["task"], *list(opt("tags") or [])],
                      reinit="create_new")
        if opt("mode"):
            kwargs["mode"] = opt("mode")
        return _Run(wandb.init(**kwargs))
