"""Leaderboard plots (PNG + SVG), deterministic: fixed SVG hash salt, no dates or software
versions in the metadata, figures built without pyplot (no global state).

* ``pareto``: top-1 accuracy against Tuned/Total % (log x), one panel per VTAB group and one
  overall; reproduced rows are filled markers with ± std-over-seeds error bars, reported rows hollow
  markers in the colour of the reproduced row they pair with; the Pareto frontier (lower Tuned/Total
  and higher accuracy is better) is a solid staircase for reproduced rows and a dashed one for
  reported rows, one per backbone table (rows of several backbones: the legend names each row's table).
  Controls (random-weight backbones) are dotted horizontal lines, off the frontier;
  the y axis spans the methods' points (padded, at least ``MIN_Y_SPAN`` points).
* ``tasks``: a configurations x tasks heatmap (mean ± sample std over the final seeds in each cell,
  coloured by the cell's place within its column), group and overall means after the tasks,
  reported rows last; a task that has not run is "n/a".

Every text from the records (labels, task, group and suite names) goes through
:func:`peftbench._text.plot_text`: no control character reaches the SVG (whose text matplotlib also
keeps in XML comments) and no ``$`` starts mathtext.
"""
from __future__ import annotations

import io
import warnings

from .._text import plot_text as _t
from .board import Board, Row, pareto_front

RC = {
    "svg.hashsalt": "peftbench-leaderboard",
    "svg.fonttype": "path",
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
}
PNG_DPI = 150
MARKERS = ["o", "s", "D", "^", "v", "P", "X", "<", ">", "h", "p", "*", "d", "H", "8"]
PER_TASK_PANELS_MAX = 6
MIN_Y_SPAN = 6.0  # percentage points: the least a Pareto panel's y axis shows


LEGEND_ROWS_MAX = 18  # legend entries in one column of the Pareto figure


def _palette(n: int) -> list:
    from matplotlib import colormaps

    base = list(colormaps["tab10"].colors)
    if n > len(base):
        base += list(colormaps["tab20b"].colors) + list(colormaps["tab20c"].colors)
    return [base[i % len(base)] for i in range(max(n, 1))]


def _styles(board: Board) -> dict[str, tuple]:
    """label -> (colour, marker): a reproduced row and its paired reported row share both."""
    order: list[str] = []
    for r in board.reproduced:
        order.append(r.label)
    pair = {rep.label: mine.label for mine, rep in board.pairs()}
    for r in board.reported:
        if r.label not in pair:
            order.append(r.label)
    colours = _palette(len(order))
    style = {lab: (colours[i], MARKERS[i % len(MARKERS)]) for i, lab in enumerate(order)}
    for rep, mine in pair.items():
        style[rep] = style[mine]
    return style


def _save(fig) -> dict[str, bytes]:
    out = {}
    for ext, kw in (("png", {"dpi": PNG_DPI, "metadata": {"Software": None}}),
                    ("svg", {"metadata": {"Date": None, "Creator": None}})):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, **kw)
        out[ext] = buf.getvalue()
    return out


def _log_axis(ax) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _frontier(ax, pts: list[tuple[float, float]], colour, style: str, label: str | None):
    flags = pareto_front(pts)
    front = sorted({p for p, f in zip(pts, flags) if f})
    if not front:
        return None
    xs, ys = zip(*front)
    (line,) = ax.plot(xs, ys, linestyle=style, color=colour, linewidth=1.2, drawstyle="steps-post",
                      zorder=1, label=label)
    return line


