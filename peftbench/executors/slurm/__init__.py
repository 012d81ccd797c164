"""``--executor slurm``: each stage of a sweep as one submitit job array (docs/slurm.md).

``settings.py`` (profile and flags), ``payload.py`` (what a job runs, as JSON), ``job.py`` (what runs
inside a job), ``queue.py`` (sacct/squeue),
``state.py`` (the driver's state file and lock), ``executor.py`` (the driver), ``status.py`` (what
``peftbench status`` shows of it). The driver and the job code (submitit, torch) are imported when
used, so that parsing the command line stays fast.
"""
from __future__ import annotations

import importlib
import sys

from .._base import ExecutorPlugin, register_executor
from . import settings as _settings
from .settings import GENERIC, SETTINGS, SlurmSettings, make_settings

_LAZY = {"SlurmExecutor": "executor", "run_task": "job", "job_info": "job", "mark_start": "job",
         "query_states": "queue", "parse_state_lines": "queue", "is_active": "queue", "slurm_available": "queue",
         "read_state": "state", "driver_lock_holder": "state"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@register_executor
class Slurm(ExecutorPlugin):
    name = "slurm"
    description = "one submitit job array per stage (preemption, requeue, bounded retries, re-attach)"
    fuses = True

    settings = SETTINGS
    generic = GENERIC

    def resolve(self, values):
        import dataclasses

        s = _settings.from_config(values)
        return {f.name: getattr(s, f.name) for f in dataclasses.fields(s)
                if f.name != "sources" and getattr(s, f.name) is not None}

    def make(self, settings, *, env, runs_dir, total):
        from .executor import SlurmExecutor

        s = _settings.from_config(settings)
        print(f"peftbench: SLURM: {s.describe()}", file=sys.stderr)
        return SlurmExecutor(s, runs_dir, quiet=env.quiet, total=total, tracking=env.tracking,
                             save_weights=env.save_weights, fuse=env.fuse)

    def status(self, runs_dir, runs, query):
        from .status import status

        return status(runs_dir, runs, query)


__all__ = ["SlurmSettings", "SETTINGS", "GENERIC", "make_settings", *_LAZY]
