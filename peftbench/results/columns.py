"""Every column of the leaderboard files, declared once.

A :class:`Column` says its CSV name, what it means (docs/leaderboard.md is checked against these
docs), how a row's cell is computed, and, when it appears in the HTML report's summary table, its
header there and its HTML cell. Three tables: ``leaderboard`` (``<suite>-leaderboard.csv``, one row
per configuration), ``runs`` (``<suite>-runs.csv``, one row per record) and ``vs-reported``. A
third-party package adds a column with a ``peftbench.columns`` entry point naming a Column (or a
module calling :func:`register_column`); ``after=`` places it, else it comes last (docs/plugins.md).

Per-task and per-group columns are templates (``per="task"``: ``{task}``; ``per="group"``:
``{group}``) expanded in the suite's order; consecutive per-task columns are interleaved task by
task (``cifar100, cifar100_std, caltech101, ...``).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .._registry import Registry
from .._text import csv_cell
from .._text import html as escape
from ..store import finite
from ._html import MISSING, integer, mean_std, num, txt
from .board import Board, Row, Run, code_text, diff

TABLES = ("leaderboard", "runs", "vs-reported", "compare")


@dataclass(frozen=True)
class Column:
    name: str  # CSV header; a template with {task} / {group} when ``per`` is set
    doc: str
    cell: Callable[..., str]  # (row, board) or (row, board, task|group) -> the CSV text
    table: str = "leaderboard"
    per: str | None = None  # None | "task" | "group"
    when: Callable[[Board], bool] | None = None  # the column exists only when this is true
    html: str | None = None  # header in the HTML summary table (None: not shown); may use {Group}
    html_cell: Callable[..., str] | None = None  # (row, board[, key]) -> "<td>...</td>"
    html_when: Callable[[Board], bool] | None = None
    html_order: int = 100  # the HTML summary shows its columns by (html_order, CSV order)
    after: str | None = None  # place after this column (a plugin's column); None: in registration order


def _check_table(col: Column) -> None:
    if col.table not in TABLES:
        raise ValueError(f"column {col.name!r}: table {col.table!r} is not one of {', '.join(TABLES)}")


COLUMNS: Registry[Column] = Registry("column", group="peftbench.columns", base=Column,
                                     key=lambda c: f"{c.table}:{c.name}", check=_check_table)


def register_column(col: Column, provider: str = "") -> Column:
    return COLUMNS.add_object(col, provider)


def columns(table: str) -> list[Column]:
    """The columns of ``table`` in order (``after=`` placements resolved)."""
    cols = [c for c in COLUMNS.values_in_order() if c.table == table]
    ordered = [c for c in cols if c.after is None]
    for c in cols:
        if c.after is not None:
            names = [o.name for o in ordered]
            ordered.insert(names.index(c.after) + 1 if c.after in names else len(ordered), c)
    return ordered


def _keys(col: Column, board: Board) -> list[str]:
    return list(board.grid.tasks) if col.per == "task" else list(board.grid.groups)


def _expand(cols: list[Column], board: Board) -> list[tuple[Column, str | None]]:
    """(column, key) pairs in file order: per-task runs interleaved task by task."""
    out: list[tuple[Column, str | None]] = []
    i = 0
    live = [c for c in cols if c.when is None or c.when(board)]
    while i < len(live):
        c = live[i]
        if c.per is None:
            out.append((c, None))
            i += 1
            continue
        j = i
        while j < len(live) and live[j].per == c.per:
            j += 1
        for key in _keys(c, board):
            out += [(d, key) for d in live[i:j]]
        i = j
    return out


def _name(col: Column, key: str | None) -> str:
    return col.name.format(task=key, group=key) if key is not None else col.name


def _cell(col: Column, row: Any, board: Board, key: str | None) -> str:
    return col.cell(row, board, key) if col.per else col.cell(row, board)


def table(name: str, board: Board, rows: list) -> tuple[list[str], list[dict[str, str]]]:
    """(header, records) of ``name`` for ``rows``."""
    pairs = _expand(columns(name), board)
    header = [_name(c, k) for c, k in pairs]
    return header, [{_name(c, k): _cell(c, r, board, k) for c, k in pairs} for r in rows]


def csv_text(columns: list[str], records: list[dict[str, str]]) -> str:
    """The CSV of ``records``: every cell (and header) through :func:`peftbench._text.csv_cell`, so that
    no text from a record is read as a spreadsheet formula (numbers stay numbers)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([csv_cell(c) for c in columns])
    for r in records:
        extra = set(r) - set(columns)
        if extra:
            raise ValueError(f"dict contains fields not in fieldnames: {', '.join(map(repr, sorted(extra)))}")
        w.writerow([csv_cell(r.get(c, "")) for c in columns])
    return buf.getvalue()


