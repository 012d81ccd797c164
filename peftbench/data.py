"""Split tensors for training: decoded once per process, kept as uint8, normalised per batch."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .images import decode_many
from .task import Task, read_split


@dataclass
class SplitData:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


_CACHE: dict[tuple, SplitData] = {}


def load_split(task: Task, data_root: Path, split: str, size: int) -> SplitData:
    key = (task.name, str(Path(data_root).resolve()), split, size)
    if key not in _CACHE:
        s = read_split(task, data_root, split)
        images = decode_many(s.paths, size)
        _CACHE[key] = SplitData(images, torch.tensor(s.labels, dtype=torch.long))
        while len(_CACHE) > 8:  # keep memory bounded in long sweeps
            _CACHE.pop(next(iter(_CACHE)))
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()
