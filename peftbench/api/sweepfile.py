"""Sweep files: a sweep as TOML (docs/sweep-files.md has every key).

``load_sweep(path)`` reads and checks one: an unknown key, a value of the wrong type, an unknown name
(method, suite, task, protocol, executor, tracker) or an option a method does not have is a
:class:`~peftbench.errors.SettingsError` naming the file and the line (``sweep.toml:7: ...``), before
any compute. Values are read with the standard library's ``tomllib``; since it keeps no positions,
:func:`key_lines` finds the line of each key in the text. ``dump_sweep`` writes one with ``tomlkit``
(the resolved sweep that ``peftbench run`` keeps in ``<runs-dir>/sweeps/``).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PeftbenchError, SettingsError

OVERRIDE_KEYS = {"lr": "lr_grid", "wd": "wd_grid", "epochs": "epochs", "batch_size": "batch_size"}


@dataclass
class Sweep:
    """A sweep: methods × tasks under a protocol, where its runs happen and who watches them.

    Every field has the meaning of the ``peftbench run`` flag of the same name (docs/sweep-files.md has
    each key of the sweep file, which holds the same fields). ``options``: method options, ``{"*": {option:
    value}}`` for every selected method that has the option and ``{method: {option: value}}`` for one;
    ``search``: ``lr`` and ``wd`` (lists: they replace the search grid), ``epochs``, ``batch_size``,
    ``kind`` (grid | halving), ``halving_rungs``, ``halving_factor`` (docs/sweeps.md);
    ``executor_settings`` / ``tracker_settings``: ``{name: {key: value}}``."""

    methods: list[str] = field(default_factory=list)
    suite: str = "demo"
    tasks: list[str] | None = None
    protocol: str | None = None
    seeds: list[int] | None = None
    num_seeds: int | None = None
    backbone: str | None = None
    checkpoint: str | None = None
    data_root: str | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    precision: str | None = None
    verify_data: bool = True
    runs_dir: str = "runs"
    device: str | None = None
    executor: str = "local"
    executor_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    trackers: list[str] = field(default_factory=list)
    tracker_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    name: str | None = None  # groups the tracker runs; names the resolved sweep file (default: from the runs)
    sets: list[str] = field(default_factory=list)  # "--set [method.]option=value" strings, after ``options``
    source: str | None = None  # the sweep file it was read from

    def replace(self, **changes) -> "Sweep":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_file(cls, path: str | Path) -> "Sweep":
        """Read a sweep file (TOML, docs/sweep-files.md); errors name the file and line."""
        return load_sweep(path)

    def to_toml(self, header: str = "") -> str:
        """This sweep as a sweep file."""
        return dump_sweep(self, header)

    def all_sets(self) -> list[str]:
        out = []
        for scope, table in self.options.items():
            for key, value in table.items():
                out.append(f"{'' if scope == '*' else scope + '.'}{key}={format_value(value)}")
        return out + list(self.sets)

    def settings(self, device: str = "cpu"):
        """The :class:`peftbench.sweep.plan.SweepSettings` this sweep plans with."""
        from ..sweep.plan import SweepSettings

        unknown = sorted(set(self.search) - set(OVERRIDE_KEYS) - set(SEARCH_STRATEGY_KEYS))
        if unknown:
            known = ", ".join([*OVERRIDE_KEYS, *SEARCH_STRATEGY_KEYS])
            raise SettingsError(f"search: unknown key {unknown[0]!r} (known: {known})")
        overrides = {OVERRIDE_KEYS[k]: (tuple(v) if k in ("lr", "wd") and isinstance(v, (list, tuple)) else
                                        (v,) if k in ("lr", "wd") else v) for k, v in self.search.items()
                     if v is not None and k in OVERRIDE_KEYS}
        return SweepSettings(methods=list(self.methods), suite=self.suite, tasks=list(self.tasks) if self.tasks else None,
                             protocol=self.protocol, seeds=list(self.seeds) if self.seeds else None,
                             num_seeds=self.num_seeds, backbone=self.backbone, checkpoint=self.checkpoint,
                             data_root=self.data_root, sets=self.all_sets(), verify_data=self.verify_data,
                             overrides=overrides, precision=self.precision, device=device,
                             search=self.search_strategy())

    def search_strategy(self):
        """The :class:`peftbench.sweep.search.Search` of ``search.kind`` / ``halving_rungs`` / ``halving_factor``
        (halving settings without ``kind = "halving"`` are an error)."""
        from ..sweep.search import DEFAULT_FACTOR, DEFAULT_RUNGS, Search

        kind = self.search.get("kind") or "grid"
        rungs, factor = self.search.get("halving_rungs"), self.search.get("halving_factor")
        if kind != "halving":
            given = [f"--{k.replace('_', '-')}" for k, v in (("halving_rungs", rungs), ("halving_factor", factor))
                     if v is not None]
            if given:
                raise SettingsError(f"{', '.join(given)} (search.halving_*) only apply with --search halving")
        if isinstance(factor, list):
            factor = factor[0] if len(factor) == 1 else factor
        return Search(kind, tuple(rungs) if rungs is not None else DEFAULT_RUNGS,
                      factor if factor is not None else DEFAULT_FACTOR).check()


def format_value(v: Any) -> str:
    """A sweep file's (or Python) value as a ``--set`` string."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(format_value(x) for x in v)
    return str(v)