def html_summary(board: Board) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the HTML summary table (the leaderboard columns that have an HTML form)."""
    expanded = _expand(columns("leaderboard"), board)
    pairs = [(c, k) for c, k in expanded if c.html is not None and (c.html_when is None or c.html_when(board))]
    pairs.sort(key=lambda ck: ck[0].html_order)  # stable: CSV order within one html_order
    head = [c.html.format(Group=(k or "").capitalize(), group=k, task=k) for c, k in pairs]
    body = [[(c.html_cell(r, board, k) if c.per else c.html_cell(r, board)) for c, k in pairs] for r in board.rows]
    return head, body


# ---------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------


def fmt(x: Any, digits: int = 4) -> str:
    """The CSV spelling of a number: fixed decimals, empty for None."""
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def plain(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return repr(x)
    return str(x)


def _rep(r: Row) -> bool:
    return r.source == "reproduced"


def _groups(board: Board) -> bool:
    return bool(board.grid.groups)


def _seeds(r: Row, board: Board) -> list[int]:
    return [r.seeds[t] for t in board.grid.tasks if r.seeds.get(t)]


def _seeds_html(r: Row, board: Board) -> str:
    s = sorted(set(_seeds(r, board)))
    text = s[0] if len(s) == 1 else ("–".join(map(str, (s[0], s[-1]))) if s else "")
    return f"<td>{text}</td>"


def _rounded(x: float | None) -> str:
    return fmt(None if x is None else float(round(x)), 0)


def _only_rep(fn: Callable[[Row], str]) -> Callable[[Row, Board], str]:
    return lambda r, b: fn(r) if _rep(r) else "<td></td>"


def _rank_html(r: Row, b: Board) -> str:
    if not r.rank:
        return txt("control", "control") if r.control else "<td></td>"
    if r.tied_with:
        return (f'<td class="tie" title="within noise of rank {r.tied_with}: the headline difference is within '
                f'1.96 standard errors">{r.rank} <span class="tie">≈{r.tied_with}</span></td>')
    return f"<td>{r.rank}</td>"


def _config_html(r: Row, b: Board) -> str:
    if r.control:
        return (f'<td class="text" title="{r.control}: a control, not ranked and not on the Pareto frontier">'
                f'{escape(r.label)} <span class="badge">control</span></td>')
    return txt(r.label)


def _cuda_memory(b: Board) -> bool:
    return any(r.memory_kind == "cuda_max_allocated" for r in b.reproduced)


def _memory_html(r: Row, b: Board) -> str:
    if not _rep(r):
        return "<td></td>"
    if r.memory_kind != "cuda_max_allocated":
        return ('<td class="missing" title="process-wide peak RSS (CPU runs): the whole process, not the method; '
                'peak_memory_mb and memory_kind in the CSV">RSS</td>') if r.peak_memory_mb is not None else MISSING
    return num(r.peak_memory_mb, 0)


def _ips_html(r: Row, b: Board) -> str:
    if not _rep(r):
        return "<td></td>"
    if r.cached_features in ("yes", "mixed") and r.images_per_s is not None:
        return (f'<td class="cached" title="a head trained on cached features (the backbone runs once): not '
                f'comparable with backbone training">{r.images_per_s:.1f}*</td>')
    return num(r.images_per_s, 1)


def _ips_kind(r: Row, b: Board) -> str:
    return {"yes": "cached_features_head", "no": "backbone_training", "mixed": "mixed"}.get(r.cached_features, "")


def _delta_html(r: Row, b: Board) -> str:
    d = r.delta_overall_groups if b.grid.groups else r.delta_overall_tasks
    return num(d, 2, signed=True) if r.paired_with else "<td></td>"


def _search(r: Row, b: Board) -> str:
    """The searches that selected the row's counted runs (``searches`` when a run served several sweeps)."""
    if not _rep(r):
        return ""
    key = (r.config, r.backbone, r.checkpoint_id, r.protocol, r.precision)
    found = set()
    for run in b.runs:
        if run.path in b.used and run.row_key() == key:
            found.update(run.record.get("searches") or [str(run.spec.get("search") or "grid")])
    return " + ".join(sorted(found))


