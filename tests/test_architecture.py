"""docs/architecture.md is the map of the code: it names every module that exists (a module added without a
word in the map fails here), and the layers it draws are the ones pyproject.toml enforces."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules() -> list[Path]:
    return sorted(p for folder in ("peftbench", "methods", "tasks") for p in (ROOT / folder).rglob("*.py")
                  if "__pycache__" not in p.parts)


def test_the_architecture_map_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = []
    for path in modules():
        name = path.parent.name if path.name == "__init__.py" else path.stem
        if path.name in ("__init__.py", "__main__.py", "_version.py") and path.parent.name in ("peftbench",):
            continue
        if not re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", text):
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_the_layers_of_the_docs_are_the_enforced_ones():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    toml = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    enforced = re.findall(r'^    "([^"]+)",$', toml[toml.index("layers = ["):], re.M)
    drawn = text[text.index("## 2. The layering rule"):]
    drawn = drawn[drawn.index("```") + 3:]
    drawn = [line.split("(")[0].strip() for line in drawn[:drawn.index("```")].strip().splitlines()]
    assert drawn == enforced


def test_no_placeholder_is_left_in_the_docs():
    """A page a user reads has no unfinished placeholder (a "TODO-..." marker left by a generator or an edit)."""
    pages = [ROOT / "README.md", ROOT / "results" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    left = [f"{p.relative_to(ROOT)}:{i}" for p in pages
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if re.search(r"\bTODO[-_:]", line)]
    assert not left, f"placeholders left in the docs: {left}"
