"""A static, self-contained HTML report of one suite's leaderboard.

The page opens offline from disk: no server, no external assets. Plots are embedded as SVG data
URIs, styles are inline, and a five-line script only marks each plot image with
``data-rendered="yes|no"`` once the page has loaded (what the headless-browser test reads).
No timestamps: the same run store gives a byte-identical page.
"""
from __future__ import annotations

import base64
from typing import TYPE_CHECKING

from .._text import html as escape
from ..store import ENDED, RunStatus
from ._html import MISSING, num, row_cls, th, txt
from .board import TIE_Z, Board, freshness
from .columns import html_summary

if TYPE_CHECKING:
    from .compare import Comparison

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
.banner{background:#fff3cd;border:2px solid #b8860b;padding:.6em 1em;font-weight:bold;max-width:60em}
dl.cols dt{font-family:monospace;font-weight:bold}dl.cols dd{margin:0 0 .4em 1.5em;font-size:.88em}
#leaderboard-table td:nth-child(2){white-space:normal;overflow-wrap:anywhere;min-width:7em;max-width:15em}
span.sd{color:#666;font-size:.9em}span.tie{color:#8a5a00;font-weight:bold}
span.badge{font-size:.75em;background:#e8e8e8;color:#444;border-radius:3px;padding:0 .3em;font-style:normal}
td.control{color:#777;text-align:center}td.cached{color:#7a4d00}
td.sig{font-weight:bold}
ul.foot{font-size:.85em;color:#444;margin:.3em 0 0 0;padding-left:1.3em;max-width:75em}
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


def leaderboard_notes(board: Board) -> str:
    """What the marks of the summary table mean, only those that occur."""
    items = ["<b>± std</b>: sample standard deviation over seeds of the per-seed mean (over the seeds every task "
             "of the mean has; none with one seed)."]
    ranked = [r for r in board.reproduced if r.rank]
    if any(r.tied_with for r in ranked):
        items.append(f"<b>≈k</b> beside a rank: within noise of the row ranked k (the headline difference is within "
                     f"{TIE_Z} standard errors; each row's standard error comes from the per-task seed noise pooled "
                     "over the configurations with two or more seeds, and its own seed counts: docs/results.md). "
                     "Rows that tie are not distinguishable on these runs; more seeds would tell.")
    no_noise = [t for t, v in board.noise.items() if v is None]
    if ranked and no_noise:
        items.append("No ties are marked where a task has no noise estimate (no configuration has two or more seeds "
                     "on " + escape(", ".join(no_noise[:5]) + (" …" if len(no_noise) > 5 else "")) + ").")
    if any(r.control for r in board.reproduced):
        items.append("<b>control</b>: a configuration on a control backbone (e.g. random weights): listed apart, not "
                     "ranked, not on the Pareto frontier.")
    if any(r.cached_features in ("yes", "mixed") for r in board.reproduced):
        items.append("<b>*</b> images/s: a head trained on cached features (the frozen backbone runs once), not "
                     "comparable with backbone training.")
    rss = [r for r in board.reproduced if r.peak_memory_mb is not None and r.memory_kind != "cuda_max_allocated"]
    if rss and not any(r.memory_kind == "cuda_max_allocated" for r in board.reproduced):
        items.append("Peak memory is not shown: these runs measured the process-wide peak RSS (CPU), the same for "
                     "every row of one process; <code>peak_memory_mb</code> and <code>memory_kind</code> are in the CSV.")
    elif rss:
        items.append("<b>RSS</b>: a process-wide peak RSS (CPU run), not the method's memory; value in the CSV.")
    return '<ul class="foot" id="leaderboard-notes">' + "".join(f"<li>{x}</li>" for x in items) + "</ul>"


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


def _p_cell(line, alpha: float) -> str:
    if line is None or line.p_sign_flip is None:
        return "<td></td>"
    cls = ' class="sig"' if line.significant(alpha) else ""
    return f"<td{cls}>{line.p_sign_flip:.2g}</td>"


def _delta_cell(line, alpha: float) -> str:
    if line is None or line.delta is None:
        return MISSING
    sig = bool(line.significant(alpha))
    cls = "pos" if line.delta > 0 else ("neg" if line.delta < 0 else "")
    cls = (cls + (" sig" if sig else "")).strip()
    tip = [f"B − A = {line.delta:+.3f}"]
    if line.delta_std is not None:
        tip.append(f"std over seeds {line.delta_std:.3f}")
    tip.append(f"{line.pairs} paired" if line.pairs else "unpaired")
    if line.se is not None:
        tip.append(f"SE {line.se:.3f}")
    for name, p in (("sign-flip", line.p_sign_flip), ("sign-flip by task", line.p_task_flip), ("t", line.p_t),
                    ("Wilcoxon", line.p_wilcoxon), ("Holm-adjusted", line.p_holm)):
        if p is not None:
            tip.append(f"p {name} {p:.3g}")
    sd = f'<span class="sd"> ± {line.delta_std:.2f}</span>' if line.delta_std is not None and line.scope != "task" else ""
    star = ("**" if line.significant_holm(alpha) else "*") if sig else ""  # (** also after Holm's correction)
    return f'<td class="{cls}" title="{escape("; ".join(tip))}">{line.delta:+.2f}{sd}{star}</td>'


def comparison_section(cmp: "Comparison") -> str:
    """The HTML section of a comparison (peftbench.results.compare): B − A per configuration."""
    lay = cmp.grid
    means = [("group", g, f"{g.capitalize()} mean") for g in lay.groups]
    if lay.groups:
        means.append(("overall", "mean_of_groups", "mean of groups"))
    means.append(("overall", "mean_over_tasks", "mean over tasks"))
    head = ["A", "B"] + [h for _, _, h in means] + ["p (sign-flip)", "p (Wilcoxon)", "pairs"]
    body = []
    for m in cmp.matches:
        hl = m.line("overall", cmp.headline_name)
        cells = [txt(m.a.label), txt(m.b.label)] + [_delta_cell(m.line(sc, n), cmp.alpha) for sc, n, _ in means]
        cells += [_p_cell(hl, cmp.alpha), f"<td>{hl.p_wilcoxon:.2g}</td>" if hl and hl.p_wilcoxon is not None
                  else "<td></td>", f"<td>{hl.pairs if hl else ''}</td>"]
        body.append(f"<tr>{''.join(cells)}</tr>")
    task_body = []
    for m in cmp.matches:
        cells = [txt(m.a.label)] + [_delta_cell(m.line("task", t), cmp.alpha) for t in lay.tasks]
        task_body.append(f"<tr>{''.join(cells)}</tr>")
    what = "paired by seed" if cmp.paired else "unpaired (side B has no seeds)"
    unmatched = ""
    if cmp.only_a or cmp.only_b:
        unmatched = ('<p class="note" id="compare-unmatched">Without a match: '
                     + (f"A: {escape(', '.join(cmp.only_a))}. " if cmp.only_a else "")
                     + (f"B: {escape(', '.join(cmp.only_b))}." if cmp.only_b else "") + "</p>")
    return "".join([
        '<section id="compare"><h2>Comparison: B − A (percentage points)</h2>',
        f'<p class="note">A = <code>{escape(cmp.label_a)}</code>, B = <code>{escape(cmp.label_b)}</code>; '
        f"configurations matched on {escape(', '.join(cmp.match_fields))}; {len(cmp.matches)} matched, {what}. "
        f"Bold with * : p &lt; {cmp.alpha:g} in the sign-flip permutation test (per task over its seeds, per mean "
        "over the (task, seed) pairs, weighted as the mean weighs its tasks); Wilcoxon: signed-rank test over the "
        "tasks' deltas. With n seeds a task's smallest sign-flip p is 2/2ⁿ (0.25 with 3 seeds): per-task rows "
        "rarely reach significance; the hover text has the paired t-test. ** : also after Holm's correction over "
        f"the {len(cmp.matches)} configurations (the hover text's Holm-adjusted p). Formulas: docs/results.md.</p>",
        unmatched,
        f'<div class="scroll"><table id="compare-table">{th(head, 2)}<tbody>{"".join(body)}</tbody></table></div>',
        "<h3>Per task</h3>",
        f'<div class="scroll"><table id="compare-task-table">{th(["A"] + list(lay.tasks), 1)}<tbody>'
        f'{"".join(task_body)}</tbody></table></div>',
        "</section>"])


def render_comparison(cmp: "Comparison") -> str:
    """A standalone page with the comparison section (``peftbench compare``)."""
    s = cmp.grid.suite
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>peftbench compare: {escape(s)}</title>", f"<style>{CSS}</style></head>", "<body>",
        f"<h1>peftbench compare: {escape(s)}</h1>", comparison_section(cmp),
        f"<script>{SCRIPT}</script>", "</body></html>"]) + "\n"


def _figure(name: str, svg: bytes, alt: str, caption: str, suite: str) -> str:
    data = base64.b64encode(svg).decode("ascii")
    return (f'<figure id="fig-{name}"><img class="plot" alt="{escape(alt)}" src="data:image/svg+xml;base64,{data}">'
            f"<figcaption>{caption} (also <code>{escape(suite)}-{name}.png</code> / <code>.svg</code>)</figcaption></figure>")


def render_report(board: Board, svgs: dict[str, bytes], comparison: "Comparison | None" = None) -> str:
    lay = board.grid
    s = lay.suite
    n_ok = sum(r.status == RunStatus.OK for r in board.runs)
    counts = {k: sum(r.status == k for r in board.runs) for k in ("failed", "diverged")}
    unfinished = sum(r.status not in ENDED for r in board.runs)
    groups_txt = (", ".join(f"{g} ({len(ts)})" for g, ts in lay.groups.items()) if lay.groups else "none")
    headline = "mean of the group means" if lay.groups else "mean over tasks"
    fresh = freshness(board)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>peftbench leaderboard: {escape(s)}</title>",
        f"<style>{CSS}</style></head>",
        "<body>",
        f"<h1>peftbench leaderboard: {escape(s)}</h1>",
        *([f'<p class="banner" id="stale-banner">{escape(fresh.text)}</p>'] if fresh.text else []),
        f'<p class="note" id="summary">{len(lay.tasks)} tasks; groups: {escape(groups_txt)}. '
        f"{len(board.runs)} run records ({n_ok} ok, {counts['failed']} failed, {counts['diverged']} diverged, "
        f"{unfinished} unfinished), {len(board.used)} of them counted (final stage, status ok); "
        f"{len(board.skipped)} unreadable files skipped. {len(board.reproduced)} reproduced configurations, "
        f"{len(board.reported)} reported rows.</p>",
        f'<p class="note" id="code">The counted records were made by engine code {escape(", ".join(fresh.engines) or "?")}'
        f"; the installed engine is {escape(fresh.installed_engine)} (each row's method and engine fingerprints: the "
        "CSV's <code>code</code> column).</p>",
        '<nav><a href="#leaderboard">Leaderboard</a><a href="#per-task">Per task</a><a href="#plots">Plots</a>'
        + ('<a href="#vs-reported">Reproduced vs reported</a>' if board.has_reference else "")
        + '<a href="#problems">Failed / diverged</a><a href="#skipped">Skipped files</a>'
          + ('<a href="#compare">Comparison</a>' if comparison is not None else "")
        + '<a href="#conventions">Conventions</a></nav>',
        '<section id="leaderboard"><h2>Leaderboard</h2>',
        f'<p class="note">One row per method configuration, from final-stage records with status ok; ranked by the '
        f"{headline}. A dash is empty: a task without a finished final run, or a mean over tasks of which "
        f"one is missing (never averaged over the rest)."
        + (" Reported rows (italic) are the papers' numbers, their means recomputed from the per-task values."
           if board.reported else "") + "</p>",
        summary_table(board),
        leaderboard_notes(board),
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
                             + "; error bars: ± std over seeds; lines: Pareto frontiers"
                             + ("; dotted: controls, off the frontier" if any(r.control for r in board.reproduced)
                                else ""), s))
    if "tasks" in svgs:
        parts.append(_figure("tasks", svgs["tasks"], f"{s}: per-task accuracy",
                             "Per-task top-1, configurations × tasks (mean ± sample std over seeds; colour: the "
                             "cell's place within its column), then the group and overall means"
                             + ("; reported rows below the line" if board.reported else ""), s))
    parts.append("</section>")
    if board.has_reference:
        parts += ['<section id="vs-reported"><h2>Reproduced − reported (percentage points)</h2>',
                  delta_table(board),
                  "<h3>Reported numbers: sources and notes</h3>",
                  '<p class="note">From <code>results/reference/</code> (docs/protocols.md §13); a reported row pairs with the '
                  "reproduced row whose config is its <code>peftbench_config</code>. Means are recomputed from "
                  "the per-task values with the same code as the reproduced rows.</p>",
                  sources_table(board), "</section>"]
    if comparison is not None:
        parts.append(comparison_section(comparison))
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
        "the counted runs; the memory kind (CUDA max allocated vs process peak RSS) and device are in the CSV. A "
        "process-wide RSS is not shown per row; images/s of heads on cached features are marked *.</dd>",
        "<dt>Pareto</dt><dd>no other row of the same source has lower-or-equal Tuned/Total and higher-or-equal "
        "overall accuracy (one strictly); controls take no part.</dd>",
        "<dt>uncertainty</dt><dd>± is the sample std over seeds (per task: of the seeds' top-1; per mean: of the "
        "per-seed means). Ties (≈k): |h_a − h_b| ≤ 1.96·√(SE_a² + SE_b²) with SE² = Σ_t w_t² σ_t² / n_t, σ_t the "
        "task's seed std pooled over the configurations with ≥ 2 seeds, w_t the task's weight in the headline, "
        "n_t the row's seeds (docs/results.md).</dd>",
        "<dt>files</dt><dd>" + escape(f"{s}-leaderboard.csv, {s}-runs.csv")
        + (escape(f", {s}-vs-reported.csv") if board.has_reference else "")
        + "; columns are documented in docs/leaderboard.md.</dd>",
        "</dl></section>",
        f"<script>{SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