# ---------------------------------------------------------------------------------------------
# <suite>-leaderboard.csv
# ---------------------------------------------------------------------------------------------

_L = [
    Column("rank", "position by the headline mean (mean of group means where the suite has groups, else the mean "
           "over tasks); empty when that mean is empty, and for controls", lambda r, b: fmt(r.rank),
           html="rank", html_cell=_rank_html, html_order=0),
    Column("source", "reproduced (from the run store) or reported (a paper's numbers)", lambda r, b: r.source,
           html="source", html_cell=lambda r, b: txt(r.source), html_order=200),
    Column("config", "the method and the options set on the command line (disambiguated when one config ran on "
           "several backbones/protocols)", lambda r, b: r.label, html="config", html_cell=_config_html,
           html_order=1),
    Column("method", "the registered method", lambda r, b: r.method),
    Column("backbone", "backbone name, with @<checkpoint hash> for a local --checkpoint",
           lambda r, b: r.backbone + (f"@{r.checkpoint_id}" if r.checkpoint_id else ""),
           html="backbone", html_cell=lambda r, b: txt(r.backbone), html_order=200),
    Column("backbone_table", "the papers' table of the backbone (its preset's table, e.g. ViT-B/16 ImageNet-21k, Swin-B "
           "ImageNet-21k, ViT-B/16 MAE): ranks, ties and the Pareto frontier are within one table",
           lambda r, b: r.table, html="backbone table", html_cell=lambda r, b: txt(r.table),
           html_when=lambda b: len(b.tables) > 1, html_order=2),
    Column("protocol", "the evaluation protocol", lambda r, b: r.protocol,
           html="protocol", html_cell=lambda r, b: txt(r.protocol), html_order=200),
    Column("recipe", "the training recipe: a paper's (vpt, e2vpt, noah, ssf...: methods/papers/), peftbench "
           "<protocol> for the unified protocols, card <name> for --protocol card", lambda r, b: r.basis.recipe),
    Column("data_pipeline", "the image files and their preprocessing", lambda r, b: r.basis.data_pipeline),
    Column("selection", "how the configuration was chosen and which epoch is reported", lambda r, b: r.basis.selection),
    Column("mean_convention", "which overall mean a reported row's source prints (groups | tasks)",
           lambda r, b: r.basis.mean_convention),
    Column("like_for_like", "paired rows: yes when recipe, data pipeline, backbone and selection agree, else no: "
           "what differs (the deltas of such a pair compare unlike with unlike)", lambda r, b: r.like_for_like),
    Column("{task}", "mean top-1 (%) over the final seeds of the task", lambda r, b, t: fmt(r.mean.get(t)), per="task"),
    Column("{task}_std", "sample std over the seeds (empty with one seed)", lambda r, b, t: fmt(r.std.get(t)),
           per="task"),
    Column("{group}_mean", "mean of the group's task means (empty unless every task of the group is done)",
           lambda r, b, g: fmt(r.group_mean.get(g)), per="group",
           html="{Group} mean", html_cell=lambda r, b, g: mean_std(r.group_mean.get(g), r.group_std.get(g)),
           html_order=10),
    Column("{group}_mean_std", "sample std over seeds of the per-seed group mean (the seeds every task of the group "
           "has; empty with fewer than two)", lambda r, b, g: fmt(r.group_std.get(g)), per="group"),
    Column("overall_mean_of_groups", "mean of the group means (VPT, E^2VPT, NOAH, SSF, Adapter+ convention)",
           lambda r, b: fmt(r.overall_groups), when=_groups,
           html="overall: mean of group means", html_cell=lambda r, b: mean_std(r.overall_groups, r.overall_groups_std),
           html_order=11),
    Column("overall_mean_of_groups_std", "sample std over seeds of the per-seed mean of group means",
           lambda r, b: fmt(r.overall_groups_std), when=_groups),
    Column("overall_mean_of_tasks", "mean over all tasks (V-PETL Bench convention)", lambda r, b: fmt(r.overall_tasks),
           html="overall: mean over tasks", html_cell=lambda r, b: mean_std(r.overall_tasks, r.overall_tasks_std),
           html_order=11),
    Column("overall_mean_of_tasks_std", "sample std over seeds of the per-seed mean over tasks",
           lambda r, b: fmt(r.overall_tasks_std)),
    Column("headline_se", "standard error of the headline mean from the suite's per-task seed noise (pooled over "
           "the configurations with two or more seeds): sqrt(sum_t w_t^2 sigma_t^2 / n_t)",
           lambda r, b: fmt(r.headline_se)),
    Column("tied_with_rank", "the best rank whose row this row is within noise of (|difference| <= 1.96 standard "
           "errors of the difference): a tie; empty when distinguishable from every row above",
           lambda r, b: fmt(r.tied_with)),
    Column("tasks_done", "tasks with at least one finished final run", lambda r, b: fmt(r.tasks_done),
           html="tasks done", html_cell=lambda r, b: f"<td>{r.tasks_done}/{len(b.grid.tasks)}</td>", html_order=12),
    Column("tasks_total", "tasks of the suite", lambda r, b: fmt(len(b.grid.tasks))),
    Column("seeds_min", "fewest seeds of a done task", lambda r, b: fmt(min(_seeds(r, b))) if _seeds(r, b) else "",
           html="seeds", html_cell=_seeds_html, html_order=5),
    Column("seeds_max", "most seeds of a done task", lambda r, b: fmt(max(_seeds(r, b))) if _seeds(r, b) else ""),
    Column("tuned_total_pct", "Tuned/Total % (tuned parameters incl. head / all parameters × 100), mean over the "
           "tasks done", lambda r, b: fmt(r.tuned_total_pct),
           html="Tuned/Total %", html_cell=lambda r, b: num(r.tuned_total_pct, 3), html_order=2),
    Column("trainable_params", "trainable parameters incl. head (mean over tasks: heads differ)",
           lambda r, b: _rounded(r.trainable), html="trainable params",
           html_cell=_only_rep(lambda r: integer(r.trainable)), html_order=3),
    Column("tuned_params", "tuned parameters incl. head (params.tuned: what Tuned/Total counts; below "
           "trainable_params where a method prunes, e.g. e2vpt-prune), mean over tasks", lambda r, b: _rounded(r.tuned_params),
           html="tuned params", html_cell=_only_rep(lambda r: integer(r.tuned_params)), html_order=4),
    Column("trainable_params_excl_head", "trainable parameters without the head", lambda r, b: _rounded(r.trainable_excl_head)),
    Column("peak_memory_mb", "max of the runs' peak memory (MB); see memory_kind (process_peak_rss is process-wide: "
           "the report does not show it)", lambda r, b: fmt(r.peak_memory_mb, 1),
           html="peak memory (MB)", html_cell=_memory_html, html_when=_cuda_memory),
    Column("memory_kind", "cuda_max_allocated (torch's CUDA allocator) or process_peak_rss (the whole process)",
           lambda r, b: r.memory_kind),
    Column("train_images_per_s", "mean training images/s of the counted runs (see train_images_kind)",
           lambda r, b: fmt(r.images_per_s, 1), html="train images/s", html_cell=_ips_html),
    Column("train_images_kind", "backbone_training, or cached_features_head (a head trained on features computed once: "
           "not comparable), or mixed", _ips_kind),
    Column("device", "the device of the counted runs (mixed: several)", lambda r, b: r.device),
    Column("precision", "numeric precision of the runs (fp32 | tf32 | bf16 | fp16); seeds of different precisions "
           "are separate rows", lambda r, b: r.precision),
    Column("search", "how the counted final runs' hyper-parameters were selected: grid (every point trained to the "
           "end, the papers' protocol) or halving (successive halving, docs/sweeps.md); joined with + when runs "
           "were selected by both", lambda r, b: _search(r, b)),
    Column("failed_runs", "runs with status failed (all stages)", lambda r, b: fmt(r.failed) if _rep(r) else "",
           html="failed", html_cell=_only_rep(lambda r: f"<td>{r.failed}</td>")),
    Column("diverged_runs", "runs with status diverged (all stages)", lambda r, b: fmt(r.diverged) if _rep(r) else "",
           html="diverged", html_cell=_only_rep(lambda r: f"<td>{r.diverged}</td>")),
    Column("stale_runs", "counted runs produced by other code than the installed one (results may be stale; "
           "`peftbench run --rerun-stale` reruns them)", lambda r, b: fmt(r.stale) if _rep(r) else ""),
    Column("code", "the code fingerprints of the counted runs' records: method <fp> engine <fp> (peftbench.fingerprint: "
           "module names and syntax trees; several joined with ;)", lambda r, b: r.code if _rep(r) else ""),
    Column("unfinished_runs", "runs not ended (running, interrupted)", lambda r, b: fmt(r.unfinished) if _rep(r) else "",
           html="unfinished", html_cell=_only_rep(lambda r: f"<td>{r.unfinished}</td>")),
    Column("pareto", "yes when no other row of the same source has lower-or-equal Tuned/Total and higher-or-equal "
           "headline accuracy (one strictly); empty for controls", lambda r, b: fmt(r.pareto),
           html="Pareto", html_cell=lambda r, b: txt({True: "yes", False: "no", None: ""}[r.pareto], "center"),
           html_order=13),
    Column("control", "why the row is a control (the backbone preset's control, e.g. a random-weight backbone): not "
           "ranked, not on the Pareto frontier, drawn apart in the plots", lambda r, b: r.control),
    Column("paired_with", "the reported row this reproduced row is compared with (and vice versa)",
           lambda r, b: r.paired_with, html="paired with", html_cell=lambda r, b: txt(r.paired_with)),
    Column("delta_{group}_mean", "reproduced − reported group mean (paired rows)",
           lambda r, b, g: fmt(r.delta_groups.get(g)), per="group"),
    Column("delta_overall_mean_of_groups", "reproduced − reported mean of group means",
           lambda r, b: fmt(r.delta_overall_groups), when=_groups),
    Column("delta_overall_mean_of_tasks", "reproduced − reported mean over tasks", lambda r, b: fmt(r.delta_overall_tasks),
           html="Δ overall vs reported", html_cell=_delta_html, html_when=lambda b: b.has_reference, html_order=14),
    Column("reference_source", "where a reported row's numbers come from", lambda r, b: r.reference_source),
    Column("notes", "what else a reader must know about the row", lambda r, b: r.notes),
]

