"""The run store: run specs and their stable keys, typed run records, atomic JSON files,
pickle-free checkpoints of unfinished runs."""
from .records import ENDED, FINAL, SCHEMA, USABLE, RunRecord, RunSpec, RunStatus, finite, planned, status_of, validate
from .store import RunStore, read_record

__all__ = ["RunSpec", "RunRecord", "RunStatus", "RunStore", "FINAL", "ENDED", "USABLE", "SCHEMA", "planned", "finite",
           "status_of", "validate", "read_record"]
