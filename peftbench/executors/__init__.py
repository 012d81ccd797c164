"""Executors: where the runs of a sweep happen. One registry (``EXECUTORS``); one module or sub-package
per backend: ``local`` (this process, or worker processes), ``ray`` (Ray tasks), ``slurm/`` (submitit job
arrays). Each declares its settings (:class:`Setting`) and translates the sweep's generic ones."""
from ._base import EXECUTORS, ExecutorPlugin, Setting, register_executor
from ._status import collect, new_entry

__all__ = ["EXECUTORS", "ExecutorPlugin", "Setting", "register_executor", "collect", "new_entry"]
