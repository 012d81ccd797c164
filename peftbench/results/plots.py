"""Leaderboard plots (PNG + SVG), deterministic: fixed SVG hash salt, no dates or software
versions in the metadata, figures built without pyplot (no global state).

* ``pareto``: top-1 accuracy against Tuned/Total % (log x), one panel per VTAB group and one
  overall; reproduced rows are filled markers, reported rows hollow markers in the colour of the
  reproduced row they pair with; the Pareto frontier (lower Tuned/Total and higher accuracy is
  better) is a solid staircase for reproduced rows and a dashed one for reported rows.
* ``tasks``: per-task bars of the reproduced rows (mean ± sample std over the final seeds); the
  paired reported value is a hollow diamond on the bar; a task that has not run is marked "n/a".
"""
from __future__ import annotations

import io

from .board import Board, pareto_front

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


def pareto_figure(board: Board):
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    lay = board.grid
    style = _styles(board)
    panels = []
    for g in lay.groups:
        panels.append((f"{g.capitalize()} ({len(lay.groups[g])} tasks): group mean",
                       lambda r, g=g: (r.group_tuned.get(g), r.group_mean.get(g)), g))
    overall = ("Overall: mean of the group means" if lay.groups else f"Overall: mean over the {len(lay.tasks)} tasks")
    panels.append((overall, lambda r: (r.tuned_total_pct, r.headline(lay)), None))
    note = ""
    if not any(get(r)[0] is not None and get(r)[1] is not None for r in board.reproduced for _, get, _ in panels):
        # Incomplete sweep: no group is complete for any configuration. Show the tasks that ran, one
        # panel each (nothing averaged), instead of empty mean panels.
        done = [t for t in lay.tasks if any(r.mean.get(t) is not None for r in board.reproduced)]
        if done:
            panels = [(f"{t} (task)", lambda r, t=t: (r.tuned.get(t) if r.tuned.get(t) is not None or
                                                      r.source == "reproduced" else r.tuned_total_pct,
                                                      r.mean.get(t)), t)
                      for t in done[:PER_TASK_PANELS_MAX]]
            note = (f"\nincomplete sweep ({len(done)} of {len(lay.tasks)} tasks ran): per-task panels; "
                    f"group and overall means need every task")
    n = len(panels)
    ncols = 2 if n == 4 else min(n, 3)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(4.6 * ncols + 3.2, 3.9 * nrows + 0.5), layout="constrained")
    legend_note = "filled = reproduced, hollow = reported" if board.reported else "reproduced"
    fig.suptitle(f"{lay.suite}: top-1 accuracy vs. tuned parameters (final runs; {legend_note}){note}", fontsize=11)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    used_labels: list[str] = []
    notes: list[list] = []  # per panel: the point labels, placed without overlap at the end
    for ax, (title, get, group) in zip(axes, panels):
        notes.append([])
        ax.set_title(title)
        _log_axis(ax)
        ax.set_xlabel("Tuned / Total parameters (%, log scale)")
        ax.set_ylabel("Top-1 accuracy (%)")
        pts = {"reproduced": [], "reported": []}
        for r in board.rows:
            x, y = get(r)
            if x is None or y is None or x <= 0:
                continue
            colour, marker = style[r.label]
            filled = r.source == "reproduced"
            ax.scatter([x], [y], marker=marker, s=46 if filled else 40, zorder=3,
                       facecolors=colour if filled else "none", edgecolors=colour,
                       linewidths=1.0 if filled else 1.4)
            if filled:
                notes[-1].append(ax.annotate(r.label, (x, y), xytext=(4, 4), textcoords="offset points",
                                             fontsize=7, color=colour, zorder=4))

            pts[r.source].append((x, y))
            if r.label not in used_labels:
                used_labels.append(r.label)
        ax.margins(x=0.12, y=0.1)
        _frontier(ax, pts["reproduced"], "0.15", "-", None)
        _frontier(ax, pts["reported"], "0.55", "--", None)
        if not pts["reproduced"] and not pts["reported"]:
            what = f"every task of the {group} group" if group else "every task"
            ax.text(0.5, 0.5, f"no complete results yet\n(needs final runs on {what})", ha="center",
                    va="center", transform=ax.transAxes, color="0.4")
            ax.set_xlim(0.01, 100)
            ax.set_ylim(0, 100)
        missing = [r.label for r in board.reproduced if r.tasks_done and (get(r)[0] is None or get(r)[1] is None)]
        if missing and (pts["reproduced"] or pts["reported"]):
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
    for r in order:
        if r.label not in used_labels:
            continue
        colour, marker = style[r.label]
        filled = r.source == "reproduced"
        handles.append(Line2D([], [], linestyle="", marker=marker, markersize=6, color=colour,
                              markerfacecolor=colour if filled else "none", markeredgewidth=1.0 if filled else 1.4,
                              label=r.label if filled else f"{r.label} (reported)"))
    handles.append(Line2D([], [], color="0.15", linestyle="-", label="Pareto frontier, reproduced"))
    if board.reported:
        handles.append(Line2D([], [], color="0.55", linestyle="--", label="Pareto frontier, reported"))
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


