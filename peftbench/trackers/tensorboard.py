"""``--tracker tensorboard``: TensorBoard event files, one folder per run (``pip install 'peftbench[tensorboard]'``).

``<dir>/<sweep>/<method>/<task>/<stage>-seed<seed>-<key>/`` (``dir`` default ``<runs-dir>/tensorboard``):
scalars ``train/loss``, ``train/lr`` and ``eval/top1`` per epoch (step = epoch), ``final/top1`` and the
text ``config`` (the run spec) and ``record`` (the final record, as JSON). A run that resumes appends
to its folder from the epoch it resumes at. ``tensorboard --logdir <runs-dir>/tensorboard`` shows them.
"""
from __future__ import annotations

import json
from pathlib import Path

from .._io import safe_component
from ._base import RunInfo, Tracker, TrackerRun, Tracking, final_numbers, register_tracker


def _text(obj) -> str:
    """JSON as a Markdown code block (TensorBoard renders text summaries as Markdown)."""
    return "\n".join("    " + line for line in json.dumps(obj, indent=1, sort_keys=True, default=str).splitlines())


def run_dir(root: str | Path, info: RunInfo) -> Path:
    """The run's folder under ``root``; every part is checked to be one file name (nothing is written
    outside ``root``: a sweep name such as ``../../x`` or ``/abs`` is refused)."""
    t = info.tags
    return (Path(root) / safe_component(info.group, "--sweep-name") / safe_component(t["method"], "method")
            / safe_component(t["task"], "task") / safe_component(f"{t['stage']}-seed{t['seed']}-{info.key}", "run"))


class _Run(TrackerRun):
    def __init__(self, folder: Path, info: RunInfo):
        from torch.utils.tensorboard import SummaryWriter

        folder.mkdir(parents=True, exist_ok=True)
        # purge_step: epochs an interrupted attempt logged after its last checkpoint are dropped
        self.w = SummaryWriter(log_dir=str(folder), purge_step=info.resume_epoch or None)
        self.last = info.resume_epoch
        if not info.resume_epoch:
            self.w.add_text("config", _text(info.config), 0)
        self.w.flush()

    def epoch(self, entry: dict) -> None:
        step = int(entry["epoch"])
        self.last = step
        self.w.add_scalar("train/loss", float(entry["train_loss"]), step)
        self.w.add_scalar("train/lr", float(entry["lr"]), step)
        if entry.get("eval_top1") is not None:
            self.w.add_scalar("eval/top1", float(entry["eval_top1"]), step)
        self.w.flush()

    def finish(self, record) -> None:
        from torch.utils.tensorboard.summary import hparams

        if record.top1 is not None:
            self.w.add_scalar("final/top1", float(record.top1), self.last)
        self.w.add_text("record", _text(record.to_dict()), self.last)
        hp, metrics = final_numbers(record)
        for k, v in metrics.items():
            if k != "top1":
                self.w.add_scalar(k, v, self.last)
        # the HParams tab: this run's hyper-parameters with its final metrics (in this run's own folder)
        for summary in hparams(hp, {"final/top1": metrics.get("top1", float("nan")),
                                    **{k: v for k, v in metrics.items() if k != "top1"}}):
            self.w.file_writer.add_summary(summary)
        self.w.close()

    def close(self) -> None:
        self.w.close()


@register_tracker
class TensorBoard(Tracker):
    name = "tensorboard"
    aliases = ("tb",)
    description = "TensorBoard event files under <runs-dir>/tensorboard/<sweep>/ (pip install 'peftbench[tensorboard]')"
    options = {"dir": "folder of the event files (default <runs-dir>/tensorboard)"}
    requires = "tensorboard"
    extra = "tensorboard"

    def where(self, tracking: Tracking) -> str:
        root = tracking.option(self.name, "dir") or Path(tracking.runs_dir) / "tensorboard"
        return f"event files in {Path(root) / tracking.sweep} (`tensorboard --logdir {root}`)"

    def open(self, spec, run: RunInfo, tracking: Tracking) -> TrackerRun:
        root = tracking.option(self.name, "dir") or Path(tracking.runs_dir) / "tensorboard"
        return _Run(run_dir(root, run), run)
