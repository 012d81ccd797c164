"""Process-wide settings and caches shared by the runs of a sweep."""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..backbones import create_backbone
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
    # --fuse K: executors train up to K runs that differ only in lr / wd as one model (peftbench.train.fused)
    fuse: int = 1
    # called after every finished epoch with (spec, epoch); tests use it to interrupt a run
    epoch_callbacks: list[Callable[[RunSpec, int], None]] = field(default_factory=list)
    # called after every epoch with (spec, history entry): progress displays, experiment trackers
    epoch_listeners: list[Callable[[RunSpec, dict], None]] = field(default_factory=list)
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

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)
