"""Process-wide settings and caches shared by the runs of a sweep."""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from ..backbones import create_backbone
from ..errors import SettingsError
from ..store import RunSpec


@dataclass
class Env:
    """Process-wide settings and caches shared by the runs of a sweep."""

    device: str = "cpu"
    eval_batch_size: int = 256
    checkpoint_every: int = 1
    quiet: bool = False
    prefix: str = ""  # progress prefix, e.g. "[run 3/12]"
    # trained weights kept beside the record (<key>.final.safetensors, for `peftbench export`):
    # "final" (runs evaluated on the task's final split: the reported ones), "all" or "none"
    save_weights: str = "final"
    # where log lines go instead of stderr: anything with ``message(text, detail)`` (the sweep's
    # peftbench.sweep.progress.SweepProgress: a bar on a terminal, plain lines in a file)
    progress: Any = None
    # --fuse K: executors train up to K runs that differ only in lr / wd as one model (peftbench.train.fused)
    fuse: int = 1
    # the one way to follow runs: run hooks (peftbench.train.loop.RunHooks: start, every epoch, end; OnEpoch wraps a
    # function), e.g. the experiment trackers and the progress view; an Exception inside a hook is reported and
    # never fails the run, an interrupt (any other BaseException) goes through
    hooks: list = field(default_factory=list)
    # what the hooks were made from, as plain data (the trackers and their settings, peftbench.trackers):
    # executors hand it to the processes that run the runs (SLURM jobs, Ray workers); not part of a run key
    tracking: dict | None = None
    _backbones: dict = field(default_factory=dict, repr=False)

    def backbone(self, spec: RunSpec) -> torch.nn.Module:
        """A fresh copy of the pretrained backbone (loaded once per process)."""
        key = (spec.backbone, spec.checkpoint)
        if key not in self._backbones:
            self._backbones.clear()
            # own RNG: the caller's seeded state is not consumed (a run's init must not depend on whether
            # the backbone was cached), and a backbone without pretrained weights is the same every time
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self._backbones[key] = create_backbone(spec.backbone, spec.checkpoint)
        return copy.deepcopy(self._backbones[key])

    def keeps_weights(self, spec: RunSpec, final_eval_split: str) -> bool:
        return self.save_weights == "all" or (self.save_weights == "final" and spec.eval_split == final_eval_split)

    def log(self, msg: str, detail: bool = False) -> None:
        """A progress line; ``detail``: a per-epoch line (a progress display shows those only when verbose)."""
        if self.progress is not None:
            self.progress.message(msg, detail)
        elif not self.quiet:
            print(msg, file=sys.stderr, flush=True)


def check_device(device: str | None, flag: str = "--device") -> str:
    """The device to use (default: cuda when available); a device this machine lacks is an error."""
    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SettingsError(f"{flag} {device!r}: not a device (cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(f"{flag} {device}: no CUDA device on this machine (torch.cuda.is_available() "
                                "is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SettingsError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise SettingsError(f"{flag} {device}: peftbench trains on cpu or cuda")
    return device
