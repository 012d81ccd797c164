"""What an executor plugin is: how ``peftbench run --executor NAME`` gets an executor, which flags it
adds, and what it tells ``peftbench status``.

An executor runs one stage of a sweep: ``run(specs, store) -> records`` (the
:class:`peftbench.sweep.drive.Executor` protocol) and ``close()``. Every executor runs each spec with
:func:`peftbench.train.engine.execute`, which skips finished runs and resumes unfinished ones from
their checkpoint, so executors only decide *where* runs happen. Built-in executors are the modules of
this package (``local``, ``slurm/``); third-party packages add one by declaring a
``peftbench.executors`` entry point that names an :class:`ExecutorPlugin` subclass (docs/plugins.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from .._registry import Registry, instance_registry
from ..errors import SettingsError

if TYPE_CHECKING:
    from ..train.env import Env


class ExecutorPlugin:
    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    # the keys of a sweep file's [executor.<name>] table -> help (docs/sweep-files.md)
    settings_keys: ClassVar[dict[str, str]] = {}
    # whether the executor trains fused groups of runs (``peftbench run --fuse K``, docs/fused.md)
    fuses: ClassVar[bool] = False

    def configure(self, table: dict, args: argparse.Namespace | None, where: Callable[[str], str]) -> dict:
        """This executor's settings as plain data (TOML-writable: they go into the resolved sweep file):
        a sweep file's ``[executor.<name>]`` table, then the command line's flags (``args``) over it.
        ``where(key)`` names the file and line of a key for error messages. Checked here, before any
        compute. By default an executor has no settings."""
        for key in table:
            raise SettingsError(f"{where(key)}: executor {self.name!r} has no setting {key!r}"
                                + (f" (its settings: {', '.join(sorted(self.settings_keys))})" if self.settings_keys else ""))
        return {}

    def make(self, settings: dict, *, env: "Env", runs_dir: Path, total: int,
             args: argparse.Namespace | None = None) -> Any:
        """The executor for ``settings`` (from :meth:`configure`): what ``peftbench run`` and
        :func:`peftbench.run_sweep` use. By default :meth:`create` with the command line's namespace
        (executors written before sweep files)."""
        return self.create(args if args is not None else argparse.Namespace(**settings), env=env, runs_dir=runs_dir,
                           total=total)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this executor's own flags to ``peftbench run`` (an argument group)."""

    def given_flags(self, args: argparse.Namespace) -> list[str]:
        """This executor's flags that the command line set (an error when another executor runs)."""
        return []

    def create(self, args: argparse.Namespace, *, env: "Env", runs_dir: Path, total: int) -> Any:
        """The executor for ``peftbench run`` (its settings are checked here, before any compute)."""
        raise NotImplementedError

    def status(self, runs_dir: Path, runs: dict[str, dict], query: bool) -> dict:
        """What ``peftbench status`` shows of this executor for ``runs_dir``: updates ``runs`` (key ->
        the run's status entry: ``status``, ``job``, ...) in place and returns lines about the executor
        itself (``{"driver": ..., "notes": [...]}``); by default nothing."""
        return {}


EXECUTORS: Registry[ExecutorPlugin]
EXECUTORS, register_executor = instance_registry("executor", ExecutorPlugin, builtin="peftbench.executors",
                                                 group="peftbench.executors", article="an")
register_executor.__doc__ = "Class decorator: register one instance of an :class:`ExecutorPlugin` subclass under ``cls.name``."