# ---------------------------------------------------------------------------------------------
# <suite>-runs.csv
# ---------------------------------------------------------------------------------------------


def _hp(key: str) -> Callable[[Run, Board], str]:
    return lambda r, b: plain((r.spec.get("hparams") or {}).get(key))


def _used(r: Run, b: Board) -> str:
    if r.path in b.used:
        return "yes"
    return "superseded" if r.path in dict(b.superseded) else "no"


def _last_error_line(r: Run, b: Board) -> str:
    err = str(r.record.error or "").strip().splitlines()
    return err[-1] if err else ""


_R = [
    Column("record", "the record file, relative to the runs folder", lambda r, b: r.path),
    Column("suite", "", lambda r, b: r.spec["suite"]),
    Column("config", "", lambda r, b: r.spec.get("config") or r.spec["method"]),
    Column("method", "", lambda r, b: r.spec["method"]),
    Column("task", "", lambda r, b: r.spec["task"]),
    Column("group", "", lambda r, b: b.grid.group_of(r.spec["task"]) or ""),
    Column("stage", "", lambda r, b: r.spec["stage"]),
    Column("job", "", lambda r, b: r.spec.get("job", "")),
    Column("protocol", "", lambda r, b: r.spec.get("protocol", "")),
    Column("backbone", "", lambda r, b: r.spec.get("backbone", "")),
    Column("checkpoint_id", "", lambda r, b: r.spec.get("checkpoint_id") or ""),
    Column("seed", "", lambda r, b: fmt(int(r.spec["seed"]))),
    Column("lr", "base learning rate of the spec", _hp("lr")),
    Column("wd", "", _hp("wd")),
    Column("epochs", "", _hp("epochs")),
    Column("batch_size", "", _hp("batch_size")),
    Column("train_split", "", lambda r, b: r.spec.get("train_split", "")),
    Column("eval_split", "", lambda r, b: r.spec.get("eval_split", "")),
    Column("status", "ok | failed | diverged | running", lambda r, b: r.status),
    Column("in_leaderboard", "yes: counted; superseded: a later record of the same seed counts; no", _used),
    Column("top1", "last-epoch top-1 on the eval split", lambda r, b: fmt(finite(r.record.metrics.get("top1")))),
    Column("best_epoch_top1", "flagged extra: the best epoch (selection on the eval split)",
           lambda r, b: fmt(finite(r.record.metrics.get("best_epoch_top1")))),
    Column("best_epoch", "", lambda r, b: plain(r.record.metrics.get("best_epoch"))),
    Column("trainable", "", lambda r, b: plain(r.params.get("trainable"))),
    Column("trainable_without_head", "", lambda r, b: plain(r.params.get("trainable_without_head"))),
    Column("tuned_total_pct", "", lambda r, b: fmt(finite(r.params.get("tuned_total_pct")), 6)),
    Column("train_images_per_s", "", lambda r, b: fmt(finite(r.timing.get("train_images_per_s")), 1)),
    Column("peak_memory_mb", "", lambda r, b: fmt(finite(r.timing.get("peak_memory_mb")), 1)),
    Column("memory_kind", "", lambda r, b: r.timing.get("memory_kind") or ""),
    Column("wall_s", "wall time of the run, every attempt included", lambda r, b: fmt(finite(r.record.wall_s), 1)),
    Column("attempts", "", lambda r, b: plain(r.record.attempts)),
    Column("device", "", lambda r, b: r.device),
    Column("key", "the run key (hash of everything that determines the result)",
           lambda r, b: r.record.key or Path(r.path).stem),
    Column("code", "the code fingerprints of the record: method <fp> engine <fp> (peftbench.fingerprint)",
           lambda r, b: code_text(r.record.code) if r.record.code else ""),
    Column("stale", "yes when the installed code differs: what changed (method, engine)",
           lambda r, b: "yes: " + ", ".join(r.stale_parts) if r.stale else ""),
    Column("error", "the last line of the error", _last_error_line),
]

