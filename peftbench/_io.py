"""Atomic file writes: readers never see half a file, a failed write keeps the old one; and the one
check that a name may become a file name.

Every writer of the project goes through :func:`atomic_write`: a temporary file in the same folder,
fsync, ``os.replace``. Files get the user's umask permissions (so a group-shared run store stays
readable by the group).

Every string that becomes one component of a path and does not come from the code itself (a run
record's method, task or suite, a run key, a sweep name) goes through :func:`safe_component` first:
nothing is ever written outside the folder it is meant for (docs/reliability.md §7).
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any, Callable

from ._text import MAX_COMPONENT_BYTES, unsafe_component  # noqa: F401  (the rule lives with the text rules)
from .errors import SettingsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None], *, fsync: bool = True) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path next to ``path``, then rename it
    over ``path``. On any error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    return atomic_write(path, write, fsync=fsync)


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def safe_component(name: Any, what: str) -> str:
    """``name``, checked to be one safe file or folder name (:func:`unsafe_component`); else a one-line
    :class:`~peftbench.errors.SettingsError` naming ``what`` (the option, or the record field)."""
    why = unsafe_component(name)
    if why:
        raise SettingsError(f"{what} {name!r}: not usable as a file name ({why}); a name must be one path component "
                            "without '/', '\\' or control characters, not '.' or '..' nor starting with '.'")
    return name


def tomllib():
    """The standard library's TOML reader (``tomli`` on Python 3.10)."""
    try:
        import tomllib as lib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as lib  # type: ignore[no-redef]
    return lib


def toml_value(raw: str):
    """A TOML literal from the command line (10, 2.5, true, "x", ["a"], {a = 1}); anything else is a plain string."""
    lib = tomllib()
    try:
        return lib.loads(f"v = {raw}")["v"]
    except (lib.TOMLDecodeError, RecursionError):  # (a value nested thousands deep is no TOML literal either)
        return raw
