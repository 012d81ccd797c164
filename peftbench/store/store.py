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

A record is trusted by its contents, never by its file name (docs/reliability.md §8). Every record
written carries a ``digest`` (SHA-256 of the rest of the record, canonical JSON); every read
(:meth:`RunStore.load`, :meth:`RunStore.iter_raw`) recomputes the key from the record's spec and
checks that the record's ``key`` field, its file name ``<key>.json`` and its folder
``<method>/<task>/`` agree with it, that its method, task and suite are usable as file names, and
that its digest matches (records of schema 1 and 2, written before digests, have none). A record
that disagrees is *quarantined*: renamed to ``<name>.quarantined.json`` beside it (never read as a
record again, never lost) with a one-line warning; it is neither reused nor ranked.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from .._io import atomic_write_text, safe_component, unsafe_component
from .._text import terminal
from ..errors import CorruptRecord, StoreError
from . import checkpoints
from .leases import Lease, claim, lease_state, locked, read_lease
from .records import RunRecord, RunSpec, validate

DIGEST = "digest"  # the field that holds a record's digest (:func:`record_digest`)
DIGEST_SCHEMA = 3  # records of this schema and later must carry a digest
QUARANTINED = ".quarantined"  # <name>.quarantined[-N].json: a record that failed its checks (never read again)

Warn = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(terminal(msg), file=sys.stderr, flush=True)


class RunStore:
    def __init__(self, root: str | Path, warn: Warn | None = None):
        self.root = Path(root)
        self.warn = warn or _stderr  # where quarantined records are reported (one line each)

    def _dir(self, spec: RunSpec) -> Path:
        return self.root / safe_component(spec.method, "method") / safe_component(spec.task, "task")

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
        return self._dir(spec) / safe_component(f"{spec.key}.{name}", "artifact")

    # -- records ------------------------------------------------------------------------------
    def load(self, spec: RunSpec) -> RunRecord | None:
        """``spec``'s record; None when there is none, when it is corrupt (the run is trained again and its
        file overwritten atomically) or when it fails its checks (quarantined: trained again)."""
        path = self.record_path(spec)
        if not path.exists():
            return None
        try:
            raw, data = _read(path)
        except (CorruptRecord, FileNotFoundError):
            return None
        if self._checked(path, raw, data) is not None:
            return None
        return RunRecord.from_dict(_without_digest(raw))

    def _checked(self, path: Path, raw: dict, data: bytes) -> str | None:
        """None when the record ``raw`` (the bytes ``data`` of ``path``) passes :func:`record_problem`; else
        it is quarantined and reported, and the reason (with where it went) is returned."""
        why = record_problem(path, raw)
        if why is None:
            return None
        moved = quarantine(path, data)
        where = (f"moved aside to {moved.name}" if moved is not None
                 else "it could not be moved aside (it is skipped every time)")
        msg = f"{why}; {where}: it is neither reused nor ranked, its run is trained again"
        self.warn(f"peftbench: warning: {path}: {msg}")
        return msg

    def is_done(self, spec: RunSpec) -> bool:
        rec = self.load(spec)
        return rec is not None and rec.is_final

    def write(self, spec: RunSpec, record: RunRecord | dict) -> Path:
        """Write ``record`` (or its on-disk dict form) atomically, with its digest. A record that would not
        pass its own checks when read back (its key or spec is not ``spec``'s) is a bug: StoreError."""
        if isinstance(record, dict):
            record = RunRecord.from_dict(record)
        path = self.record_path(spec)
        d = record.to_dict()
        d.pop(DIGEST, None)
        d = json.loads(json.dumps(d, default=_json_default))  # exactly what a reader parses
        d[DIGEST] = record_digest(d)
        why = record_problem(path, d)
        if why is not None:
            raise StoreError(f"refusing to write the run record {path}: {why}")
        text = json.dumps(d, indent=1, sort_keys=True) + "\n"
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
        """Every record file: (path, parsed JSON or None, error message or None). A record that fails its
        checks (:func:`record_problem`) is quarantined and comes as (path, None, why)."""
        if not self.root.exists():
            return
        for path in sorted(self.root.glob("*/*/*.json")):
            if "." in path.stem:  # <key>.<name>.json: an artifact of a run (e.g. scores), not a record
                continue
            if path.parent.parent.name.startswith("."):  # .peftbench/, .slurm/: the drivers' own files
                continue
            try:
                raw, data = _read(path)
            except FileNotFoundError:  # moved away meanwhile (quarantined, or --rerun-stale)
                continue
            except CorruptRecord as exc:
                yield path, None, str(exc)
                continue
            why = self._checked(path, raw, data)
            if why is None:
                yield path, _without_digest(raw), None
            else:
                yield path, None, f"{path}: {why}"

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
        return self._dir(spec) / f"{safe_component(key or spec.key, 'run key')}.rung.safetensors"

    def save_rung_state(self, spec: RunSpec, **payload: Any) -> None:
        checkpoints.save(self.rung_state_path(spec), **payload)

    def load_rung_state(self, spec: RunSpec, key: str) -> dict | None:
        """The end state of run ``key`` (None when it is not there); refuses anything not written by peftbench."""
        path = self.rung_state_path(spec, key)
        return checkpoints.load(path) if path.exists() else None