# ---------------------------------------------------------------------------------------------
# <suite>-vs-reported.csv: rows are (reproduced, reported) pairs
# ---------------------------------------------------------------------------------------------

_V = [
    Column("config", "the reproduced configuration", lambda p, b: p[0].label),
    Column("backbone", "", lambda p, b: p[0].backbone),
    Column("protocol", "", lambda p, b: p[0].protocol),
    Column("reported", "the reported row", lambda p, b: p[1].label),
    Column("reference_source", "", lambda p, b: p[1].reference_source),
    Column("like_for_like", "yes, or no: what differs between the two rows' recipe, data pipeline, backbone and "
           "selection (docs/leaderboard.md)", lambda p, b: p[0].like_for_like),
    Column("recipe", "the reproduced row's recipe, then the reported row's", lambda p, b: f"{p[0].basis.recipe} | "
           f"{p[1].basis.recipe}"),
    Column("delta_{task}", "reproduced − reported top-1 of the task",
           lambda p, b, t: fmt(diff(p[0].mean.get(t), p[1].mean.get(t))), per="task"),
    Column("delta_{group}_mean", "", lambda p, b, g: fmt(p[0].delta_groups.get(g)), per="group"),
    Column("delta_overall_mean_of_groups", "", lambda p, b: fmt(p[0].delta_overall_groups), when=_groups),
    Column("delta_overall_mean_of_tasks", "", lambda p, b: fmt(p[0].delta_overall_tasks)),
]

