"""One registry class for every extension point: methods, tasks, suites, protocols, data layouts,
transforms, executors, leaderboard columns, backbones, trackers, optimisers, epoch samplers.

A registry maps names (and aliases) to items. Lookups are forgiving about spelling (case, ``_`` vs
``-``) and an unknown name gets a "did you mean" and the list of known names. Built-in items live in
a package whose modules register themselves when imported (``builtin``); third-party packages add
items through an entry-point group (``group``, e.g. ``peftbench.methods``): the entry point names a
module (imported, so that its decorators run) or an object, which the registry's ``register_object``
adds. Both are loaded lazily, on the first lookup.

Plugins that misbehave never break the commands that do not need them:

* an entry point that fails to import is reported once on stderr and skipped; asking for a name it
  provides is a :class:`~peftbench.errors.PluginError` that says why it failed;
* two providers of one name (or alias, in any spelling): registering the second raises
  :class:`NameClash` (a ``PluginError`` naming both providers). A clash that comes from an entry
  point is reported once and recorded: the name is then unusable until one is removed, and asking
  for it is that error;
* a name or alias that is not one safe file name (``../x``, ``a/b``, a control character, a leading
  ``.``): registering it raises :class:`UnsafeName`, one line naming it (an entry point's is reported
  and skipped like a plugin that fails to import). Names become folders and files of the run store.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import pkgutil
import sys
import types
from typing import Callable, Generic, Iterable, TypeVar, cast

from ._text import unsafe_component
from .errors import PluginError, UnknownNameError

T = TypeVar("T")


class NameClash(PluginError, ValueError):
    """A name or alias registered twice (by two different providers)."""

    def __init__(self, msg: str, keys: tuple[str, ...]):
        super().__init__(msg)
        self.keys = keys


class UnsafeName(PluginError, ValueError):
    """A name or alias that cannot become a file name (it names folders and files of the run store)."""


def normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


class Registry(Generic[T]):
    """Names -> items of one kind. ``base``: the type every item is (a subclass given to :meth:`add_object` or
    :meth:`register_class` is instantiated once); ``key``: an item's name (default its ``name``); ``check``: a
    further check of an item. An entry point of ``group`` may name a module (imported: its decorators register)
    or an object, which :meth:`add_object` type-checks and adds (``register_object`` replaces it for a group that
    registers several kinds)."""

    def __init__(self, kind: str, *, builtin: str | Iterable[str] | None = None, group: str | None = None,
                 register_object: Callable[[object, str], None] | None = None,
                 loader: Callable[[], None] | None = None, base: type | None = None,
                 key: Callable[[T], str] | None = None, check: Callable[[T], None] | None = None):
        self.kind = kind
        self.base = base
        self._key_of = key
        self._check = check
        self._items: dict[str, T] = {}  # normalised name -> item
        self._display: dict[str, str] = {}  # normalised name -> the name as registered
        self._aliases: dict[str, str] = {}  # normalised alias -> normalised name
        self._provider: dict[str, str] = {}  # normalised name -> who registered it
        self.broken: dict[str, str] = {}  # normalised plugin name -> why it could not be loaded
        self.conflicts: dict[str, str] = {}  # normalised name or alias -> the clash
        self._builtin = (builtin,) if isinstance(builtin, str) else tuple(builtin or ())
        self._group = group
        self._register_object = register_object if register_object is not None else (
            self.add_object if base is not None else None)
        self._loader = loader  # e.g. another registry's load(): suites are registered by the task plugins
        self._loaded = False

    # -- registration -------------------------------------------------------------------------
    def _norm(self, name: str) -> str:
        return normalise(name)

    def add(self, name: str, item: T, aliases: Iterable[str] = (), provider: str = "") -> T:
        """Register ``item`` under ``name`` and ``aliases``. Registering the same item again is a
        no-op; another item under a taken name or alias raises :class:`NameClash`; a name or alias that is
        not one safe file name (:func:`peftbench._text.unsafe_component`: names become folders and files of the
        run store and of the leaderboard) raises :class:`UnsafeName`."""
        provider = provider or _provider_of(item)
        aliases = tuple(aliases)
        for n, what in [(name, "name"), *((a, "alias") for a in aliases)]:
            why = unsafe_component(n)
            if why:
                raise UnsafeName(f"{self.kind} {what} {n!r} from {provider} is not usable as a file name ({why}): a "
                                 "name must be one path component without '/', '\\' or control characters, not "
                                 "starting with '.'")
        key = self._norm(name)
        taken = self._owner(key)
        if taken is not None:
            if self._items[taken] is item:
                return item
            self._conflict(key, name, provider, taken)
            return item
        clash = [a for a in aliases if self._norm(a) != key and self._owner(self._norm(a)) is not None]
        if clash:
            owner = self._owner(self._norm(clash[0]))
            assert owner is not None
            self._conflict(self._norm(clash[0]), clash[0], provider, owner, name)
            return item
        self._items[key] = item
        self._display[key] = name
        self._provider[key] = provider
        for alias in aliases:
            a = self._norm(alias)
            if a != key:
                self._aliases[a] = key
        return item

    def _owner(self, key: str) -> str | None:
        if key in self._items:
            return key
        return self._aliases.get(key)

    def _conflict(self, key: str, name: str, provider: str, owner: str, new_name: str | None = None) -> None:
        what = f"{self.kind} {name!r}" + (f" (an alias of {new_name!r})" if new_name else "")
        msg = (f"{what} from {provider} clashes with {self.kind} {self._display[owner]!r} from "
               f"{self._provider[owner]}; uninstall or rename one of them")
        raise NameClash(msg, (key, owner))

    def add_object(self, obj: object, provider: str = "") -> T:
        """Type-check ``obj`` (a subclass of ``base`` is instantiated) and add it under its name and aliases."""
        base = self.base
        if base is not None and isinstance(obj, type) and issubclass(obj, base):
            obj = obj()
        if base is not None and not isinstance(obj, base):
            article = "an" if base.__name__[0] in "AEIOU" else "a"
            group = self._group or self.kind
            raise TypeError(f"a {group} entry point must name a module or {article} {base.__name__}, got {obj!r}")
        item = cast(T, obj)
        name = self._key_of(item) if self._key_of is not None else getattr(item, "name", "")
        if not name:
            raise TypeError(f"{type(obj).__qualname__} ({provider or _provider_of(obj)}) has no name")
        if self._check is not None:
            self._check(item)
        return self.add(name, item, getattr(item, "aliases", ()) or (), provider)

    def register_class(self, cls: type) -> type:
        """Class decorator: register one instance of ``cls`` (a subclass of ``base``) under ``cls.name``."""
        if not getattr(cls, "name", ""):
            raise ValueError(f"{cls.__qualname__} has no name")
        self.add_object(cls, provider=f"module {cls.__module__}")
        return cls

    def register(self, name: str | None = None, aliases: Iterable[str] = ()):
        """Decorator: ``@REGISTRY.register("name")`` registers the decorated object."""
        def deco(obj):
            self.add(name or getattr(obj, "name"), obj, aliases or getattr(obj, "aliases", ()))
            return obj
        return deco

    # -- loading ------------------------------------------------------------------------------
    def load(self) -> None:
        """Import the built-in plugins and the entry points (once); lookups do it on demand."""
        self._ensure_loaded()

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self._loader is not None:
            self._loader()
        for package in self._builtin:
            import_builtin(package)
        if self._group:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        if not self._group:
            return
        for ep in importlib.metadata.entry_points(group=self._group):
            who = f"entry point {ep.name!r} ({ep.value}) of {_dist(ep)}"
            try:
                obj = ep.load()
                if isinstance(obj, types.ModuleType):
                    continue  # importing it ran its registrations
                if self._register_object is None:
                    self.add(ep.name, obj, provider=who)
                else:
                    self._register_object(obj, who)
            except NameClash as exc:  # two providers of a name: neither is used, both are named
                for key in exc.keys:
                    self.conflicts[key] = str(exc)
                print(f"peftbench: warning: {exc}", file=sys.stderr, flush=True)
            except Exception as exc:  # a broken third-party plugin must not break other commands
                msg = f"{who} failed to load: {type(exc).__name__}: {exc}"
                self.broken[self._norm(ep.name)] = msg
                print(f"peftbench: warning: {self.kind} plugin skipped: {msg}", file=sys.stderr, flush=True)

    # -- lookup -------------------------------------------------------------------------------
    def _key(self, name: str) -> str:
        self._ensure_loaded()
        if not isinstance(name, str):
            raise UnknownNameError(f"{self.kind} name must be a string, got {name!r}")
        key = self._norm(name)
        if key in self.conflicts:
            raise PluginError(self.conflicts[key])
        key = self._aliases.get(key, key)
        if key in self.conflicts:
            raise PluginError(self.conflicts[key])
        if key not in self._items:
            if key in self.broken:
                raise PluginError(f"{self.kind} {name!r} is not available: {self.broken[key]}")
            known = sorted(self._display.values())
            close = difflib.get_close_matches(key, sorted(self._items) + sorted(self._aliases), n=1, cutoff=0.5)
            hint = f" Did you mean {self._display[self._aliases.get(close[0], close[0])]!r}?" if close else ""
            shown = ", ".join(known) if known else "none"
            raise UnknownNameError(f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {shown}")
        return key

    def canonical(self, name: str) -> str:
        """The registered name of ``name`` (an alias, or a spelling with '-' for '_' or other case)."""
        return self._display[self._key(name)]

    def get(self, name: str) -> T:
        return self._items[self._key(name)]

    def provider(self, name: str) -> str:
        return self._provider[self._key(name)]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        self._ensure_loaded()
        key = self._norm(name)
        return self._aliases.get(key, key) in self._items

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._display.values())

    def items(self) -> list[tuple[str, T]]:
        """(name, item) pairs sorted by name."""
        self._ensure_loaded()
        return sorted(((self._display[k], v) for k, v in self._items.items()), key=lambda kv: kv[0])

    def values_in_order(self) -> list[T]:
        """The items in registration order (for registries whose order matters, e.g. columns)."""
        self._ensure_loaded()
        return list(self._items.values())

    def aliases_of(self, name: str) -> list[str]:
        """The aliases of a registered name (clashing ones included: listing never fails)."""
        self._ensure_loaded()
        key = self._norm(name)
        key = self._aliases.get(key, key)
        return sorted(a for a, k in self._aliases.items() if k == key)

    def problems(self) -> list[str]:
        """Broken plugins and name clashes (for `peftbench list`)."""
        self._ensure_loaded()
        return sorted(set(self.broken.values()) | set(self.conflicts.values()))


def instance_registry(kind: str, base: type, *, group: str, builtin: str | None = None,
                      article: str = "a") -> tuple[Registry, Callable[[type], type]]:
    """A registry of one instance per ``base`` subclass (executors, trackers, protocols) and its class
    decorator: ``Registry(kind, base=base, ...)`` and its :meth:`Registry.register_class`."""
    registry: Registry = Registry(kind, builtin=builtin, group=group, base=base)
    return registry, registry.register_class


def _provider_of(item: object) -> str:
    mod = getattr(item, "__module__", None) or getattr(type(item), "__module__", None)
    return f"module {mod}" if mod else "?"


def _dist(ep) -> str:
    dist = getattr(ep, "dist", None)
    return f"package {dist.name}" if dist is not None else "an installed package"


def import_builtin(package: str) -> None:
    """Import every public module (and sub-package) of a built-in plugin package so that its
    registrations run; modules whose name starts with ``_`` are infrastructure, not plugins."""
    pkg = importlib.import_module(package)
    if not hasattr(pkg, "__path__"):
        return
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
