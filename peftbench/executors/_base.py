"""What an executor plugin is: its settings (declared, as a method declares its options), how it translates the
sweep's generic executor settings into its own, the executor it makes, and what it tells ``peftbench status``.

An executor runs one stage of a sweep: ``run(specs, store) -> records`` (the
:class:`peftbench.sweep.drive.Executor` protocol) and ``close()``. Every executor runs each spec with
:func:`peftbench.train.engine.execute`, which skips finished runs and resumes unfinished ones from
their checkpoint, so executors only decide *where* runs happen. Built-in executors are the modules of
this package (``local``, ``ray``, ``slurm/``); third-party packages add one by declaring a
``peftbench.executors`` entry point that names an :class:`ExecutorPlugin` subclass (docs/plugins.md).

Settings, in the order they apply (later wins): the plugin's defaults < a TOML ``profile`` of its settings
(``--executor-profile FILE``, or ``profile = "..."`` in its table) < the sweep file's ``[executor.<name>]`` table
(and ``--executor-set KEY=VALUE``) < the sweep's **generic** settings (``gpus_per_node``, ``cpus_per_task``,
``mem_gb``, ``timeout_min``, ``max_retries``, ``workers``, ``devices``: :mod:`peftbench.api.schema`), each
translated by :attr:`ExecutorPlugin.generic` into the plugin's own name (submitit's habit: one vocabulary for
every backend). A generic setting an executor cannot honour is an error naming it, before compute.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from .._registry import Registry, instance_registry
from ..errors import SettingsError, bounds_problem

if TYPE_CHECKING:
    from ..train.env import Env


@dataclass(frozen=True)
class Setting:
    """One setting of an executor: the JSON/TOML types it takes, what it means, its bounds and choices."""

    types: tuple[type, ...]
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    keywords: tuple[str, ...] = ()  # strings accepted as they are by a numeric setting (e.g. "auto")

    def check(self, key: str, value: Any, where: str) -> Any:
        if isinstance(value, str) and value in self.keywords:
            return value
        if isinstance(value, bool) and bool not in self.types or not isinstance(value, self.types):
            words = {"str": "a string", "int": "an integer", "float": "a number", "dict": "a table", "bool": "true or false",
                     "list": "a list"}
            raise SettingsError(f"{where}: {key} must be " + " or ".join(words[t.__name__] for t in self.types)
                                + (f" or {' or '.join(self.keywords)}" if self.keywords else "") + f", got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise SettingsError(f"{where}: {key} must be a finite number, got {value!r}")
            problem = bounds_problem(value, self.min, self.max)
            if problem:
                raise SettingsError(f"{where}: {key}={value!r} {problem}")
            if float in self.types and int in self.types:
                value = float(value) if isinstance(value, float) or self.types[0] is float else value
        if self.choices is not None and value not in self.choices:
            raise SettingsError(f"{where}: {key} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        return value


def read_profile(path: str | Path, what: str) -> dict:
    """The settings of a TOML profile file (checked by the caller)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"{what} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{what} {path}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{what} {path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise SettingsError(f"{what} {path}: nested too deeply to be a settings file") from None


WORKERS_PER_CORE = 4  # local workers: more than this many training processes per CPU core are refused


def cores() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_local_workers(workers: int, devices: list[str]) -> list[str]:
    """``workers`` training processes of this machine on ``devices`` (round-robin): more than
    :data:`WORKERS_PER_CORE` per CPU core is refused (each is a process that loads its data and steps its
    optimiser on the CPU, whatever its device: the machine would thrash, not train faster); more CPU workers
    than cores, or more workers than the GPUs listed, is warned about (they share the cores, or a GPU's
    memory). Returns the warning lines."""
    n = cores()
    if workers > WORKERS_PER_CORE * n:
        raise SettingsError(f"--workers {workers}: more than {WORKERS_PER_CORE} training processes per CPU core of this "
                            f"machine ({n} core(s): at most {WORKERS_PER_CORE * n}); use fewer, or an executor that "
                            "spreads runs over machines (--executor slurm | ray)")
    per_device = Counter(devices[w % len(devices)] for w in range(workers)) if devices else Counter()
    on_cpu = sum(k for d, k in per_device.items() if d.split(":")[0] == "cpu")
    shared = {d: k for d, k in per_device.items() if d.split(":")[0] != "cpu" and k > 1}
    out = []
    if on_cpu > n:
        out.append(f"--workers {workers}: {on_cpu} CPU workers on {n} CPU core(s) share the cores (one torch thread "
                   f"each), so the sweep is no faster than with {n}")
    if shared:
        out.append(f"--workers {workers} on {len(per_device)} device(s): " + ", ".join(
            f"{k} workers share {d}" for d, k in sorted(shared.items())) + "; a run that fits the device's memory "
            "alone may not fit beside the others")
    return out