def _y_limits(values: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(low, high) of the y axis around (value, error) points: 12 % padding, at least MIN_Y_SPAN points tall
    (a 0.7-point gap must not fill a panel), clipped to [0, 100] where that keeps the span."""
    if not values:
        return None
    lo = min(v - e for v, e in values)
    hi = max(v + e for v, e in values)
    span = hi - lo
    pad = max(0.12 * span, (MIN_Y_SPAN - span) / 2, 0.5)
    lo, hi = lo - pad, hi + pad
    if lo < 0:
        lo, hi = 0.0, hi - lo
    if hi > 100:
        lo, hi = max(0.0, lo - (hi - 100)), 100.0
    return lo, hi


def pareto_figure(board: Board):
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory

    lay = board.grid
    style = _styles(board)
    panels = []  # (title, (x, y) of a row, the y error bar of a row, group)
    for g in lay.groups:
        panels.append((f"{_t(g.capitalize())} ({len(lay.groups[g])} tasks): group mean",
                       lambda r, g=g: (r.group_tuned.get(g), r.group_mean.get(g)), lambda r, g=g: r.group_std.get(g), g))
    overall = ("Overall: mean of the group means" if lay.groups else f"Overall: mean over the {len(lay.tasks)} tasks")
    panels.append((overall, lambda r: (r.tuned_total_pct, r.headline(lay)), lambda r: r.headline_std(lay), None))
    note = ""
    if not any(get(r)[0] is not None and get(r)[1] is not None for r in board.reproduced for _, get, _, _ in panels):
        # Incomplete sweep: no group is complete for any configuration. Show the tasks that ran, one
        # panel each (nothing averaged), instead of empty mean panels.
        done = [t for t in lay.tasks if any(r.mean.get(t) is not None for r in board.reproduced)]
        if done:
            panels = [(f"{_t(t)} (task)", lambda r, t=t: (r.tuned.get(t) if r.tuned.get(t) is not None or
                                                      r.source == "reproduced" else r.tuned_total_pct,
                                                      r.mean.get(t)), lambda r, t=t: r.std.get(t), t)
                      for t in done[:PER_TASK_PANELS_MAX]]
            note = (f"\nincomplete sweep ({len(done)} of {len(lay.tasks)} tasks ran): per-task panels; "
                    f"group and overall means need every task")
    n = len(panels)
    ncols = 2 if n == 4 else min(n, 3)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(4.6 * ncols + 3.2, 3.9 * nrows + 0.5), layout="constrained")
    legend_note = "filled = reproduced, hollow = reported" if board.reported else "reproduced"
    fig.suptitle(f"{_t(lay.suite)}: top-1 accuracy vs. tuned parameters (final runs, ± std over seeds; {legend_note})"
                 f"{note}", fontsize=11)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    used_labels: list[str] = []
    controls_drawn: list[Row] = []
    notes: list[list] = []  # per panel: the point labels, placed without overlap at the end
    for ax, (title, get, err, group) in zip(axes, panels):
        notes.append([])
        ax.set_title(title)
        _log_axis(ax)
        ax.set_xlabel("Tuned / Total parameters (%, log scale)")
        ax.set_ylabel("Top-1 accuracy (%)")
        pts: dict[tuple[str, str], list] = {}  # (source, backbone table) -> points: one frontier each
        ys: list[tuple[float, float]] = []
        controls: list[tuple[Row, float]] = []
        for r in board.rows:
            x, y = get(r)
            if x is None or y is None or x <= 0:
                continue
            if r.control:  # drawn apart below, never on the frontier, never stretching the axis
                controls.append((r, y))
                continue
            colour, marker = style[r.label]
            filled = r.source == "reproduced"
            e = err(r) if filled else None
            ax.scatter([x], [y], marker=marker, s=46 if filled else 40, zorder=3,
                       facecolors=colour if filled else "none", edgecolors=colour,
                       linewidths=1.0 if filled else 1.4)
            if e:
                ax.errorbar([x], [y], yerr=[e], fmt="none", ecolor=colour, elinewidth=0.9, capsize=2.5, zorder=2)
            ys.append((y, e or 0.0))
            if filled:
                notes[-1].append(ax.annotate(_t(r.label), (x, y), xytext=(4, 4), textcoords="offset points",
                                             fontsize=7, color=colour, zorder=4))

            pts.setdefault((r.source, r.table), []).append((x, y))
            if r.label not in used_labels:
                used_labels.append(r.label)
        ax.margins(x=0.12)
        limits = _y_limits(ys)
        if limits:
            ax.set_ylim(*limits)
        for (source, _), points in pts.items():
            _frontier(ax, points, "0.15" if source == "reproduced" else "0.55",
                      "-" if source == "reproduced" else "--", None)
        if controls:
            lo, hi = ax.get_ylim() if limits else (min(y for _, y in controls) - 5, max(y for _, y in controls) + 5)
            if not limits:
                ax.set_ylim(lo, hi)
            trans = blended_transform_factory(ax.transAxes, ax.transData)
            below = []
            for r, y in controls:
                if r not in controls_drawn:
                    controls_drawn.append(r)
                if lo <= y <= hi:
                    ax.axhline(y, color="0.45", linestyle=":", linewidth=1.1, zorder=1)
                    ax.text(0.99, y, f"control: {_t(r.label)} {y:.1f}", transform=trans, ha="right", va="bottom",
                            fontsize=6.5, color="0.35")
                else:
                    below.append(f"{'▼' if y < lo else '▲'} control {_t(r.label)}: {y:.1f}")
            if below:
                ax.text(0.99, 0.02, "\n".join(below), transform=ax.transAxes, ha="right", va="bottom", fontsize=6.5,
                        color="0.35")
        if not pts and not controls:
            what = f"every task of the {_t(group)} group" if group else "every task"
            ax.text(0.5, 0.5, f"no complete results yet\n(needs final runs on {what})", ha="center",
                    va="center", transform=ax.transAxes, color="0.4")
            ax.set_xlim(0.01, 100)
            ax.set_ylim(0, 100)
        missing = [_t(r.label) for r in board.reproduced if r.tasks_done and (get(r)[0] is None or get(r)[1] is None)]
        if missing and pts:
            shown = ", ".join(missing[:4]) + (f" (+{len(missing) - 4})" if len(missing) > 4 else "")
            ax.set_title(f"{title}\n(incomplete, not shown: {shown})")
    for ax in axes[n:]:
        ax.set_visible(False)
    handles = []
    pair = {mine.label: rep for mine, rep in board.pairs()}
    order = []  # each reproduced row followed by its paired reported row, then the other reported rows
    for r in board.reproduced:
        order.append(r)
        if r.label in pair:
            order.append(pair[r.label])
    order += [r for r in board.reported if r not in order]
    several = len(board.tables) > 1
    for r in order:
        if r.label not in used_labels:
            continue
        colour, marker = style[r.label]
        filled = r.source == "reproduced"
        where = f" [{_t(r.table)}]" if several else ""  # each backbone's table has its own frontier
        handles.append(Line2D([], [], linestyle="", marker=marker, markersize=6, color=colour,
                              markerfacecolor=colour if filled else "none", markeredgewidth=1.0 if filled else 1.4,
                              label=(_t(r.label) if filled else f"{_t(r.label)} (reported)") + where))
    handles.append(Line2D([], [], color="0.15", linestyle="-", label="Pareto frontier, reproduced"))
    if board.reported:
        handles.append(Line2D([], [], color="0.55", linestyle="--", label="Pareto frontier, reported"))
    for r in controls_drawn:
        handles.append(Line2D([], [], color="0.45", linestyle=":", label=f"{_t(r.label)}: control\n({_t(r.control)})"))
    fig.legend(handles=handles, loc="outside right upper", frameon=False, title="configuration", title_fontsize=8,
               ncols=1 if len(handles) <= LEGEND_ROWS_MAX else 2)  # a long list would run off the figure
    _declutter(fig, notes)
    return fig


# Where a point's label may go, in points from the point: the first that overlaps no label placed
# before it wins (else the one that overlaps least).
_LABEL_SPOTS = ((4, 4, "left"), (4, -10, "left"), (-4, 4, "right"), (-4, -10, "right"),
                (4, 12, "left"), (-4, 12, "right"), (4, -18, "left"), (-4, -18, "right"))


def _declutter(fig, notes: list[list]) -> None:
    """Move point labels that would overwrite each other to free spots around their points."""
    if not any(notes):
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw_without_rendering()  # settles the constrained layout, so extents are final
    for panel in notes:
        placed = []
        for ann in panel:
            best = None
            for dx, dy, ha in _LABEL_SPOTS:
                ann.set_position((dx, dy))
                ann.set_horizontalalignment(ha)
                box = ann.get_window_extent(renderer).padded(1)
                overlap = sum(c.width * c.height for c in (Bbox.intersection(box, b) for b in placed) if c)
                if best is None or overlap < best[0]:
                    best = (overlap, dx, dy, ha, box)
                if overlap == 0:
                    break
            _, dx, dy, ha, box = best
            ann.set_position((dx, dy))
            ann.set_horizontalalignment(ha)
            placed.append(box)


HEAT_MIN_SPAN = 2.0  # points of top-1: the least spread a heatmap column's colours stand for


def task_heatmap_figure(board: Board):
    """Configurations x tasks: each cell the mean top-1 over seeds (± sample std below it), coloured by its
    place within its column (the column's lowest value lightest, its highest darkest), so the best
    configuration of every task stands out however many rows there are. Group means and the overall
    means follow the tasks; reported rows come last, below a line."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    lay = board.grid
    rows = [r for r in board.reproduced if r.tasks_done] + list(board.reported)
    cols: list[tuple[str, object]] = [(t, lambda r, t=t: (r.mean.get(t), r.std.get(t))) for t in lay.tasks]
    cols += [(f"{g} mean", lambda r, g=g: (r.group_mean.get(g), r.group_std.get(g))) for g in lay.groups]
    if lay.groups:
        cols.append(("mean of groups", lambda r: (r.overall_groups, r.overall_groups_std)))
    cols.append(("mean over tasks", lambda r: (r.overall_tasks, r.overall_tasks_std)))
    nr, nc = max(len(rows), 1), len(cols)
    vals = np.full((nr, nc), np.nan)
    sds = np.full((nr, nc), np.nan)
    for i, r in enumerate(rows):
        for j, (_, get) in enumerate(cols):
            m, sd = get(r)
            if m is not None:
                vals[i, j] = m
                if sd is not None:
                    sds[i, j] = sd
    ranked = np.array([not r.control for r in rows] or [True])  # controls take no part in the colour scale
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-empty column
        printed = np.round(vals, 1)  # compared as printed: values that print the same are a tie (the same colour)
        if ranked.any():
            lo, hi = np.nanmin(printed[ranked], axis=0), np.nanmax(printed[ranked], axis=0)
        else:  # only controls
            lo = hi = np.full(nc, np.nan)
        # a column's colours span at least HEAT_MIN_SPAN points around its middle: a 0.1-point gap is not drawn as
        # lightest against darkest
        span = np.maximum(hi - lo, HEAT_MIN_SPAN)
        rel = np.where(np.isnan(vals), np.nan, np.clip(0.5 + (printed - (lo + hi) / 2) / span, 0, 1))
    rel[~ranked] = np.nan  # drawn neutral
    labels = [_t(r.label) + (" (reported)" if r.source == "reported" else "") + (" (control)" if r.control else "")
              for r in rows]
    label_w = 0.065 * max([len(x) for x in labels] + [10])
    fig = Figure(figsize=(label_w + 0.62 * nc + 1.4, 1.9 + 0.3 * nr), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["YlGnBu"].with_extremes(bad="0.93")
    ax.imshow(np.ma.masked_invalid(0.08 + 0.8 * rel), cmap=cmap, vmin=0, vmax=1, aspect="auto",
              interpolation="nearest")
    for i in range(nr if rows else 0):
        for j in range(nc):
            v = vals[i, j]
            if np.isnan(v):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=6, color="0.5")
                continue
            colour = "white" if ranked[i] and rel[i, j] > 0.6 else "0.1"
            text = f"{v:.1f}" + (f"\n±{sds[i, j]:.1f}" if not np.isnan(sds[i, j]) else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=6 if "\n" in text else 6.5, color=colour,
                    linespacing=0.95)
    ax.set_xticks(range(nc))
    ax.set_xticklabels([_t(c) for c, _ in cols], rotation=40, ha="right", fontsize=7)
    ax.set_yticks(range(nr))
    ax.set_yticklabels(labels if rows else [""], fontsize=7)
    for k, r in enumerate(rows):
        if r.source == "reported" or r.control:
            ax.get_yticklabels()[k].set_fontstyle("italic")
    ax.grid(False)
    ax.tick_params(length=0)
    start = 0
    for g, ts in lay.groups.items():
        end = start + len(ts)
        ax.axvline(end - 0.5, color="white", linewidth=2.5)
        ax.text((start + end - 1) / 2, -0.7, _t(g.capitalize()), ha="center", va="bottom", fontsize=8, color="0.3",
                fontweight="bold")
        start = end
    if not lay.groups:
        ax.axvline(len(lay.tasks) - 0.5, color="white", linewidth=2.5)
    n_rep = sum(r.source == "reproduced" for r in rows)
    if 0 < n_rep < len(rows):
        ax.axhline(n_rep - 0.5, color="0.2", linewidth=1.2)
    ax.set_title(f"{_t(lay.suite)}: per-task top-1 % (final runs: mean over seeds, ± sample std)", fontsize=9,
                 pad=16 if lay.groups else 6)  # (one line: the group labels sit between it and the cells)
    ax.set_xlabel(f"colour: the cell's place within its column, darker = higher; a column spans at least "
                  f"{HEAT_MIN_SPAN:g} points, values that print the same share a colour (controls grey, outside the "
                  "scale)", fontsize=7, color="0.3")
    if not rows:
        ax.text(0.5, 0.5, "no finished final runs yet", ha="center", va="center", transform=ax.transAxes,
                color="0.4")
    return fig


def render_all(board: Board) -> dict[str, dict[str, bytes]]:
    """{"pareto": {"png": ..., "svg": ...}, "tasks": {...}} for the board."""
    import matplotlib

    with matplotlib.rc_context(RC):
        out = {}
        for name, make in (("pareto", pareto_figure), ("tasks", task_heatmap_figure)):
            fig = make(board)
            out[name] = _save(fig)
    return out
