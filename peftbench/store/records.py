"""What a run is (:class:`RunSpec`, its stable key) and what it produced (:class:`RunRecord`).

A run record is the system's truth: the engine writes it, executors add their job information to it,
``status`` and the leaderboard read it. On disk it is one JSON object per run; :data:`SCHEMA` is its
version. Readers accept every earlier version (records written before the ``schema`` field existed
are version 1: the same fields, without ``schema``; version 2 records have no ``digest``). The run
store checks every record it reads against its spec and its digest (:func:`peftbench.store.store.record_problem`).

Fields of a record (all optional except ``key``, ``spec`` and ``status``):

==================  ==========================================================================
key                 :attr:`RunSpec.key`
spec                the :class:`RunSpec` as a dict
status              :class:`RunStatus`: ok | failed | diverged | running (planned: dry runs only)
error               the error (a traceback for ``failed``), else null
started_at/ended_at ISO times; attempts: how many times the engine started it
provenance          peftbench version and git sha, torch/timm versions, device, host
params              trainable, trainable_without_head, head, total, tuned, tuned_total_pct, ...
hparams_effective   lr after scaling, batch size, epochs
history             per epoch: epoch, lr, train_loss, eval_top1 (when evaluated)
metrics             top1 (last epoch, on the eval split), eval_split, final_train_loss,
                    best_epoch_top1 / best_epoch (flagged: selection on the eval split)
timing              train_s, train_images_per_s, cached_features, peak_memory_mb, memory_kind
image_size, num_train, num_eval, wall_s
code                {"method": ..., "engine": ...}: fingerprints of the code that ran it (stale results)
stopped_at_epoch    a run stopped at a rung of successive halving (``hparams.stop_epoch`` < epochs):
                    the epoch it stopped at; its end state is ``<key>.rung.safetensors``
resumed_from        {"key", "epoch"}: the rung run whose end state this run started from
searches            the searches whose sweeps used this run when it is more than ``spec.search``
                    (a run planned by a grid sweep and reused by a halving sweep: [grid, halving])
schema              this format's version (:data:`SCHEMA`)
digest              SHA-256 of the rest of the record (canonical JSON), written by the run store (schema 3
                    on); readers of the store never see it (``peftbench.store.store.record_digest``)
(anything else)     fields other code adds: executors (``slurm``, ``retries``), jobs other than
                    training (``scores``, ``importance``, ``artifacts``); kept verbatim in
                    :attr:`RunRecord.extra` and written back at the top level
==================  ==========================================================================
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

SCHEMA = 3  # 3: every record carries a digest (the run store's); 2: the schema field


class RunStatus(str, Enum):
    """The status of a run record (compares equal to its string value)."""

    OK = "ok"
    FAILED = "failed"
    DIVERGED = "diverged"
    RUNNING = "running"
    PLANNED = "planned"  # a placeholder during --dry-run, never written

    def __str__(self) -> str:
        return self.value


FINAL = frozenset({RunStatus.OK, RunStatus.DIVERGED})  # a rerun skips these; failed/running are retried
ENDED = frozenset({RunStatus.OK, RunStatus.DIVERGED, RunStatus.FAILED})
USABLE = frozenset({RunStatus.OK, RunStatus.PLANNED})  # metrics a pipeline may select on


def status_of(value: Any) -> RunStatus | str:
    """A :class:`RunStatus`, or the string itself when it is none of them (a foreign record)."""
    try:
        return RunStatus(value)
    except ValueError:
        return str(value)


# hyper-parameters that say where a run stops in its schedule (a rung of successive halving), not how it
# trains: not part of its trajectory, and never part of a recipe or a card
RUN_POSITION = ("stop_epoch",)


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs; plain data, so it pickles to a job and hashes stably."""

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
    method_version: int = 1  # Method.version: bumping it reruns the method's runs (hashed when > 1)
    # not part of the identity:
    config: str = ""  # leaderboard label: method + the options the user set
    option_sources: dict = field(default_factory=dict)
    data_root: str = ""
    # the search of the sweep that planned the run (grid | halving; docs/sweeps.md): not part of the key,
    # since a run's result depends on its hyper-parameters, never on how they were chosen
    search: str = "grid"
    # where a run stopped at a rung of successive halving starts from: {"key": <the earlier rung's run>,
    # "epoch": <its stop epoch>}; not part of the key either: resuming a prefix of the same trajectory gives
    # exactly what training from epoch 0 gives (the engine checks it is that prefix, tests prove equality)
    resume_from: dict = field(default_factory=dict)

    IDENTITY = ("method", "task", "suite", "protocol", "stage", "train_split", "eval_split", "hparams", "seed",
                "options", "backbone", "checkpoint_id", "data_fingerprint", "job", "extras")

    @property
    def key(self) -> str:
        ident = {k: getattr(self, k) for k in self.IDENTITY}
        if self.method_version != 1:  # version 1 is the implicit version of every key made before versions
            ident["method_version"] = self.method_version
        blob = json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def trajectory_key(self) -> str:
        """The key of the full run this run is a prefix of: the identity without the stage name and without
        ``hparams["stop_epoch"]`` (a run stopped at a rung and the run that finishes the schedule share it)."""
        ident = {k: getattr(self, k) for k in self.IDENTITY if k != "stage"}
        ident["hparams"] = {k: v for k, v in self.hparams.items() if k not in RUN_POSITION}
        if self.method_version != 1:
            ident["method_version"] = self.method_version
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
                + (f" epochs {self.resume_from.get('epoch', 0) if self.resume_from else 0}-{hp['stop_epoch']}"
                   f"/{hp.get('epochs')}" if hp.get("stop_epoch") else "")
                + (f" {self.job}" if self.job != "train" else ""))


