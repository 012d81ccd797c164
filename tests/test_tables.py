"""``peftbench leaderboard --format latex|markdown``: the papers' Table 1 layout (per-task columns grouped
Natural / Specialized / Structured, group means, both overall means, Tuned/Total %), mean ± std, the
best of each column bold, booktabs; the LaTeX compiles with pdflatex when one is installed (CI
installs texlive-latex-base + texlive-latex-recommended and sets PEFTBENCH_REQUIRE_LATEX=1)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from test_leaderboard import NATURAL, REFERENCE, SPECIALIZED, STRUCTURED, VALUES, VTAB, board_for, make_vtab_store

from peftbench.results.names import task_title
from peftbench.results.tables import latex_table, markdown_table, tex_escape


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    root = make_vtab_store(tmp_path_factory.mktemp("tables") / "runs")
    b, _ = board_for(root, reference=REFERENCE)
    return b


def _body_rows(tex: str) -> dict[str, list[str]]:
    out = {}
    for line in tex.splitlines():
        if line.endswith(r"\\") and "&" in line and not line.startswith(("Method", " ", "&", r"\multicolumn")):
            cells = [c.strip() for c in line[:-2].split("&")]
            out.setdefault(cells[0], cells[1:])
    return out


def test_latex_layout(board):
    tex = latex_table(board)
    assert tex.count(r"\toprule") == 1 and tex.count(r"\bottomrule") == 1 and r"\midrule" in tex
    n_cols = 1 + 19 + 3 + 2  # Tuned/Total, the tasks, three group means, both overall means
    assert rf"\begin{{tabular}}{{l{'c' * n_cols}}}" in tex
    groups = re.findall(r"\\multicolumn\{(\d+)\}\{c\}\{(\w+)\}", tex)
    assert groups == [(str(len(NATURAL) + 1), "Natural"), (str(len(SPECIALIZED) + 1), "Specialized"),
                      (str(len(STRUCTURED) + 1), "Structured"), ("2", "Overall")]
    assert r"\cmidrule(lr){3-10}" in tex  # Natural: its 7 tasks and its mean, after Method and Tuned/Total
    head = next(line for line in tex.splitlines() if line.startswith("Method"))
    names = re.findall(r"\\rotatebox\{90\}\{([^}]*)\}", head)
    # the papers' display names (peftbench.results.names); --raw-names keeps the identifiers
    assert names[0] == r"Tuned/Total (\%)" and names[1:8] == [tex_escape(task_title(t)) for t in NATURAL]
    assert names[1] == "CIFAR-100" and "Clevr/count" in names
    assert names[-2:] == ["Mean of groups", "Mean over tasks"]
    rows = _body_rows(tex)
    assert "VPT-deep" in rows and "vpt-deep" not in rows
    raw_head = next(line for line in latex_table(board, raw_names=True).splitlines() if line.startswith("Method"))
    assert re.findall(r"\\rotatebox\{90\}\{([^}]*)\}", raw_head)[1:8] == [tex_escape(t) for t in NATURAL]
    rows = _body_rows(latex_table(board, raw_names=True))
    vd = rows["vpt-deep"]
    assert len(vd) == n_cols
    # vpt-deep: 3 seeds, std 1 everywhere; the best reproduced row of every accuracy column
    assert vd[1] == rf"\textbf{{{VALUES[VTAB[0]]:.1f}}}{{\scriptsize$\pm$1.0}}"
    assert vd[-2] == r"\textbf{57.0}{\scriptsize$\pm$1.0}"
    assert rows["linear"][0] == r"\textbf{0.05}" and rows["bitfit"][0] == "0.10"  # the lowest Tuned/Total is bold
    assert "linear" in rows and rows["linear"][-1] == "--"  # incomplete: no overall mean
    # the tiny test backbone and the papers' ViT-B/16 are two backbone tables: each its own blocks
    # each block says what its rows are: the reported rows are the papers' numbers, not final runs
    assert r"\emph{Reported (papers), ViT-B/16 ImageNet-21k: the papers' numbers as printed" in tex
    assert r"\emph{Reproduced (peftbench), vit-test: final runs, mean $\pm$ sample std" in tex or \
        r"\emph{Reproduced (peftbench), vit-test: final runs, mean ± sample std" in tex
    assert "E$^{2}$VPT" in tex and "textasciicircum" not in tex  # the superscript the papers print


def test_markdown_layout(board):
    md = markdown_table(board)
    lines = md.splitlines()
    head = next(x for x in lines if x.startswith("| Method"))
    cells = [c.strip() for c in head.strip("|").split("|")]
    assert cells[:2] == ["Method", "Tuned/Total (%)"] and cells[-2:] == ["Mean of groups", "Mean over tasks"]
    assert "Natural mean" in cells and "Structured mean" in cells
    vd = [x for x in lines if x.startswith("| VPT-deep ")][-1]  # (the reported VPT-deep row, in its own block, is first)
    assert "| CIFAR-100 |" in head + " |" or "CIFAR-100" in cells
    assert "**57.0** ± 1.0" in vd
    assert "| *Reported (papers), ViT-B/16 ImageNet-21k* |" in md


def test_cli_format_prints_the_table(tmp_path, capsys):
    from peftbench.cli import main

    root = make_vtab_store(tmp_path / "runs")
    assert main(["leaderboard", "--runs-dir", str(root), "--suite", "vtab", "--format", "latex", "--no-reference"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("% peftbench leaderboard --format latex: vtab") and out.rstrip().endswith(r"\end{table*}")
    assert not (root / "leaderboard").exists()  # printed, nothing written
    assert main(["leaderboard", "--runs-dir", str(root), "--suite", "vtab", "--format", "markdown"]) == 0
    assert "| VPT-deep |" in capsys.readouterr().out
    assert main(["leaderboard", "--runs-dir", str(root), "--suite", "vtab", "--format", "markdown", "--raw-names"]) == 0
    assert "| vpt-deep |" in capsys.readouterr().out


def test_latex_compiles(board, tmp_path):
    engine = shutil.which("pdflatex")
    if engine is None:
        if os.environ.get("PEFTBENCH_REQUIRE_LATEX") == "1":
            pytest.fail("PEFTBENCH_REQUIRE_LATEX=1 but no pdflatex was found")
        pytest.skip("no pdflatex (Debian: apt-get install texlive-latex-base texlive-latex-recommended)")
    (tmp_path / "table.tex").write_text(latex_table(board))
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{graphicx}\n"
                                      "\\begin{document}\n\\input{table.tex}\n\\end{document}\n")
    res = subprocess.run([engine, "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:]
    assert (tmp_path / "doc.pdf").read_bytes()[:5] == b"%PDF-"
    log = (tmp_path / "doc.log").read_text(errors="replace")
    assert "Undefined control sequence" not in log and "Missing character" not in log


def test_a_small_table_is_never_enlarged():
    """The LaTeX table is shrunk to the text width when wider, never scaled up (a resizebox to \\textwidth enlarged
    a two-column table to the page's width)."""
    from peftbench.results.tables import tex_escape

    assert r"\resizebox{\ifdim\width>\textwidth\textwidth\else\width\fi}{!}{%" in latex_table_of_any_board()
    assert tex_escape("E^2VPT") == "E$^{2}$VPT" and tex_escape("a^b") == r"a\textasciicircum{}b"


def latex_table_of_any_board():
    from peftbench.results.board import Board, suite_grid
    from peftbench.results.tables import latex_table

    grid = suite_grid("demo")
    return latex_table(Board(grid, [], [], set(), [], [], has_reference=False))