def read_record(path: Path) -> dict:
    """The parsed JSON of a record file; CorruptRecord when it is not a record. Its identity and digest
    are not checked here (:func:`record_problem`, which every read of a :class:`RunStore` applies)."""
    return _read(path)[0]


def _read(path: Path) -> tuple[dict, bytes]:
    """(parsed record, the file's bytes); FileNotFoundError when it is gone, CorruptRecord when it is not a record."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CorruptRecord(f"{path}: not a readable run record ({exc})") from None
    try:
        rec = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptRecord(f"{path}: not a readable run record ({exc})") from None
    except RecursionError:
        raise CorruptRecord(f"{path}: not a readable run record (nested too deeply)") from None
    reason = validate(rec, complete=False)
    if reason:
        raise CorruptRecord(f"{path}: {reason}")
    return rec, data


def _without_digest(rec: dict) -> dict:
    """A checked record as readers use it: the digest is the store's, not part of the record's data."""
    return {k: v for k, v in rec.items() if k != DIGEST}


def record_digest(rec: dict) -> str:
    """SHA-256 of a record's parsed JSON without its ``digest`` field (canonical: sorted keys, no spaces)."""
    body = {k: v for k, v in rec.items() if k != DIGEST}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


_SPEC_PROBLEMS = ("'spec'", "spec ", "spec.")  # validate()'s reasons about the spec (not a partial record)


def record_problem(path: Path, rec: dict) -> str | None:
    """Why the parsed record ``rec`` at ``path`` is not the run its file says it is; None when the key
    recomputed from its spec (:attr:`RunSpec.key`), its ``key`` field, its file name ``<key>.json`` and
    its folder ``<method>/<task>/`` agree, its method, task and suite are usable as file names, and its
    ``digest`` matches (schema 1 and 2 records have none)."""
    why = validate(rec)
    if why is not None and why.startswith(_SPEC_PROBLEMS):
        return why
    spec = rec["spec"]
    for field in ("method", "task", "suite"):
        bad = unsafe_component(spec.get(field))
        if bad:
            return f"spec.{field} {spec.get(field)!r} is not usable as a file name ({bad})"
    try:
        key = RunSpec.from_dict(spec).key
    except (TypeError, ValueError) as exc:
        return f"its spec is not a run spec ({exc})"
    if rec.get("key") != key:
        return (f"its key field {rec.get('key')!r} is not the key of its spec ({key}): the record was changed after "
                "peftbench wrote it")
    if Path(path).name != f"{key}.json":
        return f"its file name is not its key ({key}.json): the record was renamed or copied by hand"
    if (Path(path).parent.parent.name, Path(path).parent.name) != (spec["method"], spec["task"]):
        return (f"it is not in the folder of its run ({spec['method']}/{spec['task']}/): the record was moved or "
                "copied by hand")
    schema = rec.get("schema", 1)
    if isinstance(schema, bool) or not isinstance(schema, int):
        return f"its schema {schema!r} is not an integer"
    digest = rec.get(DIGEST)
    if digest is None:
        if schema >= DIGEST_SCHEMA:
            return f"it has no digest (a record of schema {schema} has one): it was changed after peftbench wrote it"
    elif digest != record_digest(rec):
        return "its contents do not match its digest: the record was changed after peftbench wrote it"
    return None


def quarantine(path: Path, data: bytes | None = None) -> Path | None:
    """Rename the record ``path`` to ``<name>.quarantined.json`` (``-1``, ``-2``, ... when taken) beside
    it, where no reader takes it for a record; None when it cannot be moved (another process moved it
    first, or the folder is not writable). ``data``: the bytes that were judged; when the file was
    replaced since (a new record), it is put back, not quarantined."""
    path = Path(path)
    for i in range(1000):
        target = path.with_name(f"{path.stem}{QUARANTINED}{f'-{i}' if i else ''}.json")
        if not target.exists():
            break
    else:
        return None
    try:
        os.rename(path, target)
    except OSError:
        return None
    if data is not None:
        try:
            same = target.read_bytes() == data
        except OSError:
            same = True
        if not same:  # a writer replaced the record between our read and the rename: that one is not judged
            try:
                if not path.exists():
                    os.rename(target, path)
            except OSError:
                pass
            return None
    return target


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
