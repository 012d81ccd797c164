"""Which code produced a result: fingerprints of a method's code and of peftbench's training code.

A run's key says *what* was run (method, options, data, hyper-parameters, seed, ``Method.version``);
its record's ``code`` field says *which code* ran it::

    "code": {"method": "<sha of the method's code>", "engine": "<sha of the training code>"}

A fingerprint hashes, for every module it covers, the module's **dotted name** and the syntax tree of its
source with docstrings removed: comments, docstrings and formatting do not count, and neither does where
a file lives (moving a package, or installing it as a wheel instead of from a checkout, changes nothing);
any change to what the code does does.

* **engine**: what turns a spec into numbers, and nothing else (:data:`ENGINE_MODULES`): the training
  package (``peftbench.train``), the shared layers, the data loading modules, the backbones and the method
  API. Exporting, leaderboards, executors and the command line are not in it: editing them marks no run
  stale.
* **method**: the module of the method's class and of its base classes outside the core, with every module
  they import from their own package, transitively (:func:`import_closure`: a plugin's helper module
  counts; a built-in method's "own package" is ``peftbench.methods`` without the method API, which is in
  the engine).

The record of a run carries the fingerprints of the code its process loaded (:func:`loaded_fingerprint`, taken
when a sweep checks its methods); the board and ``status`` compare records with the code installed now.

A finished run whose key matches but whose ``code`` differs from the installed code is *stale*:
``peftbench run``, ``status`` and ``leaderboard`` say so, and ``peftbench run --rerun-stale`` reruns them.
Bumping ``Method.version`` changes the keys instead.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import inspect
import pkgutil
from pathlib import Path

ENGINE_MODULES = ("peftbench.train", "peftbench.layers", "peftbench.data.loader", "peftbench.data.samplers",
                  "peftbench.data.transforms", "peftbench.data.images", "peftbench.data.cache", "peftbench.data.splits",
                  "peftbench.data.layouts", "peftbench.backbones", "peftbench.methods._base", "peftbench.methods._recipes")
BUILTIN_METHODS = "peftbench.methods"  # the built-in plugin package (its ``_`` modules are the method API)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _origin(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError, AttributeError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


@functools.lru_cache(maxsize=None)
def _tree(path: str, mtime_ns: int) -> tuple[str, ast.AST | None]:
    src = Path(path).read_text(encoding="utf-8")
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return src, None
    return ast.dump(_strip_docstrings(ast.parse(src)), include_attributes=False), tree


def module_digest(module: str) -> str | None:
    """The sha256 of a module's syntax tree without docstrings (None: no Python source)."""
    path = _origin(module)
    if path is None:
        return None
    text, _ = _tree(str(path), path.stat().st_mtime_ns)
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint_modules(modules) -> str:
    """16 hex digits over (name, digest) of each module, sorted by name: independent of file locations."""
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        digest = module_digest(name)
        if digest is None:
            continue
        h.update(name.encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()[:16]


def submodules(module: str) -> list[str]:
    """``module`` and, for a package, every module inside it (by name)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    out = [module]
    if spec.submodule_search_locations:
        for info in pkgutil.walk_packages(list(spec.submodule_search_locations), prefix=module + "."):
            out.append(info.name)
    return out


def engine_modules() -> list[str]:
    return sorted({m for root in ENGINE_MODULES for m in submodules(root)})


@functools.lru_cache(maxsize=1)
def engine_fingerprint() -> str:
    return fingerprint_modules(engine_modules())


def _imports(module: str) -> set[str]:
    """The modules ``module`` imports (absolute names; ``from x import y`` gives ``x.y`` when that is a module)."""
    path = _origin(module)
    if path is None:
        return set()
    _, tree = _tree(str(path), path.stat().st_mtime_ns)
    if tree is None:
        return set()
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return out


def _own_package(module: str) -> str:
    if module == BUILTIN_METHODS or module.startswith(BUILTIN_METHODS + "."):
        return BUILTIN_METHODS
    return module.split(".")[0]


def import_closure(module: str) -> list[str]:
    """``module`` and every module of its own package it imports, transitively (engine modules excluded)."""
    root = _own_package(module)
    engine = set(engine_modules())
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen or m in engine or m == BUILTIN_METHODS:  # (the built-in package's __init__: the API)
            continue
        if _origin(m) is None:
            continue
        seen.add(m)
        for name in _imports(m):
            if (name == root or name.startswith(root + ".")) and name not in seen:
                todo.append(name)
    return sorted(seen)


def method_modules(cls: type) -> list[str]:
    """The modules whose code a method's results depend on, beyond the engine (see the module doc)."""
    out: set[str] = set()
    for klass in inspect.getmro(cls):
        mod = klass.__module__
        if mod == "builtins" or (mod.startswith("peftbench.") and not mod.startswith(BUILTIN_METHODS + ".")):
            continue  # the core's base classes are in the engine fingerprint
        out.update(import_closure(mod))
    return sorted(out)


def code_fingerprint(method) -> dict:
    """``{"method": ..., "engine": ...}`` of the installed code for a :class:`~peftbench.methods.Method`
    (instance or class); ``"method": "unknown"`` when its source cannot be found (a class made in an
    interactive session)."""
    cls = method if isinstance(method, type) else type(method)
    modules = method_modules(cls)
    return {"method": fingerprint_modules(modules) if modules else "unknown", "engine": engine_fingerprint()}


_LOADED: dict[type, dict] = {}


def loaded_fingerprint(method) -> dict:
    """:func:`code_fingerprint` of a method as this process first took it (per class, kept for the process's life,
    as the engine's is): the record of a run that starts late in a long sweep carries the fingerprint of the code the
    process has been running, even when a method's file changed on disk meanwhile. A sweep takes it for each of its
    methods when it checks their models, before any compute (:func:`peftbench.sweep.plan.check_models`)."""
    cls = method if isinstance(method, type) else type(method)
    if cls not in _LOADED:
        _LOADED[cls] = code_fingerprint(cls)
    return _LOADED[cls]


def staleness(recorded: dict | None, current: dict) -> list[str]:
    """What differs between a record's ``code`` and the installed code ([] when nothing, or when the
    record predates code fingerprints)."""
    if not recorded:
        return []
    return [part for part in ("method", "engine")
            if "unknown" not in (recorded.get(part), current.get(part)) and recorded.get(part) != current.get(part)]
