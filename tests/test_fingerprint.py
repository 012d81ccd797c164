"""Code fingerprints (peftbench/fingerprint.py): a finished run is stale exactly when code that computes its
numbers changed. They hash module names and syntax trees, never file locations; a method's fingerprint
covers every module of its own package that it imports; the engine's covers training code only."""
from __future__ import annotations

import importlib
import os
import shutil
import sys
import time

from peftbench import fingerprint as fp


def _write(root, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        t = time.time_ns() + 10**9  # a new mtime even within the file system's time resolution
        os.utime(path, ns=(t, t))


def _forget(prefix: str) -> None:
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def test_fingerprints_hash_module_names_not_file_locations(tmp_path, monkeypatch):
    files = {"fpmove/__init__.py": "", "fpmove/a.py": "def f(x):\n    return x + 1  # a comment\n",
             "fpmove/b.py": '"""doc"""\nY = 2\n'}
    first, second = tmp_path / "one", tmp_path / "two" / "deeper" / "zz"
    _write(first, files)
    monkeypatch.syspath_prepend(str(first))
    names = ["fpmove.a", "fpmove.b"]
    before = fp.fingerprint_modules(names)
    # the same code elsewhere (another folder, another depth): the same fingerprint
    _forget("fpmove")
    shutil.copytree(first / "fpmove", second / "fpmove")
    monkeypatch.syspath_prepend(str(second))
    assert importlib.util.find_spec("fpmove.a").origin.startswith(str(second))
    assert fp.fingerprint_modules(names) == before
    # a comment or docstring is not a change; code is
    _write(second, {"fpmove/a.py": "def f(x):\n    return x + 1  # another comment\n", "fpmove/b.py": "Y = 2\n"})
    assert fp.fingerprint_modules(names) == before
    _write(second, {"fpmove/a.py": "def f(x):\n    return x + 2\n"})
    assert fp.fingerprint_modules(names) != before
    _forget("fpmove")


def test_the_engine_fingerprint_covers_training_code_only():
    engine = fp.engine_modules()
    assert {"peftbench.train.loop", "peftbench.train.engine", "peftbench.layers.tuned_vit", "peftbench.backbones",
            "peftbench.data.loader", "peftbench.methods._base"} <= set(engine)
    # exporting, leaderboards, executors, the command line and fingerprinting itself change no number
    for module in ("peftbench.export", "peftbench.results.board", "peftbench.executors.local", "peftbench.cli.run",
                   "peftbench.fingerprint", "peftbench.sweep.plan"):
        assert module not in engine, module
    assert not [m for m in engine if m.startswith("peftbench.methods.") and not m.startswith("peftbench.methods._")]


PLUGIN = {
    "fpplug/__init__.py": "",
    "fpplug/method.py": "from peftbench.methods import Method\nfrom .helpers import scale\n\n\n"
                        "class Scaled(Method):\n    name = 'fp-scaled'\n\n    def build(self, b, n, o):\n"
                        "        return scale(b)\n",
    "fpplug/helpers.py": "from fpplug import deep\n\n\ndef scale(x):\n    return deep.twice(x)\n",
    "fpplug/deep.py": "def twice(x):\n    return 2 * x\n",
    "fpplug/unrelated.py": "Z = 1\n",
}


def test_a_method_fingerprint_covers_its_own_packages_imports(tmp_path, monkeypatch):
    """Editing a helper module that the method's file imports (directly or through another helper) makes
    its runs stale; a module of the package the method never imports does not (trust issue, item 12)."""
    _write(tmp_path, PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    _forget("fpplug")
    cls = importlib.import_module("fpplug.method").Scaled
    assert fp.method_modules(cls) == ["fpplug", "fpplug.deep", "fpplug.helpers", "fpplug.method"]
    before = fp.code_fingerprint(cls)
    _write(tmp_path, {"fpplug/unrelated.py": "Z = 2\n"})
    assert fp.code_fingerprint(cls) == before
    _write(tmp_path, {"fpplug/deep.py": "def twice(x):\n    return x + x\n"})
    after = fp.code_fingerprint(cls)
    assert after["method"] != before["method"] and after["engine"] == before["engine"]
    assert fp.staleness(before, after) == ["method"]
    _forget("fpplug")


def test_a_record_carries_the_code_its_process_loaded(tmp_path, monkeypatch):
    """A method file edited during a long sweep: the process still runs the code it imported, and the records it
    writes later say so (loaded_fingerprint, taken when the sweep checks its models); a new process sees the edit."""
    _write(tmp_path, PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    _forget("fpplug")
    cls = importlib.import_module("fpplug.method").Scaled
    monkeypatch.setattr(fp, "_LOADED", {})
    loaded = fp.loaded_fingerprint(cls)
    _write(tmp_path, {"fpplug/deep.py": "def twice(x):\n    return x + x\n"})
    assert fp.loaded_fingerprint(cls) == loaded  # this process: the code it runs
    assert fp.code_fingerprint(cls)["method"] != loaded["method"]  # what is installed now (a new process, the board)
    _forget("fpplug")


def test_a_builtin_method_covers_its_subpackage_and_sibling_imports_but_not_the_api():
    from peftbench.methods import get_method

    mods = fp.method_modules(type(get_method("e2vpt-prune")))
    assert {"peftbench.methods.e2vpt.pipeline", "peftbench.methods.e2vpt.model", "peftbench.methods.e2vpt.pruning"} <= set(mods)
    assert not {"peftbench.methods", "peftbench.methods._base", "peftbench.methods._recipes"} & set(mods)
    assert fp.method_modules(type(get_method("linear"))) == ["peftbench.methods.linear"]