# ---------------------------------------------------------------------------------------------
# <suite>-compare.csv: rows are (matched configuration, line) of a peftbench.results.compare.Comparison
# ---------------------------------------------------------------------------------------------


def _pfmt(p: float | None) -> str:
    return "" if p is None else f"{p:.4g}"


_C = [
    Column("a", "the configuration on side A (its label)", lambda p, c: p[0].a.label),
    Column("b", "the matching configuration on side B", lambda p, c: p[0].b.label),
    Column("side_a", "what side A is: a run store, or a --tag selection", lambda p, c: c.label_a),
    Column("side_b", "what side B is: a run store, a reference CSV, or a --tag selection", lambda p, c: c.label_b),
    Column("backbone", "side A's backbone", lambda p, c: p[0].a.backbone),
    Column("protocol", "side A's protocol", lambda p, c: p[0].a.protocol),
    Column("precision", "side A's numeric precision", lambda p, c: p[0].a.precision),
    Column("like_for_like", "yes when both sides' recipe, data pipeline, backbone and selection agree, else no: what "
           "differs (docs/leaderboard.md)", lambda p, c: p[0].like_for_like),
    Column("scope", "task, group (a group mean) or overall (mean_of_groups / mean_over_tasks)", lambda p, c: p[1].scope),
    Column("name", "the task, the group, or mean_of_groups / mean_over_tasks", lambda p, c: p[1].name),
    Column("a_mean", "side A's top-1 % (over the seeds both sides have, when paired)", lambda p, c: fmt(p[1].a)),
    Column("b_mean", "side B's top-1 % (same seeds)", lambda p, c: fmt(p[1].b)),
    Column("delta", "b_mean − a_mean, percentage points (a mean's delta is the same weighted mean of the tasks' deltas)",
           lambda p, c: fmt(p[1].delta)),
    Column("delta_std", "sample std over seeds of the paired difference (a mean: of the per-seed weighted difference)",
           lambda p, c: fmt(p[1].delta_std)),
    Column("pairs", "paired observations: seeds of a task, (task, seed) pairs of a mean; 0 = unpaired",
           lambda p, c: fmt(p[1].pairs)),
    Column("p_sign_flip", "two-sided p of the sign-flip permutation test of delta (over seeds for a task, over "
           "(task, seed) pairs for a mean, over tasks when unpaired)", lambda p, c: _pfmt(p[1].p_sign_flip)),
    Column("p_t", "two-sided p of the paired t-test over seeds (tasks only; empty with one seed or a constant "
           "difference)", lambda p, c: _pfmt(p[1].p_t)),
    Column("p_wilcoxon", "two-sided p of the Wilcoxon signed-rank test over the tasks' deltas (means only)",
           lambda p, c: _pfmt(p[1].p_wilcoxon)),
    Column("p_task_flip", "two-sided p of a mean's sign-flip test clustered by task (all seeds of a task flipped "
           "together: the tasks are the units; means only)", lambda p, c: _pfmt(p[1].p_task_flip)),
    Column("delta_se", "standard error of delta: std over seeds / sqrt(seeds) for a task, sqrt(sum over tasks of "
           "(weight x task SE)^2) for a mean", lambda p, c: fmt(p[1].se)),
    Column("significant", "yes when every applicable test is below alpha (0.05 unless --alpha): p_sign_flip and a "
           "task's p_t or a mean's p_task_flip; no otherwise; empty without a test",
           lambda p, c: fmt(p[1].significant(c.alpha))),
    Column("p_holm", "the largest p of the applicable tests (those `significant` reads), adjusted by Holm's step-down "
           "over the matched configurations with this task / group / mean", lambda p, c: _pfmt(p[1].p_holm)),
    Column("significant_holm", "yes when p_holm is below alpha: significant after the correction for the number of "
           "configurations compared; no otherwise; empty without a test",
           lambda p, c: fmt(p[1].significant_holm(c.alpha))),
]

for _table, _cols in (("leaderboard", _L), ("runs", _R), ("vs-reported", _V), ("compare", _C)):
    for _c in _cols:
        register_column(Column(**{**_c.__dict__, "table": _table}), provider="module peftbench.results.columns")

__all__ = ["Column", "COLUMNS", "register_column", "columns", "table", "csv_text", "html_summary", "fmt", "MISSING"]
