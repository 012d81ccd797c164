"""The run store: one JSON record per run, written atomically, keyed by a stable hash.

Layout under ``--runs-dir`` (default ``./runs``)::

    <runs-dir>/<method>/<task>/<key>.json        the record (status ok | failed | diverged | running)
    <runs-dir>/<method>/<task>/<key>.ckpt.pt     per-epoch checkpoint of an unfinished run (trainable
                                                 tensors + optimizer state), deleted when it ends
    <runs-dir>/<method>/<task>/<key>.<name>      artifacts a run keeps (weights, masks, scores)

The key hashes everything that determines the result: method, resolved method options, task and its
data fingerprint, backbone and checkpoint hash, protocol and stage, splits, hyper-parameters, seed
and job. Running the same sweep again finds the same keys: finished runs are skipped, unfinished
ones resume from their checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

FINAL_STATUSES = ("ok", "diverged")  # a rerun skips these; "failed" and "running" are retried/resumed


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs; plain data, so it pickles to a SLURM job and hashes stably."""

    method: str
    task: str
    suite: str
    protocol: str
    stage: str
    train_split: str
    eval_split: str
    hparams: dict
    seed: int
    options: dict = field(default_factory=dict)
    backbone: str = "demo-vit"
    checkpoint: str | None = None
    checkpoint_id: str | None = None
    data_fingerprint: str | None = None
    job: str = "train"
    extras: dict = field(default_factory=dict)  # stage inputs (e.g. masks, weights to load); hashed
    # not part of the identity:
    config: str = ""  # leaderboard label: method + the options the user set
    option_sources: dict = field(default_factory=dict)
    data_root: str = ""

    IDENTITY = ("method", "task", "suite", "protocol", "stage", "train_split", "eval_split", "hparams", "seed",
                "options", "backbone", "checkpoint_id", "data_fingerprint", "job", "extras")

    @property
    def key(self) -> str:
        ident = {k: getattr(self, k) for k in self.IDENTITY}
        blob = json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def label(self) -> str:
        hp = self.hparams
        return (f"{self.method} {self.task} {self.stage} lr={hp.get('lr')} wd={hp.get('wd')} seed={self.seed}"
                + (f" {self.job}" if self.job != "train" else ""))


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_save_torch(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class CorruptRecord(ValueError):
    pass


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _dir(self, spec: RunSpec) -> Path:
        return self.root / spec.method / spec.task

    def record_path(self, spec: RunSpec) -> Path:
        return self._dir(spec) / f"{spec.key}.json"

    def checkpoint_path(self, spec: RunSpec) -> Path:
        return self._dir(spec) / f"{spec.key}.ckpt.pt"

    def artifact_path(self, spec: RunSpec, name: str) -> Path:
        return self._dir(spec) / f"{spec.key}.{name}"

    def load(self, spec: RunSpec) -> dict | None:
        path = self.record_path(spec)
        if not path.exists():
            return None
        try:
            return read_record(path)
        except CorruptRecord:
            return None  # rerun it; the corrupt file is overwritten atomically

    def is_done(self, spec: RunSpec) -> bool:
        rec = self.load(spec)
        return rec is not None and rec.get("status") in FINAL_STATUSES

    def write(self, spec: RunSpec, record: dict) -> Path:
        path = self.record_path(spec)
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True, default=_json_default) + "\n")
        return path

    def iter_records(self) -> Iterator[tuple[Path, dict | None, str | None]]:
        """Every record file: (path, record or None, error message or None)."""
        if not self.root.exists():
            return
        for path in sorted(self.root.glob("*/*/*.json")):
            if "." in path.stem:  # <key>.<name>.json: an artifact of a run (e.g. scores), not a record
                continue
            try:
                yield path, read_record(path), None
            except CorruptRecord as exc:
                yield path, None, str(exc)


def read_record(path: Path) -> dict:
    try:
        rec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptRecord(f"{path}: not a readable run record ({exc})") from None
    if not isinstance(rec, dict) or "spec" not in rec or "status" not in rec:
        raise CorruptRecord(f"{path}: not a run record (no 'spec'/'status')")
    return rec


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
