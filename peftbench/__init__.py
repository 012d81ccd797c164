"""peftbench: a benchmark harness for parameter-efficient fine-tuning of Vision Transformers.

The package reads like the data flow of a sweep (docs/architecture.md)::

    cli → sweep (plan, protocols, drive) → executors → train → store → results

with the plugin registries beside it: ``methods/`` (one file per method), ``tasks/`` (suites),
``data/layouts`` and ``data/transforms``, ``sweep/protocols``, ``executors/``, ``results/columns``.
"""
from ._version import __version__

__all__ = ["__version__"]