def merged_options(sweep: Sweep) -> dict:
    """``options`` with the ``--set`` strings folded in (the resolved file has no --set)."""
    out = {k: dict(v) for k, v in sweep.options.items()}
    for item in sweep.sets:
        if "=" not in item:
            raise SettingsError(f"--set {item!r}: expected [method.]option=value")
        key, value = (x.strip() for x in item.split("=", 1))
        scope, _, opt = key.rpartition(".")
        if scope:
            from ..methods import get_method

            scope = get_method(scope).name
        out.setdefault(scope or "*", {})[opt] = value
    return out



PRECISIONS = ("fp32", "tf32", "bf16", "fp16")

# key: (kind, help). Kinds: str, int, bool, names (list of strings), ints, numbers (a number or a list)
TOP_KEYS: dict[str, tuple[str, str]] = {
    "name": ("str", "the sweep's name: groups its tracker runs, names <runs-dir>/sweeps/<name>.toml "
                    "(default: the file's name)"),
    "methods": ("names", "methods to run (peftbench list methods)"),
    "suite": ("str", "task suite: demo, vtab, fgvc (default demo)"),
    "tasks": ("names", "a subset of the suite's tasks (default: all)"),
    "protocol": ("str", "vpt | fixed | demo (default: the suite's)"),
    "seeds": ("ints", "seeds of the final runs"),
    "num_seeds": ("int", "number of final seeds (instead of seeds)"),
    "backbone": ("str", "timm model name with its tag, or a preset (default: the suite's)"),
    "checkpoint": ("str", "local backbone weights: .npz, .safetensors or .pth"),
    "data_root": ("str", "data folder (default: $PEFTBENCH_DATA, or ~/.cache/peftbench/data for the demo)"),
    "precision": ("str", "fp32 | tf32 | bf16 | fp16 (default: the protocol's)"),
    "verify_data": ("bool", "verify the data before the sweep (default true)"),
    "runs_dir": ("str", "the run store (default ./runs)"),
    "device": ("str", "cpu | cuda | cuda:N (default: cuda when available)"),
}
TABLES = {"options": "method options: [options] for every selected method that has the option, "
                     "[options.<method>] for one method",
          "search": "hyper-parameters: lr and wd (lists: they replace the search grid), epochs, batch_size; "
                    "kind = grid | halving, halving_rungs, halving_factor (docs/sweeps.md)",
          "executor": "name = local | slurm | ray, and [executor.<name>] with that executor's settings",
          "tracking": "trackers = [...] and [tracking.<tracker>] with a tracker's settings"}
