"""The committed demo board (results/demo/board/) is what today's leaderboard code makes of the committed records
(results/demo/runs/, JSON only): regenerated here and compared byte for byte. The figures (PNG/SVG files and the
report's embedded images) are compared when the installed matplotlib is the one that drew them
(board/MADE_WITH.json), else the report is compared with its images masked. A change of the engine or of a method
makes the regenerated board carry the "made by older code" banner, so this test then fails until the board is
rewritten: `python scripts/refresh_demo.py --board-only` (seconds), or without the flag to retrain what is stale."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from peftbench.cli import main

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "results" / "demo"
FIGURES = (".png", ".svg")
IMAGE = re.compile(rb'src="data:image/[a-z+]+;base64,[A-Za-z0-9+/=]+"')

pytestmark = pytest.mark.skipif(not (DEMO / "board").is_dir(), reason="no committed demo board")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("board")
    assert main(["leaderboard", "--runs-dir", str(DEMO / "runs"), "--out", str(out), "--suite", "demo", "--quiet"]) == 0
    return out


def test_the_committed_store_is_json_only():
    files = [p for p in (DEMO / "runs").rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".json", ".toml") for p in files), \
        [str(p) for p in files if p.suffix not in (".json", ".toml")][:5]


def test_every_registered_method_is_on_the_board():
    """A counted final run of every built-in method on every task of the demo sweep."""
    from peftbench.methods import METHODS
    from peftbench.results.board import build_board, load_runs

    runs, skipped = load_runs(DEMO / "runs", lambda msg: None)
    board = build_board(runs, "demo", None, skipped, warn=lambda msg: None)
    done = {(str(r.spec["method"]), str(r.spec["task"])) for r in board.runs if r.path in board.used}
    builtin = sorted(n for n, m in METHODS.items() if type(m).__module__.startswith("peftbench.methods."))
    tasks = sorted({t for _, t in done})
    missing = [(m, t) for m in builtin for t in tasks if (m, t) not in done]
    assert len(tasks) == 5 and not missing, f"the committed demo board lacks {len(missing)} (method, task) final runs, " \
        f"e.g. {missing[:4]} (python scripts/refresh_demo.py trains them)"


def test_the_committed_board_regenerates_byte_for_byte(regenerated):
    import matplotlib

    made = json.loads((DEMO / "board" / "MADE_WITH.json").read_text())
    same_plots = made.get("matplotlib") == matplotlib.__version__
    # (the folder's stamp names the store relative to the folder: not a leaderboard file)
    committed = sorted(p.name for p in (DEMO / "board").iterdir() if p.name != "MADE_WITH.json" and p.name[0] != ".")
    assert committed == sorted(p.name for p in regenerated.iterdir() if p.name[0] != "."), \
        "the leaderboard writes other files now"
    hint = "rewrite it: python scripts/refresh_demo.py --board-only (or without the flag to retrain stale methods)"
    for name in committed:
        want, got = (DEMO / "board" / name).read_bytes(), (regenerated / name).read_bytes()
        if name.endswith(FIGURES):
            if same_plots:
                assert got == want, f"{name} differs from the committed board: {hint}"
            continue
        if name.endswith(".html") and not same_plots:
            want, got = IMAGE.sub(b'src=""', want), IMAGE.sub(b'src=""', got)
        assert got == want, f"{name} differs from the committed board: {hint}"
