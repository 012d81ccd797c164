"""The leaderboard as a paper's table: LaTeX (booktabs) and Markdown, in the layout of the PEFT papers'
Table 1 (VPT, E^2VPT, NOAH): the method, its Tuned/Total %, the per-task accuracies grouped by VTAB
group (Natural / Specialized / Structured) each followed by the group mean, then both overall means.

Cells are ``mean ± std`` over seeds (the std is omitted with one seed); the best value of every
column is bold, within each block of rows (reproduced, reported; not among controls): the highest
accuracy, the lowest Tuned/Total. Values are compared at the printed precision, so rows that print the same
are all bold. ``peftbench leaderboard --format latex|markdown`` prints these; ``write_leaderboard``
also writes them as ``<suite>-table.tex`` / ``<suite>-table.md``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .._text import latex, markdown, terminal
from .board import Board, Row, freshness
from .names import method_title, task_title

DIGITS = 1  # accuracies as printed in the papers
TUNED_DIGITS = 2


@dataclass
class _Col:
    head: str
    get: Callable[[Row], tuple[float | None, float | None]]  # (value, std)
    best: str = "max"  # max | min
    digits: int = DIGITS
    group: str = ""  # the group header above it ("" = none)


def _columns(board: Board, raw: bool = False) -> list[_Col]:
    lay = board.grid
    cols = [_Col("Tuned/Total (%)", lambda r: (r.tuned_total_pct, None), "min", TUNED_DIGITS)]
    if lay.groups:
        for g, ts in lay.groups.items():
            cols += [_Col(task_title(t, raw), lambda r, t=t: (r.mean.get(t), r.std.get(t)), group=g.capitalize())
                     for t in ts]
            cols.append(_Col("Mean", lambda r, g=g: (r.group_mean.get(g), r.group_std.get(g)), group=g.capitalize()))
        cols.append(_Col("Mean of groups", lambda r: (r.overall_groups, r.overall_groups_std), group="Overall"))
        cols.append(_Col("Mean over tasks", lambda r: (r.overall_tasks, r.overall_tasks_std), group="Overall"))
    else:
        cols += [_Col(task_title(t, raw), lambda r, t=t: (r.mean.get(t), r.std.get(t))) for t in lay.tasks]
        cols.append(_Col("Mean", lambda r: (r.overall_tasks, r.overall_tasks_std)))
    return cols


CONTROLS = "Controls"


def _bests(name: str, rows: list[Row], cols: list[_Col]) -> list[float | None]:
    """The bold value of each column: none for a block of one row or of controls."""
    if name.startswith(CONTROLS) or len(rows) < 2:
        return [None] * len(cols)
    return [_best(rows, c) for c in cols]


def _blocks(board: Board) -> list[tuple[str, list[Row]]]:
    """Reproduced rows, controls, reported rows: per backbone table when the board has several (ranked apart)."""
    tables = board.tables
    out = []
    for table in tables:
        suffix = f", {table}" if len(tables) > 1 else ""
        rep = [r for r in board.reproduced if r.tasks_done and not r.control and r.table == table]
        ctl = [r for r in board.reproduced if r.tasks_done and r.control and r.table == table]
        out += [("Reproduced (peftbench)" + suffix, rep), (CONTROLS + suffix, ctl),
                ("Reported (papers)" + suffix, [r for r in board.reported if r.table == table])]
    return [(name, rows) for name, rows in out if rows]


def _best(rows: list[Row], col: _Col) -> float | None:
    vals = [round(v, col.digits) for v, _ in (col.get(r) for r in rows) if v is not None]
    if not vals:
        return None
    return min(vals) if col.best == "min" else max(vals)


def block_caption(name: str, board: Board) -> str:
    """What the rows of a block are: reproduced rows are the final runs (mean ± std over seeds), controls likewise,
    reported rows the papers' numbers as printed (their sources: the leaderboard CSV's reference_source)."""
    if name.startswith("Reported"):
        return "the papers' numbers as printed (one value per task; sources in the leaderboard CSV)"
    note = _seed_note(board)
    return "final runs" + (f", {note}" if note else "")


def _caption(blocks: list[tuple[str, list[Row]]], board: Board) -> str:
    """What the table's rows are: each block's caption, named when there are several."""
    if len(blocks) > 1:
        return "; ".join(f"{name}: {block_caption(name, board)}" for name, _ in blocks)
    return block_caption(blocks[0][0], board) if blocks else "final runs"


def _label(r: Row, raw: bool) -> str:
    return r.label if r.source != "reproduced" else method_title(r.label, raw)


def _seed_note(board: Board) -> str:
    seeds = sorted({n for r in board.reproduced for n in r.seeds.values() if n})
    if not seeds:
        return ""
    span = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    return f"mean ± sample std over {span} seed(s) (no std with one seed)"


# ---------------------------------------------------------------------------------------------
# LaTeX
# ---------------------------------------------------------------------------------------------

_SUPERSCRIPT = re.compile(r"\\textasciicircum\{\}([0-9]+)")


def tex_escape(text: str) -> str:
    """LaTeX text (:func:`peftbench._text.latex`: control characters visible, every special character escaped), with a
    caret before digits typeset as the superscript the papers print (``E^2VPT`` → ``E$^{2}$VPT``)."""
    return _SUPERSCRIPT.sub(lambda m: "$^{" + m.group(1) + "}$", latex(text))


def _tex_cell(v: float | None, sd: float | None, col: _Col, best: float | None) -> str:
    if v is None:
        return "--"
    text = f"{v:.{col.digits}f}"
    if best is not None and round(v, col.digits) == best:
        text = rf"\textbf{{{text}}}"
    if sd is not None:
        text += rf"{{\scriptsize$\pm${sd:.{col.digits}f}}}"
    return text


def latex_table(board: Board, raw_names: bool = False) -> str:
    """A ``table*`` with a booktabs ``tabular`` (needs ``\\usepackage{booktabs,graphicx}``); methods and tasks by their
    display names (:mod:`peftbench.results.names`) unless ``raw_names``."""
    lay = board.grid
    cols = _columns(board, raw_names)
    n = 1 + len(cols)
    blocks = _blocks(board)
    what = _caption(blocks, board)
    lines = [f"% peftbench leaderboard --format latex: {tex_escape(lay.suite)} (generated from the run store; do not edit)",
             r"% needs \usepackage{booktabs} and \usepackage{graphicx}",
             r"\begin{table*}[t]", r"\centering",
             rf"\caption{{{tex_escape(lay.suite)}: top-1 accuracy (\%). {tex_escape(what[0].upper() + what[1:])}"
             + r"; best of each column in bold (within each block). Generated by peftbench.}",
             rf"\label{{tab:peftbench-{tex_escape(lay.suite)}}}",
             r"\setlength{\tabcolsep}{3pt}",
             # shrunk to the text width when wider, never enlarged (a small table keeps its size)
             r"\resizebox{\ifdim\width>\textwidth\textwidth\else\width\fi}{!}{%",
             r"\begin{tabular}{l" + "c" * len(cols) + "}",
             r"\toprule"]
    # group header row: one \multicolumn per group, a \cmidrule under each
    cells, rules, j = [""], [], 0
    while j < len(cols):
        g = cols[j].group
        k = j
        while k < len(cols) and g and cols[k].group == g:
            k += 1
        if not g:
            cells.append("")
            j += 1
            continue
        cells.append(rf"\multicolumn{{{k - j}}}{{c}}{{{tex_escape(g)}}}")
        rules.append(rf"\cmidrule(lr){{{j + 2}-{k + 1}}}")
        j = k
    if rules:
        lines.append(" & ".join(cells) + r" \\")
        lines.append(" ".join(rules))
    lines.append(" & ".join(["Method"] + [rf"\rotatebox{{90}}{{{tex_escape(c.head)}}}" for c in cols]) + r" \\")
    for name, rows in blocks:
        lines.append(r"\midrule")
        if len(blocks) > 1:
            lines.append(rf"\multicolumn{{{n}}}{{l}}{{\emph{{{tex_escape(name)}: {tex_escape(block_caption(name, board))}}}}} \\")
        bests = _bests(name, rows, cols)
        for r in rows:
            cells = [tex_escape(_label(r, raw_names))]
            for c, best in zip(cols, bests):
                v, sd = c.get(r)
                cells.append(_tex_cell(v, sd, c, best))
            lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table*}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Markdown (GitHub pipe table)
# ---------------------------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    """A Markdown table cell (:func:`peftbench._text.markdown`: one line, Markdown and HTML escaped)."""
    return markdown(text)


def _md_cell(v: float | None, sd: float | None, col: _Col, best: float | None) -> str:
    if v is None:
        return "–"
    text = f"{v:.{col.digits}f}"
    if best is not None and round(v, col.digits) == best:
        text = f"**{text}**"
    return text + (f" ± {sd:.{col.digits}f}" if sd is not None else "")


def markdown_table(board: Board, raw_names: bool = False) -> str:
    lay = board.grid
    cols = _columns(board, raw_names)
    heads = []
    for c in cols:
        if c.head == "Mean" and c.group:
            heads.append(f"{_md_escape(c.group)} mean")
        else:
            heads.append(_md_escape(c.head))
    blocks = _blocks(board)
    what = _caption(blocks, board)
    out = [f"**{_md_escape(lay.suite)}**: top-1 accuracy (%). {_md_escape(what[0].upper() + what[1:])}; best of each "
           "column in bold (within each block)."
           + (" Groups: " + "; ".join(f"{_md_escape(g.capitalize())}: "
                                      f"{', '.join(_md_escape(task_title(t, raw_names)) for t in ts)}"
                                      for g, ts in lay.groups.items()) + "." if lay.groups else ""),
           "",
           "| Method | " + " | ".join(heads) + " |",
           "|:--|" + "|".join("--:" for _ in cols) + "|"]
    for name, rows in blocks:
        if len(blocks) > 1:
            out.append(f"| *{_md_escape(name)}* |" + " |" * len(cols))
        bests = _bests(name, rows, cols)
        for r in rows:
            cells = [_md_escape(_label(r, raw_names))]
            for c, best in zip(cols, bests):
                v, sd = c.get(r)
                cells.append(_md_cell(v, sd, c, best))
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# the terminal (what `peftbench leaderboard` and `peftbench run` print)
# ---------------------------------------------------------------------------------------------

TERMINAL_REPORTED_MAX = 8  # reported rows printed per table beyond those paired with a reproduced row


def _params(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else f"{n:.0f}"


def _rank(r: Row) -> str:
    if r.control:
        return "ctl"
    if not r.rank:
        return "-"
    return f"{r.rank}" + (f"≈{r.tied_with}" if r.tied_with else "")


def terminal_table(board: Board) -> str:
    """The board as plain aligned text, one block per backbone table: rank (``≈k``: within noise of rank k),
    configuration, Tuned/Total %, tuned parameters, each group's mean, the headline ± its std over seeds and the
    tasks done; then the reported rows paired with a reproduced one and the best others of the same table (the
    CSV files have them all). Deterministic, no colour."""
    lay = board.grid
    heads = ["rank", "config", "tuned %", "params"] + [g for g in lay.groups] + ["mean", "± std", "tasks"]
    out_lines = [f"{lay.suite}: " + ("mean of the group means" if lay.groups else f"mean over the {len(lay.tasks)} "
                                     "tasks") + " (top-1 %, final runs)"]
    stale = freshness(board).text
    if stale:
        out_lines.append(f"!! {stale}")
    paired = {r.paired_with for r in board.reproduced if r.paired_with}
    for table in board.tables:
        mine = [r for r in board.reproduced if r.table == table]
        theirs = [r for r in board.reported if r.table == table]
        pairs = [r for r in theirs if r.label in paired]
        rest = [r for r in theirs if r.label not in paired]
        shown = sorted(pairs + rest[:max(0, TERMINAL_REPORTED_MAX - len(pairs))],
                       key=lambda r: (r.rank is None, r.rank or 0, r.label))
        rows = []
        for r in mine + shown:
            head = r.headline(lay)
            std = r.headline_std(lay)
            done = sum(1 for t in lay.tasks if r.mean.get(t) is not None)
            label = r.label if r.source == "reproduced" else f"{r.label} (paper)"
            rows.append([_rank(r), label, "-" if r.tuned_total_pct is None else f"{r.tuned_total_pct:.3f}",
                         _params(r.tuned_params if r.source == "reproduced" else None)]
                        + [("-" if r.group_mean.get(g) is None else f"{r.group_mean[g]:.2f}") for g in lay.groups]
                        + ["-" if head is None else f"{head:.2f}", "" if std is None else f"{std:.2f}",
                           f"{done}/{len(lay.tasks)}" if r.source == "reproduced" else ""])
        if not rows:
            continue
        widths = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(heads)]
        left = {1}
        fmt = lambda cells: "  ".join(c.ljust(w) if i in left else c.rjust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
        out_lines += ["", f"[{table}]" if len(board.tables) > 1 else "", fmt(heads), "-" * len(fmt(heads))]
        for i, cells in enumerate(rows):
            if i == len(mine) and mine:
                out_lines.append("")
            out_lines.append(fmt(cells))
        if len(theirs) > len(shown):
            out_lines.append(f"(+ {len(theirs) - len(shown)} more reported rows in the CSV and the report)")
    return terminal("\n".join(line for i, line in enumerate(out_lines) if line or i == 0 or out_lines[i - 1]) + "\n")


FORMATS = {"latex": (latex_table, "tex"), "markdown": (markdown_table, "md")}  # written as <suite>-table.<ext>
PRINTED = {**FORMATS, "terminal": (terminal_table, "")}  # what `leaderboard --format` / leaderboard_tables print