GENERIC_FLAGS = {"gpus_per_node": "--gpus-per-node", "cpus_per_task": "--cpus-per-task", "mem_gb": "--mem-gb",
                 "timeout_min": "--timeout-min", "max_retries": "--max-retries", "workers": "--workers",
                 "devices": "--devices"}


class ExecutorPlugin:
    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    # the executor's own settings (the keys of [executor.<name>], --executor-set, a profile) -> their declaration
    settings: ClassVar[dict[str, Setting]] = {}
    # the sweep's generic executor settings this executor honours -> its own setting of the same meaning
    generic: ClassVar[dict[str, str]] = {}
    # whether the executor trains fused groups of runs (``peftbench run --fuse K``, docs/fused.md)
    fuses: ClassVar[bool] = False
    requires: ClassVar[str] = ""  # the module it needs (checked with the trackers' before anything is planned)
    extra: ClassVar[str] = ""  # the pip extra that installs it: pip install peftbench[<extra>]

    def configure(self, table: dict, generic: dict, where: Callable[[str], str]) -> dict:
        """This executor's settings as plain data (TOML-writable: they go into the resolved sweep file): a
        ``profile`` file < ``table`` (``[executor.<name>]``) < ``generic`` (the sweep's generic settings,
        translated). ``where(key)`` names the file and line of a key of ``table``. Every value is checked here,
        before any compute; :meth:`resolve` adds what depends on several of them."""
        table = dict(table or {})
        values: dict[str, Any] = {}
        profile = table.pop("profile", None)
        if profile is not None:
            if not isinstance(profile, str):
                raise SettingsError(f"{where('profile')}: profile must be the path of a TOML file of "
                                    f"{self.name!r} settings")
            for k, v in read_profile(profile, "--executor-profile").items():
                values[k] = self._check(k, v, f"profile {profile}")
        for k, v in table.items():
            values[k] = self._check(k, v, where(k))
        for g, v in generic.items():
            if g not in self.generic:
                honoured = ", ".join(GENERIC_FLAGS[x] for x in sorted(self.generic)) or "none"
                raise SettingsError(f"{GENERIC_FLAGS.get(g, g)} (executor setting {g!r}): executor {self.name!r} does "
                                    f"not take it (its generic settings: {honoured})")
            own = self.generic[g]
            values[own] = self._check(own, v, GENERIC_FLAGS.get(g, g))
        return self.resolve(values)

    def _check(self, key: str, value: Any, where: str) -> Any:
        if key not in self.settings:
            raise SettingsError(f"{where}: executor {self.name!r} has no setting {key!r}"
                                + (f" (its settings: {', '.join(sorted(self.settings))})" if self.settings else ""))
        return self.settings[key].check(key, value, where)

    def resolve(self, values: dict) -> dict:
        """The complete settings from the given ones (defaults added, combinations checked); by default the
        given ones."""
        return dict(values)

    def check_workers(self, settings: dict, device: str) -> list[str]:
        """Whether the workers ``settings`` ask for fit what they run on (``device``: the sweep's device): an
        impossible request raises a one-line :class:`~peftbench.errors.SettingsError`, a wasteful one returns
        warning lines; before any compute. By default an executor that takes the generic ``devices`` setting runs
        its workers as processes of this machine on those devices (the local executor), and its ``workers`` are
        bounded by them (:func:`check_local_workers`); other executors' workers run elsewhere (SLURM array
        tasks, Ray tasks) and are not checked here."""
        if "devices" not in self.generic:
            return []
        devices = settings.get(self.generic["devices"]) or [device]
        workers = settings.get(self.generic.get("workers", "workers")) or 1
        return check_local_workers(max(int(workers), len(devices)), list(devices))

    def make(self, settings: dict, *, env: "Env", runs_dir: Path, total: int) -> Any:
        """The executor for ``settings`` (from :meth:`configure`)."""
        raise NotImplementedError

    def status(self, runs_dir: Path, runs: dict[str, dict], query: bool) -> dict:
        """What ``peftbench status`` shows of this executor for ``runs_dir``: updates ``runs`` (key ->
        the run's status entry: ``status``, ``job``, ...) in place and returns lines about the executor
        itself (``{"driver": ..., "notes": [...]}``); by default nothing."""
        return {}


EXECUTORS: Registry[ExecutorPlugin]
EXECUTORS, register_executor = instance_registry("executor", ExecutorPlugin, builtin="peftbench.executors",
                                                 group="peftbench.executors", article="an")
