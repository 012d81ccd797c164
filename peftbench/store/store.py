"""The run store: one JSON record per run, written atomically, keyed by a stable hash.

Layout under ``--runs-dir`` (default ``./runs``)::

    <runs-dir>/<method>/<task>/<key>.json              the record (status ok | failed | diverged | running)
    <runs-dir>/<method>/<task>/<key>.ckpt.safetensors  resume state of an unfinished run (trainable tensors,
                                                       optimizer and RNG state, no pickle), deleted at the end
    <runs-dir>/<method>/<task>/<key>.lease             who trains the run now (host, pid, heartbeat; leases.py)
    <runs-dir>/<method>/<task>/<key>.rung.safetensors  end state of a run stopped at a rung of successive
                                                       halving (checkpoint format): the next rung starts from it
    <runs-dir>/<method>/<task>/<key>.<name>            artifacts a run keeps (weights, masks, scores)

The key hashes everything that determines the result: method, resolved method options, task and its
data fingerprint, backbone and checkpoint hash, protocol and stage, splits, hyper-parameters, seed
and job. Running the same sweep again finds the same keys: finished runs are skipped, unfinished
ones resume from their checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

from .._io import atomic_write_text
from ..errors import CorruptRecord, StoreError
from . import checkpoints
from .leases import Lease, claim, lease_state, locked, read_lease
from .records import RunRecord, RunSpec, validate


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _dir(self, spec: RunSpec) -> Path:
        return self.root / spec.method / spec.task

    def record_path(self, spec: RunSpec) -> Path:
        return self._dir(spec) / f"{spec.key}.json"

    def checkpoint_path(self, spec: RunSpec) -> Path:
        return self._dir(spec) / f"{spec.key}.ckpt.safetensors"

    def legacy_checkpoint_path(self, spec: RunSpec) -> Path:
        """Where peftbench 0.1 kept a pickled checkpoint (never read, see :mod:`.checkpoints`)."""
        return self._dir(spec) / f"{spec.key}.ckpt.pt"

    def lease_path(self, spec: RunSpec) -> Path:
        return self._dir(spec) / f"{spec.key}.lease"

    def claim(self, spec: RunSpec) -> Lease | None:
        """The run's lease (see :mod:`.leases`), None while another live process holds it."""
        try:
            return claim(self.lease_path(spec), what=spec.label())
        except OSError as exc:
            raise StoreError(f"cannot write the lease {self.lease_path(spec)}: {exc.strerror or exc}") from None

    def lease_holder(self, spec: RunSpec) -> tuple[str, dict | None]:
        """(``none`` | ``live`` | ``dead``, the lease's contents)."""
        path = self.lease_path(spec)
        if not path.exists():
            return "none", None
        info = read_lease(path)
        return lease_state(info, path), info

    def artifact_path(self, spec: RunSpec, name: str) -> Path:
        return self._dir(spec) / f"{spec.key}.{name}"

    # -- records ------------------------------------------------------------------------------
    def load(self, spec: RunSpec) -> RunRecord | None:
        path = self.record_path(spec)
        if not path.exists():
            return None
        try:
            return RunRecord.from_dict(read_record(path))
        except CorruptRecord:
            return None  # rerun it; the corrupt file is overwritten atomically

    def is_done(self, spec: RunSpec) -> bool:
        rec = self.load(spec)
        return rec is not None and rec.is_final

    def write(self, spec: RunSpec, record: RunRecord | dict) -> Path:
        """Write ``record`` (or its on-disk dict form) atomically."""
        if isinstance(record, dict):
            record = RunRecord.from_dict(record)
        path = self.record_path(spec)
        text = json.dumps(record.to_dict(), indent=1, sort_keys=True, default=_json_default) + "\n"
        try:
            return atomic_write_text(path, text)
        except OSError as exc:
            raise StoreError(f"cannot write the run record {path}: {exc.strerror or exc}") from None

    def update(self, spec: RunSpec, change: Callable[[RunRecord], bool]) -> RunRecord | None:
        """Read, change and write back ``spec``'s record under the lock that serialises claims of the run
        (``change`` returns whether it changed anything); None when there is no record."""
        lock = self.lease_path(spec)
        lock = lock.with_name(lock.name + ".lock")
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            with locked(lock):
                rec = self.load(spec)
                if rec is not None and change(rec):
                    self.write(spec, rec)
                return rec
        except OSError as exc:
            raise StoreError(f"cannot update the run record {self.record_path(spec)}: {exc.strerror or exc}") from None

    def iter_raw(self) -> Iterator[tuple[Path, dict | None, str | None]]:
        """Every record file: (path, parsed JSON or None, error message or None)."""
        if not self.root.exists():
            return
        for path in sorted(self.root.glob("*/*/*.json")):
            if "." in path.stem:  # <key>.<name>.json: an artifact of a run (e.g. scores), not a record
                continue
            if path.parent.parent.name.startswith("."):  # .peftbench/, .slurm/: the drivers' own files
                continue
            try:
                yield path, read_record(path), None
            except CorruptRecord as exc:
                yield path, None, str(exc)

    def iter_records(self) -> Iterator[tuple[Path, RunRecord | None, str | None]]:
        for path, raw, err in self.iter_raw():
            yield path, (RunRecord.from_dict(raw) if raw is not None else None), err

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, spec: RunSpec, **payload: Any) -> None:
        checkpoints.save(self.checkpoint_path(spec), **payload)

    def load_checkpoint(self, spec: RunSpec) -> dict | None:
        """The resume state of ``spec``, None when it has none; refuses anything not written by peftbench."""
        legacy = self.legacy_checkpoint_path(spec)
        if legacy.exists():
            raise StoreError(f"refusing to resume from {legacy}: a pickled checkpoint (peftbench 0.1 format) "
                             "could run arbitrary code; delete it to restart the run from its first epoch")
        path = self.checkpoint_path(spec)
        return checkpoints.load(path) if path.exists() else None

    def checkpoint_epoch(self, spec: RunSpec) -> int:
        """The epoch ``spec`` resumes from (0 when it has no checkpoint)."""
        path = self.checkpoint_path(spec)
        return checkpoints.epoch(path) if path.exists() else 0

    def has_checkpoint(self, spec: RunSpec) -> bool:
        return self.checkpoint_path(spec).exists()

    def drop_checkpoint(self, spec: RunSpec) -> None:
        self.checkpoint_path(spec).unlink(missing_ok=True)

    # -- end states of runs stopped at a rung (successive halving) -------------------------------
    def rung_state_path(self, spec: RunSpec, key: str | None = None) -> Path:
        """The end state of ``spec`` (or of run ``key`` of the same method and task) stopped at a rung."""
        return self._dir(spec) / f"{key or spec.key}.rung.safetensors"

    def save_rung_state(self, spec: RunSpec, **payload: Any) -> None:
        checkpoints.save(self.rung_state_path(spec), **payload)

    def load_rung_state(self, spec: RunSpec, key: str) -> dict | None:
        """The end state of run ``key`` (None when it is not there); refuses anything not written by peftbench."""
        path = self.rung_state_path(spec, key)
        return checkpoints.load(path) if path.exists() else None


def read_record(path: Path) -> dict:
    """The parsed JSON of a record file; CorruptRecord when it is not a record."""
    try:
        rec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptRecord(f"{path}: not a readable run record ({exc})") from None
    reason = validate(rec, complete=False)
    if reason:
        raise CorruptRecord(f"{path}: {reason}")
    return rec


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
