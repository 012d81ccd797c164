"""Run the import contracts (pyproject.toml ``[tool.importlinter]``) on peftbench as it installs.

The built-in methods and task suites live in the top-level folders ``methods/`` and ``tasks/`` and install as
``peftbench.methods`` and ``peftbench.tasks`` (setup.py). import-linter (grimp) builds its graph by walking the
folder of the ``peftbench`` package, so on a checkout it would not see those two packages. This script
assembles the installed layout in a temporary folder (a copy of ``peftbench/`` with ``methods/`` and ``tasks/``
inside it), checks that grimp sees every module of it, then runs ``lint-imports`` on that copy. Exit status:
lint-imports' own (1 when a contract is broken), 2 when the graph misses a module.

    python tools/lint_imports.py          # what .ci/run calls
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = {"peftbench": ROOT / "peftbench", "peftbench/methods": ROOT / "methods", "peftbench/tasks": ROOT / "tasks"}


def assemble(dest: Path) -> list[str]:
    """Copy the package into ``dest`` as it installs; returns the dotted names of its modules."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for rel, src in LAYOUT.items():
        shutil.copytree(src, dest / rel, ignore=ignore)
    names = []
    for path in sorted((dest / "peftbench").rglob("*.py")):
        parts = path.relative_to(dest).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def main() -> int:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if lint is None:
        print("lint_imports: lint-imports not found (pip install import-linter)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="peftbench-lint-") as tmp:
        tmp = Path(tmp)
        modules = assemble(tmp)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp), str(ROOT)]))
        probe = subprocess.run([sys.executable, "-c", "import grimp, peftbench; print(peftbench.__file__); "
                                "print('\\n'.join(sorted(grimp.build_graph('peftbench', cache_dir=None).modules)))"],
                               cwd=tmp, env=env, capture_output=True, text=True)
        if probe.returncode != 0:
            print(probe.stderr, file=sys.stderr)
            return 2
        where, *seen = probe.stdout.split()
        missing = sorted(set(modules) - set(seen))
        if not where.startswith(str(tmp)) or missing:
            print(f"lint_imports: the graph is not of the assembled package ({where}); missing modules: "
                  f"{', '.join(missing[:10]) or 'none'}", file=sys.stderr)
            return 2
        print(f"lint_imports: {len(seen)} modules (peftbench with methods/ and tasks/ as it installs)")
        return subprocess.run([lint, str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