SEARCH_KEYS = {"lr": ("numbers", "base learning rate(s): replace the search grid"),
               "wd": ("numbers", "weight decay value(s): replace the search grid"),
               "epochs": ("int", "number of epochs"), "batch_size": ("int", "batch size"),
               "kind": ("str", "how a search stage picks its point: grid (default) or halving (docs/sweeps.md)"),
               "halving_rungs": ("numbers", "halving: the rungs as fractions of the epochs, increasing, the last 1"),
               "halving_factor": ("numbers", "halving: keep the best 1/factor of the configurations after each rung")}
SEARCH_STRATEGY_KEYS = ("kind", "halving_rungs", "halving_factor")
PATH_KEYS = ("checkpoint", "data_root", "runs_dir")


def _tomllib():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib


# ---------------------------------------------------------------------------------------------
# lines of keys
# ---------------------------------------------------------------------------------------------

_BARE = r'[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\''
_KEY = rf'(?:{_BARE})(?:\s*\.\s*(?:{_BARE}))*'


def _split_key(text: str) -> tuple[str, ...]:
    return tuple(p.strip('"\'') for p in re.findall(_BARE, text))


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The line (1-based) of every key and table header of a TOML text: ``("executor", "slurm",
    "partition") -> 12``. Keys of inline tables are on their parent's line."""
    out: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    close = None  # the end of a multi-line string we are in
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if close:
            if close in line:
                close = None
            continue
        if not line or line.startswith("#"):
            continue
        m = re.match(rf"^\[\[?\s*({_KEY})\s*\]\]?", line)
        if m:
            table = _split_key(m.group(1))
            out.setdefault(table, no)
            continue
        m = re.match(rf"^({_KEY})\s*=(.*)$", line)
        if not m:
            continue
        key = table + _split_key(m.group(1))
        for i in range(len(table) + 1, len(key) + 1):
            out.setdefault(key[:i], no)
        rest = m.group(2)
        for inner in re.finditer(rf"[{{,]\s*({_KEY})\s*=", rest):  # inline table keys: same line
            out.setdefault(key + _split_key(inner.group(1)), no)
        for q in ('"""', "'''"):
            if rest.count(q) % 2 == 1:
                close = q
    return out


_CACHE: dict[str, tuple[float, dict]] = {}


def locate(source: str | Path, key: tuple[str, ...]) -> str:
    """``<file>:<line>`` of ``key`` (or of its nearest enclosing table), for error messages."""
    path = Path(source)
    try:
        mtime = path.stat().st_mtime
        if str(path) not in _CACHE or _CACHE[str(path)][0] != mtime:
            _CACHE[str(path)] = (mtime, key_lines(path.read_text(encoding="utf-8")))
        lines = _CACHE[str(path)][1]
    except OSError:
        return str(path)
    for n in range(len(key), 0, -1):
        if key[:n] in lines:
            return f"{path}:{lines[key[:n]]}"
    return str(path)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def _check(kind: str, value: Any, at: str, key: str) -> Any:
    def bad(want: str):
        return SettingsError(f"{at}: {key} must be {want}, got {value!r}")

    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind == "names":
        if isinstance(value, str):
            from ..tasks import parse_names

            value = parse_names(value)
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise bad("a list of names")
    elif kind == "ints":
        if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise bad("a list of integers")
    elif kind == "numbers":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not value or \
                not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            raise bad("a number or a list of numbers")
        value = [float(x) for x in value]
    return value


