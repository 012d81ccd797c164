"""A static, self-contained HTML report of one suite's leaderboard.

The page opens offline from disk: no server, no external assets. Plots are embedded as SVG data
URIs, styles are inline, and a five-line script only marks each plot image with
``data-rendered="yes|no"`` once the page has loaded (what the headless-browser test reads).
No timestamps: the same run store gives a byte-identical page.
"""
from __future__ import annotations

import base64
from html import escape

from ._html import MISSING, num, row_cls, th, txt
from .board import Board
from .columns import html_summary

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:1.5em 2em;color:#1b1b1b;
line-height:1.4;max-width:110em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
nav a{margin-right:1em}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0}
th,td{border:1px solid #d5d5d5;padding:.25em .5em;text-align:right;white-space:nowrap}
th{background:#f2f2f2;position:sticky;top:0}
td.text,th.text{text-align:left}
tr.reported td{background:#fafaf3;font-style:italic;color:#444}
td.missing{color:#aaa;text-align:center}
td.pos{color:#0a6b2d}td.neg{color:#a4161a}
td.err{white-space:normal;text-align:left;max-width:50em;font-family:monospace;font-size:.95em}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
.note{font-size:.88em;color:#444;max-width:60em}
dl.cols dt{font-family:monospace;font-weight:bold}dl.cols dd{margin:0 0 .4em 1.5em;font-size:.88em}
"""

SCRIPT = """window.addEventListener('load',function(){
document.querySelectorAll('img.plot').forEach(function(i){
i.setAttribute('data-rendered',(i.complete&&i.naturalWidth>0)?'yes':'no');});
document.body.setAttribute('data-loaded','yes');});"""

def summary_table(board: Board) -> str:
    """The leaderboard's columns that have an HTML form (peftbench.results.columns), one row per configuration."""
    head, cells = html_summary(board)
    body = [f"<tr{row_cls(r)}>{''.join(c)}</tr>" for r, c in zip(board.rows, cells)]
    return (f'<div class="scroll"><table id="leaderboard-table">{th(head, 0)}<tbody>{"".join(body)}'
            f"</tbody></table></div>")


def task_table(board: Board) -> str:
    lay = board.grid
    head = ["source", "config"] + list(lay.tasks)
    body = []
    for r in board.rows:
        cells = [txt(r.source), txt(r.label)]
        for t in lay.tasks:
            m, sd = r.mean.get(t), r.std.get(t)
            if m is None:
                cells.append(MISSING)
            else:
                cells.append(f"<td>{m:.2f}" + (f" ± {sd:.2f}" if sd is not None else "") + "</td>")
        body.append(f"<tr{row_cls(r)}>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table id="task-table">{th(head, 2)}<tbody>{"".join(body)}'
            f"</tbody></table></div>")


def delta_table(board: Board) -> str:
    lay = board.grid
    pairs = board.pairs()
    if not pairs:
        return ('<p class="note" id="vs-reported-none">No reproduced configuration of this suite maps to a reported '
                "method yet (mapping: the <code>peftbench_config</code> column of the reference CSV).</p>")
    head = ["config", "reported"] + list(lay.tasks) + [f"{g.capitalize()} mean" for g in lay.groups]
    if lay.groups:
        head.append("mean of groups")
    head.append("mean over tasks")
    body = []
    for mine, rep in pairs:
        cells = [txt(mine.label), txt(rep.label)]
        for t in lay.tasks:
            a, b = mine.mean.get(t), rep.mean.get(t)
            cells.append(num(None if a is None or b is None else a - b, 2, signed=True))
        cells += [num(mine.delta_groups.get(g), 2, signed=True) for g in lay.groups]
        if lay.groups:
            cells.append(num(mine.delta_overall_groups, 2, signed=True))
        cells.append(num(mine.delta_overall_tasks, 2, signed=True))
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table id="vs-reported-table">{th(head, 2)}<tbody>{"".join(body)}'
            f"</tbody></table></div>")


def sources_table(board: Board) -> str:
    head = ["reported", "source", "paired with", "notes"]
    body = "".join("<tr>" + txt(r.label) + txt(r.reference_source) + txt(r.paired_with) + txt(r.notes, "err")
                   + "</tr>" for r in sorted(board.reported, key=lambda r: r.label))
    return (f'<div class="scroll"><table id="sources-table">{th(head, 4)}<tbody>{body}</tbody></table></div>')


def problems_table(board: Board) -> str:
    runs = sorted(board.problem_runs(), key=lambda r: (r.row_key(), r.spec["task"], str(r.spec["stage"]),
                                                          int(r.spec["seed"]), r.path))
    if not runs:
        return '<p id="problems-none">None: every run record has status ok.</p>'
    head = ["status", "config", "task", "stage", "seed", "record", "error (last line)"]
    body = []
    for r in runs:
        err = str(r.record.error or "").strip().splitlines()
        body.append("<tr>" + txt(r.status) + txt(r.spec.get("config") or r.spec["method"]) + txt(r.spec["task"])
                    + txt(r.spec["stage"]) + f"<td>{int(r.spec['seed'])}</td>" + txt(r.path)
                    + txt(err[-1] if err else "", "err") + "</tr>")
    return f'<div class="scroll"><table id="problems-table">{th(head, 7)}<tbody>{"".join(body)}</tbody></table></div>'


def skipped_table(board: Board) -> str:
    items = [("unreadable", s.path, s.reason) for s in board.skipped]
    items += [("superseded", p, why) for p, why in board.superseded]
    if not items:
        return '<p id="skipped-none">None.</p>'
    body = "".join("<tr>" + txt(k) + txt(p) + txt(why, "err") + "</tr>" for k, p, why in items)
    return (f'<div class="scroll"><table id="skipped-table">{th(["kind", "file", "reason"], 3)}'
            f"<tbody>{body}</tbody></table></div>")


def _figure(name: str, svg: bytes, alt: str, caption: str, suite: str) -> str:
    data = base64.b64encode(svg).decode("ascii")
    return (f'<figure id="fig-{name}"><img class="plot" alt="{escape(alt)}" src="data:image/svg+xml;base64,{data}">'
            f"<figcaption>{caption} (also <code>{escape(suite)}-{name}.png</code> / <code>.svg</code>)</figcaption></figure>")


def render_report(board: Board, svgs: dict[str, bytes]) -> str:
    lay = board.grid
    s = lay.suite
    n_ok = sum(r.status == "ok" for r in board.runs)
    counts = {k: sum(r.status == k for r in board.runs) for k in ("failed", "diverged")}
    unfinished = sum(r.status not in ("ok", "failed", "diverged") for r in board.runs)
    groups_txt = (", ".join(f"{g} ({len(ts)})" for g, ts in lay.groups.items()) if lay.groups else "none")
    headline = "mean of the group means" if lay.groups else "mean over tasks"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>peftbench leaderboard: {escape(s)}</title>",
        f"<style>{CSS}</style></head>",
        "<body>",
        f"<h1>peftbench leaderboard: {escape(s)}</h1>",
        f'<p class="note" id="summary">{len(lay.tasks)} tasks; groups: {escape(groups_txt)}. '
        f"{len(board.runs)} run records ({n_ok} ok, {counts['failed']} failed, {counts['diverged']} diverged, "
        f"{unfinished} unfinished), {len(board.used)} of them counted (final stage, status ok); "
        f"{len(board.skipped)} unreadable files skipped. {len(board.reproduced)} reproduced configurations, "
        f"{len(board.reported)} reported rows.</p>",
        '<nav><a href="#leaderboard">Leaderboard</a><a href="#per-task">Per task</a><a href="#plots">Plots</a>'
        + ('<a href="#vs-reported">Reproduced vs reported</a>' if board.has_reference else "")
        + '<a href="#problems">Failed / diverged</a><a href="#skipped">Skipped files</a>'
          '<a href="#conventions">Conventions</a></nav>',
        '<section id="leaderboard"><h2>Leaderboard</h2>',
        f'<p class="note">One row per method configuration, from final-stage records with status ok; ranked by the '
        f"{headline}. A dash is empty: a task without a finished final run, or a mean over tasks of which "
        f"one is missing (never averaged over the rest)."
        + (" Reported rows (italic) are the papers' numbers, their means recomputed from the per-task values."
           if board.reported else "") + "</p>",
        summary_table(board),
        "</section>",
        '<section id="per-task"><h2>Per task: top-1 % (mean ± sample std over the final seeds)</h2>',
        task_table(board),
        "</section>",
        '<section id="plots"><h2>Plots</h2>',
    ]
    if "pareto" in svgs:
        parts.append(_figure("pareto", svgs["pareto"], f"{s}: accuracy vs Tuned/Total parameters",
                             "Top-1 accuracy against Tuned/Total % (log scale), one panel per group and overall "
                             "(per task while no group is complete)"
                             + ("; filled markers reproduced, hollow markers reported" if board.reported else "")
                             + "; lines: Pareto frontiers", s))
    if "tasks" in svgs:
        parts.append(_figure("tasks", svgs["tasks"], f"{s}: per-task accuracy",
                             "Per-task top-1 of the reproduced configurations (mean ± sample std)"
                             + ("; hollow diamonds: the paired reported value" if board.pairs() else ""), s))
    parts.append("</section>")
    if board.has_reference:
        parts += ['<section id="vs-reported"><h2>Reproduced − reported (percentage points)</h2>',
                  delta_table(board),
                  "<h3>Reported numbers: sources and notes</h3>",
                  '<p class="note">From <code>results/reference/</code> (docs/protocols.md §13); a reported row pairs with the '
                  "reproduced row whose config is its <code>peftbench_config</code>. Means are recomputed from "
                  "the per-task values with the same code as the reproduced rows.</p>",
                  sources_table(board), "</section>"]
    parts += [
        '<section id="problems"><h2>Failed, diverged and unfinished runs (all stages)</h2>', problems_table(board),
        "</section>",
        '<section id="skipped"><h2>Skipped files</h2>', skipped_table(board), "</section>",
        '<section id="conventions"><h2>Conventions</h2><dl class="cols">',
        "<dt>accuracy</dt><dd>metrics.top1 of final-stage runs (last epoch, on the stage's eval split); mean over "
        "seeds, sample standard deviation (empty with one seed).</dd>",
        "<dt>group mean / overall</dt><dd>group mean = mean of the group's task means; overall = mean of the group "
        "means, and separately the mean over all tasks (the two conventions the papers use). Empty when a task is "
        "missing.</dd>",
        "<dt>Tuned/Total %</dt><dd>params.tuned_total_pct (trainable incl. head / all parameters × 100) averaged over "
        "the tasks done; per group in the group panels.</dd>",
        "<dt>peak memory, images/s</dt><dd>max of timing.peak_memory_mb and mean of timing.train_images_per_s over "
        "the counted runs; the memory kind (CUDA max allocated vs process peak RSS) and device are in the CSV.</dd>",
        "<dt>Pareto</dt><dd>no other row of the same source has lower-or-equal Tuned/Total and higher-or-equal "
        "overall accuracy (one strictly).</dd>",
        "<dt>files</dt><dd>" + escape(f"{s}-leaderboard.csv, {s}-runs.csv")
        + (escape(f", {s}-vs-reported.csv") if board.has_reference else "")
        + "; columns are documented in docs/leaderboard.md.</dd>",
        "</dl></section>",
        f"<script>{SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