def task_bars_figure(board: Board):
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.transforms import blended_transform_factory

    lay = board.grid
    style = _styles(board)
    rows = [r for r in board.reproduced if r.tasks_done]
    pairs = {mine.label: rep for mine, rep in board.pairs()}
    k = max(len(rows), 1)
    n = len(lay.tasks)
    width_in = min(30.0, max(7.0, 1.2 + n * max(0.55, 0.16 * (k + 1))))
    fig = Figure(figsize=(width_in + 2.6, 4.8), layout="constrained")
    ax = fig.subplots()
    ax.set_title(f"{lay.suite}: per-task top-1 accuracy (final runs, mean ± sample std over seeds"
                 + ("; hollow diamond = reported)" if pairs else ")"))
    ax.set_ylabel("Top-1 accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_xlim(-0.6, n - 0.4)
    ax.grid(axis="x", visible=False)
    bw = 0.8 / k
    label_values = n * k <= 48  # value labels while they fit
    handles = []
    for i, r in enumerate(rows):
        colour, marker = style[r.label]
        xs = [j - 0.4 + bw * (i + 0.5) for j in range(n)]
        for j, t in enumerate(lay.tasks):
            m = r.mean.get(t)
            if m is None:
                ax.text(xs[j], 1.0, "n/a", rotation=90, ha="center", va="bottom", fontsize=6, color="0.45")
                continue
            sd = r.std.get(t)
            ax.bar(xs[j], m, width=bw * 0.92, color=colour, alpha=0.85, zorder=2,
                   yerr=sd if sd is not None else None, capsize=1.5 if sd is not None else 0,
                   error_kw={"elinewidth": 0.8, "ecolor": "0.2"})
            if label_values:
                ax.text(xs[j], m + (sd or 0.0) + 0.8, f"{m:.1f}", ha="center", va="bottom", fontsize=6,
                        color="0.25", rotation=90 if bw < 0.3 else 0)
            rep = pairs.get(r.label)
            if rep is not None and rep.mean.get(t) is not None:
                ax.scatter([xs[j]], [rep.mean[t]], marker="D", s=20, facecolors="white", edgecolors="0.05",
                           linewidths=1.0, zorder=4)
        handles.append(Patch(facecolor=colour, alpha=0.85,
                             label=r.label + (f"  (◇ {pairs[r.label].label})" if r.label in pairs else "")))
    if any(r.label in pairs for r in rows):
        handles.append(Line2D([], [], linestyle="", marker="D", markersize=5, markerfacecolor="white",
                              markeredgecolor="0.05", label="reported value of the paired\npaper row, on its bar"))
    if not rows:
        ax.text(0.5, 0.5, "no finished final runs yet", ha="center", va="center", transform=ax.transAxes,
                color="0.4")
    ax.set_xticks(range(n))
    ax.set_xticklabels(lay.tasks, rotation=40, ha="right")
    if lay.groups:
        trans = blended_transform_factory(ax.transData, ax.transAxes)
        start = 0
        for g, ts in lay.groups.items():
            end = start + len(ts)
            if end < n:
                ax.axvline(end - 0.5, color="0.5", linestyle=":", linewidth=1.0, zorder=1)
            ax.text((start + end - 1) / 2, 0.985, g.capitalize(), transform=trans, ha="center", va="top",
                    fontsize=8, color="0.3", fontweight="bold")
            start = end
    if handles:
        fig.legend(handles=handles, loc="outside right upper", frameon=False, title="configuration",
                   title_fontsize=8)
    return fig


def render_all(board: Board) -> dict[str, dict[str, bytes]]:
    """{"pareto": {"png": ..., "svg": ...}, "tasks": {...}} for the board."""
    import matplotlib

    with matplotlib.rc_context(RC):
        out = {}
        for name, make in (("pareto", pareto_figure), ("tasks", task_bars_figure)):
            fig = make(board)
            out[name] = _save(fig)
    return out