def _name(get, value: str, at: str, key: str) -> str:
    try:
        return get(value)
    except PeftbenchError as exc:
        raise SettingsError(f"{at}: {key}: {exc}") from None


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file (see the module docstring); relative paths in it are relative to
    the file's folder."""
    tomllib = _tomllib()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"--config {path}: cannot read it ({exc})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        line = m.group(1) if m else (str(len(text.splitlines()) or 1) if "end of document" in str(exc) else "")
        raise SettingsError(f"{path}{':' + line if line else ''}: not valid TOML ({exc})") from None
    at = lambda *key: locate(path, tuple(key))  # noqa: E731
    from ..executors import EXECUTORS
    from ..methods import get_method
    from ..sweep.protocols import get_protocol
    from ..tasks import get_suite, get_task
    from ..trackers import TRACKERS

    sweep = Sweep(source=str(path), name=path.stem)
    for key, value in data.items():
        if key in TABLES:
            if not isinstance(value, dict):
                raise SettingsError(f"{at(key)}: {key} must be a table ([{key}])")
            continue
        if key not in TOP_KEYS:
            raise SettingsError(f"{at(key)}: unknown key {key!r} (known keys: "
                                f"{', '.join(sorted([*TOP_KEYS, *TABLES]))}; docs/sweep-files.md)")
        value = _check(TOP_KEYS[key][0], value, at(key), key)
        if key in PATH_KEYS:
            value = str((path.parent / Path(value).expanduser()))
        setattr(sweep, key, value)
    sweep.methods = [_name(lambda n: get_method(n).name, m, at("methods"), "methods") for m in sweep.methods]
    sweep.suite = _name(lambda n: get_suite(n).name, sweep.suite, at("suite"), "suite")
    if sweep.tasks is not None:
        sweep.tasks = [_name(lambda n: get_task(n).name, t, at("tasks"), "tasks") for t in sweep.tasks]
    if sweep.protocol is not None:
        sweep.protocol = _name(lambda n: get_protocol(n).name, sweep.protocol, at("protocol"), "protocol")
    if sweep.precision is not None and sweep.precision not in PRECISIONS:
        raise SettingsError(f"{at('precision')}: precision must be one of {', '.join(PRECISIONS)}, got {sweep.precision!r}")
    if sweep.seeds is not None and sweep.num_seeds is not None:
        raise SettingsError(f"{at('num_seeds')}: give seeds or num_seeds, not both")

    # [search]
    for key, value in (data.get("search") or {}).items():
        if key not in SEARCH_KEYS:
            raise SettingsError(f"{at('search', key)}: unknown key {key!r} in [search] (known: {', '.join(SEARCH_KEYS)})")
        value = _check(SEARCH_KEYS[key][0], value, at("search", key), f"search.{key}")
        if key in ("lr", "wd") and any(not v >= 0 for v in value):
            raise SettingsError(f"{at('search', key)}: search.{key} must not be negative, got {value!r}")
        if key == "kind" and value not in ("grid", "halving"):
            raise SettingsError(f"{at('search', key)}: search.kind must be grid or halving, got {value!r}")
        if key == "halving_factor":
            if len(value) != 1:
                raise SettingsError(f"{at('search', key)}: search.halving_factor must be one number, got {value!r}")
            value = value[0]
        if key in ("epochs", "batch_size") and value < 1:
            raise SettingsError(f"{at('search', key)}: search.{key} must be >= 1, got {value!r}")
        sweep.search[key] = value

    # [options] and [options.<method>]
    methods = {get_method(m).name: get_method(m) for m in sweep.methods}
    for key, value in (data.get("options") or {}).items():
        if isinstance(value, dict):
            m = _name(get_method, key, at("options", key), f"[options.{key}]")
            if m.name not in methods:
                raise SettingsError(f"{at('options', key)}: [options.{key}]: method {m.name!r} is not in methods")
            for opt, v in value.items():
                _option(m, opt, v, at("options", key, opt))
                sweep.options.setdefault(m.name, {})[opt] = v
        else:
            owners = [m for m in methods.values() if key in m.options]
            if not owners:
                raise SettingsError(f"{at('options', key)}: none of the methods has an option {key!r}")
            for m in owners:
                _option(m, key, value, at("options", key))
            sweep.options.setdefault("*", {})[key] = value

    # [executor]
    ex = dict(data.get("executor") or {})
    name = ex.pop("name", None)
    if name is not None:
        _check("str", name, at("executor", "name"), "executor.name")
        sweep.executor = _name(EXECUTORS.canonical, name, at("executor", "name"), "executor.name")
    tables = {}
    for key, value in ex.items():
        if not isinstance(value, dict):
            raise SettingsError(f"{at('executor', key)}: unknown key {key!r} in [executor] (it takes name = ... and "
                                f"[executor.<name>] tables of settings)")
        plugin_name = _name(EXECUTORS.canonical, key, at("executor", key), f"[executor.{key}]")
        keys = EXECUTORS.get(plugin_name).settings_keys
        for k in value:
            if k not in keys:
                raise SettingsError(f"{at('executor', key, k)}: executor {plugin_name!r} has no setting {k!r}"
                                    + (f" (its settings: {', '.join(sorted(keys))})" if keys else ""))
        tables[plugin_name] = (key, dict(value))
    if name is None and len(tables) == 1:
        sweep.executor = next(iter(tables))  # [executor.slurm] alone says which executor
    elif name is None and tables:
        raise SettingsError(f"{at('executor')}: several [executor.<name>] tables: say which executor runs the "
                            "sweep with name = ...")
    for plugin_name, (key, value) in tables.items():
        if plugin_name != sweep.executor:
            raise SettingsError(f"{at('executor', key)}: [executor.{key}] given, but the executor is {sweep.executor!r}")
        sweep.executor_settings[plugin_name] = value

    # [tracking]
    tr = dict(data.get("tracking") or {})
    names = tr.pop("trackers", [])
    names = _check("names", names, at("tracking", "trackers"), "tracking.trackers")
    sweep.trackers = [_name(TRACKERS.canonical, n, at("tracking", "trackers"), "tracking.trackers") for n in names]
    for key, value in tr.items():
        if not isinstance(value, dict):
            raise SettingsError(f"{at('tracking', key)}: unknown key {key!r} in [tracking] (it takes trackers = [...] "
                                "and [tracking.<tracker>] tables of settings)")
        t = _name(TRACKERS.canonical, key, at("tracking", key), f"[tracking.{key}]")
        known = TRACKERS.get(t).options
        for k in value:
            if k not in known:
                raise SettingsError(f"{at('tracking', key, k)}: tracker {t!r} has no setting {k!r} (its settings: "
                                    f"{', '.join(sorted(known)) or 'none'})")
        sweep.tracker_settings[t] = dict(value)
    return sweep


