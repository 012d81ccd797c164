"""Which code produced a result: fingerprints of a method's code and of peftbench's training code.

A run's key says *what* was run (method, options, data, hyper-parameters, seed, ``Method.version``);
its record's ``code`` field says *which code* ran it::

    "code": {"method": "<sha of the method's source>", "engine": "<sha of the training code>"}

A fingerprint hashes the syntax tree of the source files with docstrings removed, so comments,
docstrings and formatting do not count; any change to what the code does does. The method's code is
the file of its class, the files of its base classes outside peftbench's core, and, when the method
lives in a sub-package of its plugin package (``peftbench/methods/e2vpt/``), every file of that
sub-package. The training code is every module that turns a spec into numbers: ``train/``,
``layers/``, the data loading modules, ``backbones.py`` and the method API.

A finished run whose key matches but whose ``code`` differs from the installed code is *stale*:
``peftbench run``, ``status`` and ``leaderboard`` say so (method and number of runs), and
``peftbench run --rerun-stale`` reruns them. Bumping ``Method.version`` changes the keys instead.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path

from ..methods import get_method

ENGINE_MODULES = ("peftbench.train", "peftbench.layers", "peftbench.data.loader", "peftbench.data.transforms",
                  "peftbench.data.images", "peftbench.data.cache", "peftbench.data.splits", "peftbench.data.layouts",
                  "peftbench.backbones", "peftbench.methods._base", "peftbench.methods._recipes")
PLUGIN_ROOTS = ("peftbench.methods",)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) and \
                isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return tree


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, mtime_ns: int) -> str:
    src = Path(path).read_text(encoding="utf-8")
    try:
        tree = ast.dump(_strip_docstrings(ast.parse(src)), include_attributes=False)
    except SyntaxError:
        tree = src
    return hashlib.sha256(tree.encode()).hexdigest()


def _files_of(module: str) -> list[Path]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return []
    origin = Path(spec.origin)
    if spec.submodule_search_locations:  # a package: every module in it
        return sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.py"))
    return [origin]


def fingerprint_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(set(files)):
        h.update(f.name.encode())
        h.update(_file_digest(str(f), f.stat().st_mtime_ns).encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def engine_fingerprint() -> str:
    return fingerprint_files([f for m in ENGINE_MODULES for f in _files_of(m)])


def method_files(cls: type) -> list[Path]:
    files: list[Path] = []
    for klass in inspect.getmro(cls):
        mod = klass.__module__
        if mod.startswith("peftbench.") and not any(mod.startswith(r + ".") for r in PLUGIN_ROOTS):
            continue  # the core's base classes are in the engine fingerprint
        if mod.startswith("peftbench.methods._") or mod == "builtins":
            continue
        parts = mod.split(".")
        root = next((r for r in PLUGIN_ROOTS if mod.startswith(r + ".")), None)
        if root is not None and len(parts) > len(root.split(".")) + 1:  # in a sub-package: the whole of it
            files += _files_of(".".join(parts[:len(root.split(".")) + 1]))
        else:
            module = sys.modules.get(mod)
            source = getattr(module, "__file__", None)
            if source is None:
                try:
                    source = inspect.getsourcefile(klass)
                except TypeError:
                    source = None
            if source:
                files.append(Path(source))
    return [f for f in files if f.is_file()]


def code_fingerprint(method_name: str) -> dict:
    """``{"method": ..., "engine": ...}`` of the installed code (``"method": "unknown"`` when the
    method's source files cannot be found, e.g. a class made in an interactive session)."""
    method = get_method(method_name)
    files = method_files(type(method))
    return {"method": fingerprint_files(files) if files else "unknown", "engine": engine_fingerprint()}


def staleness(recorded: dict | None, current: dict) -> list[str]:
    """What differs between a record's ``code`` and the installed code ([] when nothing, or when the
    record predates code fingerprints)."""
    if not recorded:
        return []
    return [part for part in ("method", "engine")
            if "unknown" not in (recorded.get(part), current.get(part)) and recorded.get(part) != current.get(part)]
