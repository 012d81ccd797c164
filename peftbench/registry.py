"""Name registries for methods, tasks and suites.

Built-in plugins live in ``peftbench.methods`` / ``peftbench.tasks`` (the ``methods/`` and ``tasks/``
folders of the repository) and register themselves when imported. Third-party packages add entries
through the entry-point groups ``peftbench.methods`` and ``peftbench.tasks``: the entry point may name
a module (imported, so that its decorators run) or an object (a :class:`~peftbench.method.Method`
subclass, or a :class:`~peftbench.task.Task`), which is registered directly.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
from typing import Callable, Generic, Iterable, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown method, task or suite name. Its message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str, loader: Callable[[], None] | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}  # normalised name -> item
        self._display: dict[str, str] = {}  # normalised name -> the name as registered
        self._aliases: dict[str, str] = {}  # normalised alias -> normalised name
        self._loader = loader
        self._loaded = False

    # -- registration -------------------------------------------------------------------------
    def add(self, name: str, item: T, aliases: Iterable[str] = ()) -> T:
        key = self._norm(name)
        if key in self._items or key in self._aliases:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[key] = item
        self._display[key] = name
        for alias in aliases:
            a = self._norm(alias)
            if a == key:
                continue
            if a in self._items or (a in self._aliases and self._aliases[a] != key):
                raise ValueError(f"{self.kind} alias {alias!r} collides with an existing name")
            self._aliases[a] = key
        return item

    # -- lookup -------------------------------------------------------------------------------
    @staticmethod
    def _norm(name: str) -> str:
        return name.strip().lower().replace("_", "-")

    def _ensure_loaded(self) -> None:
        if not self._loaded and self._loader is not None:
            self._loaded = True
            self._loader()

    def canonical(self, name: str) -> str:
        """The registered name of ``name`` (an alias, or a spelling with '-' for '_' or other case)."""
        return self._display[self._key(name)]

    def _key(self, name: str) -> str:
        self._ensure_loaded()
        key = self._norm(name)
        key = self._aliases.get(key, key)
        if key not in self._items:
            known = sorted(self._display.values())
            close = difflib.get_close_matches(key, sorted(self._items) + sorted(self._aliases), n=1, cutoff=0.5)
            hint = f" Did you mean {self._display[self._aliases.get(close[0], close[0])]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(known)}"
            )
        return key

    def get(self, name: str) -> T:
        return self._items[self._key(name)]

    def __contains__(self, name: str) -> bool:
        try:
            self.canonical(name)
            return True
        except UnknownNameError:
            return False

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._display.values())

    def items(self) -> list[tuple[str, T]]:
        self._ensure_loaded()
        return sorted(((self._display[k], v) for k, v in self._items.items()), key=lambda kv: kv[0])

    def aliases_of(self, name: str) -> list[str]:
        key = self._key(name)
        return sorted(a for a, k in self._aliases.items() if k == key)


def load_entry_points(group: str, register_object: Callable[[object], None]) -> None:
    """Import every entry point of ``group``; objects that are not modules go to ``register_object``."""
    for ep in importlib.metadata.entry_points(group=group):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken third-party plugin must say which one it is
            raise RuntimeError(f"entry point {ep.name!r} ({ep.value}) in group {group!r} failed to load: {exc}") from exc
        if not isinstance(obj, type(importlib)):
            register_object(obj)


def import_builtin(package: str) -> None:
    """Import every module of a built-in plugin package so that its registrations run."""
    import pkgutil

    pkg = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
