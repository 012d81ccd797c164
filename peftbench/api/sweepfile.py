"""Sweep files: a sweep as TOML (docs/sweep-files.md has every key).

What a sweep file may hold is :class:`peftbench.api.schema.Sweep`'s declarations: each field's key, its table
(top level, ``[search]``, ``[executor]``, ``[tracking]``), its kind and bounds. ``load_sweep(path)`` reads and
checks a file against them: an unknown key, a value of the wrong type or out of bounds, an unknown name
(method, suite, task, protocol, executor, tracker) or an option a method does not have is a
:class:`~peftbench.errors.SettingsError` naming the file and the line (``sweep.toml:7: ...``), before any
compute. Values are read with the standard library's ``tomllib``; since it keeps no positions,
:func:`key_lines` finds the line of each key in the text. ``dump_sweep`` writes one with ``tomlkit`` (the
resolved sweep that ``peftbench run`` keeps in ``<runs-dir>/sweeps/``).
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from .._io import tomllib as _tomllib_module
from ..errors import PeftbenchError, SettingsError
from . import schema
from .schema import Sweep, format_value

TABLES = ("search", "executor", "tracking")  # the tables whose keys are declared fields


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


def _declared() -> dict[tuple[str, str], str]:
    """(table, key) -> field name of every declared field a file may hold."""
    out = {}
    for f in schema.fields():
        key = schema.key_of(f.name)
        s = schema.spec(f.name)
        if key is not None and s.kind != "table":
            out[(s.table, key)] = f.name
    return out


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


def _unknown(at: str, key: str, known: list[str], where: str) -> SettingsError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return SettingsError(f"{at}: unknown key {key!r} in {where}.{hint} Known keys: {', '.join(sorted(known))} "
                         "(docs/sweep-files.md)")


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file (see the module docstring); relative paths in it are relative to the
    file's folder."""
    tomllib = _tomllib_module()
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
    except RecursionError:
        raise SettingsError(f"{path}: nested too deeply to be a sweep file") from None
    at = lambda *key: locate(path, tuple(key))  # noqa: E731
    declared = _declared()
    values: dict[str, Any] = {}

    def take(table: str, key: str, value: Any) -> None:
        name = declared[(table, key)]
        if schema.spec(name).kind == "path":
            if not isinstance(value, str):
                raise SettingsError(f"{at(*([table] if table else []), key)}: {key} must be a path, got {value!r}")
            value = str(path.parent / Path(value).expanduser())
        values[name] = schema.check(name, value, f"{at(*([table] if table else []), key)}: {key}")

    top_keys = [k for (t, k) in declared if t == ""]
    for key, value in data.items():
        if key in TABLES or key == "options":
            if not isinstance(value, dict):
                raise SettingsError(f"{at(key)}: {key} must be a table ([{key}])")
            continue
        if ("", key) not in declared:
            raise _unknown(at(key), key, top_keys + [*TABLES, "options"], "the sweep file")
        take("", key, value)

    # [search] and the generic keys of [executor] and [tracking]; sub-tables of the last two are per plugin
    subtables: dict[str, dict[str, dict]] = {"executor": {}, "tracking": {}}
    for table in TABLES:
        known = [k for (t, k) in declared if t == table]
        for key, value in (data.get(table) or {}).items():
            if isinstance(value, dict) and table in subtables:
                subtables[table][key] = value
                continue
            if (table, key) not in declared:
                raise _unknown(at(table, key), key, known + (["<name> tables"] if table in subtables else []),
                               f"[{table}]")
            take(table, key, value)

    values.setdefault("name", path.stem)
    sweep = Sweep(source=str(path), **values)
    from ..executors import EXECUTORS
    from ..trackers import TRACKERS

    tables = {}
    for key, value in subtables["executor"].items():
        try:
            plugin_name = EXECUTORS.canonical(key)
        except PeftbenchError as exc:
            raise SettingsError(f"{at('executor', key)}: [executor.{key}]: {exc}") from None
        tables[plugin_name] = (key, dict(value))
    if "executor" not in values and len(tables) == 1:
        sweep.executor = next(iter(tables))  # [executor.slurm] alone says which executor
    elif "executor" not in values and tables:
        raise SettingsError(f"{at('executor')}: several [executor.<name>] tables: say which executor runs the "
                            "sweep with name = ...")
    for plugin_name, (key, value) in tables.items():
        if plugin_name != sweep.executor:
            raise SettingsError(f"{at('executor', key)}: [executor.{key}] given, but the executor is {sweep.executor!r}")
        plugin = EXECUTORS.get(plugin_name)
        for k in value:
            if k != "profile" and k not in plugin.settings:
                raise SettingsError(f"{at('executor', key, k)}: executor {plugin_name!r} has no setting {k!r}"
                                    + (f" (its settings: {', '.join(sorted(plugin.settings))})" if plugin.settings else ""))
        sweep.executor_settings[plugin_name] = value
    for key, value in subtables["tracking"].items():
        try:
            t = TRACKERS.canonical(key)
        except PeftbenchError as exc:
            raise SettingsError(f"{at('tracking', key)}: [tracking.{key}]: {exc}") from None
        known = TRACKERS.get(t).options
        for k in value:
            if k not in known:
                raise SettingsError(f"{at('tracking', key, k)}: tracker {t!r} has no setting {k!r} (its settings: "
                                    f"{', '.join(sorted(known)) or 'none'})")
        sweep.tracker_settings[t] = dict(value)

    # [options] and [options.<method>]
    from ..methods import get_method

    methods = {m: get_method(m) for m in sweep.methods}
    for key, value in (data.get("options") or {}).items():
        if isinstance(value, dict):
            try:
                m = get_method(key)
            except PeftbenchError as exc:
                raise SettingsError(f"{at('options', key)}: [options.{key}]: {exc}") from None
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
    """``sweep`` as a sweep file (every field that is set and not its default; ``load_sweep`` reads it back)."""
    import tomlkit

    doc = tomlkit.document()
    for line in header.splitlines():
        doc.add(tomlkit.comment(line.lstrip("# ").rstrip()))
    tables: dict[str, Any] = {t: tomlkit.table() for t in TABLES}
    for f in schema.fields():
        key, s = schema.key_of(f.name), schema.spec(f.name)
        if key is None or s.kind == "table":
            continue
        value = getattr(sweep, f.name)
        if value is None or (value == f.default and f.name != "executor") or (value == [] and f.name == "trackers"):
            continue
        (tables[s.table] if s.table else doc).add(key, value)
    if sweep.options or sweep.sets:
        options = merged_options(sweep)
        t = tomlkit.table()
        for k, v in (options.get("*") or {}).items():
            t.add(k, v)
        for m, table in options.items():
            if m != "*":
                t.add(m, dict(table))
        doc.add("options", t)
    for name, settings in sweep.executor_settings.items():
        tables["executor"].add(name, {k: v for k, v in settings.items() if v is not None})
    for name, settings in sweep.tracker_settings.items():
        tables["tracking"].add(name, dict(settings))
    for t in TABLES:
        if len(tables[t]):
            doc.add(t, tables[t])
    return tomlkit.dumps(doc)


__all__ = ["Sweep", "load_sweep", "dump_sweep", "merged_options", "locate", "key_lines", "format_value"]