def _option(method, key: str, value: Any, at: str) -> None:
    if key not in method.options:
        raise SettingsError(f"{at}: method {method.name!r} has no option {key!r} "
                            f"(its options: {', '.join(sorted(method.options)) or 'none'})")
    if isinstance(value, (dict, list)):
        raise SettingsError(f"{at}: option {key!r} must be a number, a string or true/false, got {value!r}")
    try:
        method.parse_options({key: format_value(value)})
    except PeftbenchError as exc:
        raise SettingsError(f"{at}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def dump_sweep(sweep: Sweep, header: str = "") -> str:
    """``sweep`` as a sweep file (every field that is set; ``load_sweep`` reads it back)."""
    import tomlkit

    doc = tomlkit.document()
    for line in header.splitlines():
        doc.add(tomlkit.comment(line.lstrip("# ").rstrip()))
    for key in TOP_KEYS:
        value = getattr(sweep, key)
        if value is None or (key == "verify_data" and value is True):
            continue
        doc.add(key, value)
    if sweep.options or sweep.sets:
        options = merged_options(sweep)
        t = tomlkit.table()
        for k, v in (options.get("*") or {}).items():
            t.add(k, v)
        for m, table in options.items():
            if m != "*":
                t.add(m, dict(table))
        doc.add("options", t)
    if sweep.search:
        doc.add("search", {k: v for k, v in sweep.search.items() if v is not None})
    ex = tomlkit.table()
    ex.add("name", sweep.executor)
    for name, settings in sweep.executor_settings.items():
        ex.add(name, {k: v for k, v in settings.items() if v is not None})
    doc.add("executor", ex)
    if sweep.trackers or sweep.tracker_settings:
        tr = tomlkit.table()
        tr.add("trackers", list(sweep.trackers))
        for name, settings in sweep.tracker_settings.items():
            tr.add(name, dict(settings))
        doc.add("tracking", tr)
    return tomlkit.dumps(doc)
