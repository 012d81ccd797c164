"""Executors: where the runs of a sweep happen. One registry (``EXECUTORS``); one module or sub-package
per backend: ``local`` (this process), ``slurm/`` (submitit job arrays)."""
from ._base import EXECUTORS, ExecutorPlugin, register_executor

__all__ = ["EXECUTORS", "ExecutorPlugin", "register_executor"]