def finite(x: Any) -> float | None:
    """``x`` as a finite float; None for anything else (None, a bool, a string, NaN, infinity)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


@dataclass
class RunRecord:
    """One run's record. ``extra`` holds the fields this class does not know (executors' and jobs')."""

    key: str
    spec: dict
    status: RunStatus | str = RunStatus.RUNNING
    error: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    attempts: int | None = None
    provenance: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    hparams_effective: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    image_size: int | None = None
    data_pipeline: dict = field(default_factory=dict)  # what the images went through (peftbench.data.transforms.pipeline)
    num_train: int | None = None
    num_eval: int | None = None
    wall_s: float | None = None
    code: dict = field(default_factory=dict)  # fingerprints of the code that produced it (peftbench.fingerprint)
    extra: dict = field(default_factory=dict)
    schema: int = SCHEMA

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def for_spec(cls, spec: RunSpec, **fields: Any) -> "RunRecord":
        return cls(key=spec.key, spec=spec.to_dict(), **fields)

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        """Read a record of any schema version (``validate`` first for untrusted input)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in known}
        kw.setdefault("key", "")
        kw["schema"] = int(d.get("schema", 1))
        kw["status"] = status_of(d.get("status"))
        for k in ("provenance", "params", "hparams_effective", "metrics", "timing", "data_pipeline"):
            if k in kw and not isinstance(kw[k], dict):
                kw[k] = {}
        if not isinstance(kw.get("history", []), list):
            kw["history"] = []
        return cls(**kw, extra={k: v for k, v in d.items() if k not in known and k != "extra"})

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["status"] = str(self.status)
        d.update(self.extra)
        d["schema"] = SCHEMA
        return d

    # -- typed access -------------------------------------------------------------------------
    @property
    def run_spec(self) -> RunSpec:
        return RunSpec.from_dict(self.spec)

    @property
    def top1(self) -> float | None:
        return finite(_dict(self.metrics).get("top1"))

    @property
    def hparams(self) -> dict:
        return _dict(self.spec.get("hparams"))

    @property
    def device(self) -> str:
        return str(_dict(self.provenance).get("device") or "")

    @property
    def is_final(self) -> bool:
        return self.status in FINAL

    @property
    def usable(self) -> bool:
        """Metrics a pipeline may select on (``planned`` stands in during --dry-run)."""
        return self.status in USABLE and self.top1 is not None

    # -- the record as it is on disk (read-only), for code written against dict records -----------
    def __getitem__(self, name: str) -> Any:
        d = self.to_dict()
        return d[name]

    def __contains__(self, name: object) -> bool:
        return name in self.to_dict()

    def keys(self):
        return self.to_dict().keys()

    def get(self, name: str, default: Any = None) -> Any:
        """A field by its on-disk name (an executor's or a job's field lives in ``extra``)."""
        if name in self.extra:
            return self.extra[name]
        return self.to_dict().get(name, default)


_REQUIRED_SPEC = ("method", "task", "suite", "stage", "seed")


def validate(rec: Any, *, complete: bool = True) -> str | None:
    """Why a parsed JSON value is not a run record (None when it is). ``complete``: also check that
    the spec has what the leaderboard needs and that a finished training run has its results."""
    if not isinstance(rec, dict) or "spec" not in rec or "status" not in rec:
        return "not a run record (no 'spec'/'status')"
    if not complete:
        return None
    spec = rec.get("spec")
    if not isinstance(spec, dict):
        return "'spec' is not an object"
    missing = [k for k in _REQUIRED_SPEC if k not in spec]
    if missing:
        return f"spec lacks {', '.join(missing)}"
    if not isinstance(spec.get("hparams", {}), dict):
        return "spec.hparams is not an object"
    for k in ("method", "task", "suite", "stage"):
        if not isinstance(spec[k], str):
            return f"spec.{k} is not a string"
    try:
        int(spec["seed"])
    except (TypeError, ValueError):
        return "spec.seed is not an integer"
    if not isinstance(rec.get("status"), str):
        return "status is not a string"
    # a finished training run has metrics, params and timing (other jobs, e.g. pruning, need not)
    if rec.get("status") == RunStatus.OK and spec.get("job", "train") == "train":
        if not isinstance(rec.get("metrics"), dict) or finite(rec["metrics"].get("top1")) is None:
            return "status ok but no numeric metrics.top1 (partial record)"
        if not isinstance(rec.get("params"), dict) or not isinstance(rec.get("timing"), dict):
            return "status ok but no params/timing (partial record)"
    return None


def planned(spec: RunSpec) -> RunRecord:
    """The placeholder record a dry run hands to pipelines (selection sees top1 0)."""
    return RunRecord.for_spec(spec, status=RunStatus.PLANNED, metrics={"top1": 0.0})
