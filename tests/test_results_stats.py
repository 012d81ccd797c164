"""Uncertainty in the leaderboard (std over seeds of group and overall means, standard errors from the
pooled seed noise, ties), controls, tuned parameters, and the flags on memory and images/s; the plots
that show them (error bars, padded axes, controls off the frontier, the heatmap)."""
from __future__ import annotations

import json
import math
import statistics

import pytest
from test_leaderboard import VALUES, VTAB, add_record, board_for, make_vtab_store, read_csv, row

from peftbench.results.board import TIE_Z, headline_weights, seed_std
from peftbench.results.columns import html_summary
from peftbench.results.write import write_leaderboard
from peftbench.tasks import get_suite

FGVC = list(get_suite("fgvc").tasks)


@pytest.fixture
def vtab_store(tmp_path):
    return make_vtab_store(tmp_path / "runs")


def test_std_over_seeds_of_group_and_overall_means(vtab_store, tmp_path):
    """vpt-deep has seeds 1, 2, 3 at VALUES - 1, VALUES, VALUES + 1 on every task: each per-seed mean is the
    mean shifted by the same offset, so every group and overall std over seeds is exactly 1."""
    board, _ = board_for(vtab_store)
    r = row(board, "vpt-deep")
    assert r.group_std == pytest.approx({"natural": 1.0, "specialized": 1.0, "structured": 1.0})
    assert r.overall_groups_std == pytest.approx(1.0) and r.overall_tasks_std == pytest.approx(1.0)
    assert row(board, "bitfit").overall_groups_std is None  # one seed: no std
    write_leaderboard(vtab_store, tmp_path / "out", "vtab", reference_dir=False, plots=False, html=False)
    (vd,) = [x for x in read_csv(tmp_path / "out" / "vtab-leaderboard.csv") if x["config"] == "vpt-deep"]
    assert vd["natural_mean_std"] == "1.0000" and vd["overall_mean_of_groups_std"] == "1.0000"
    assert vd["overall_mean_of_tasks_std"] == "1.0000"


def test_seed_std_uses_the_seeds_every_task_has():
    per_seed = {"a": {1: 10.0, 2: 20.0, 3: 30.0}, "b": {1: 0.0, 2: 0.0}}  # seed 3 only on task a
    w = {"a": 0.5, "b": 0.5}
    assert seed_std(per_seed, w) == pytest.approx(statistics.stdev([5.0, 10.0]))
    assert seed_std({"a": {1: 1.0}, "b": {1: 2.0}}, w) is None  # one common seed
    assert seed_std({"a": {1: 1.0, 2: 2.0}}, w) is None  # task b missing


def _fgvc(root, config, offsets, base, seed0=1, **kw):
    for i, t in enumerate(FGVC):
        for k, off in enumerate(offsets):
            add_record(root, config=config, task=t, seed=seed0 + k, top1=base + i + off, suite="fgvc", **kw)


def test_ties_from_pooled_noise(tmp_path):
    """One noisy configuration with 3 seeds (std 1 per task) gives the suite's noise; a 1-seed row 0.1 points
    below it is a tie, one 5 points below is not. The standard errors follow the formula in docs/results.md."""
    root = tmp_path / "runs"
    _fgvc(root, "lora", (-1.0, 0.0, 1.0), 80.0)
    _fgvc(root, "dora", (-0.1,), 80.0)
    _fgvc(root, "bitfit", (-5.0,), 80.0)
    board, _ = board_for(root, "fgvc")
    assert board.noise == pytest.approx({t: 1.0 for t in FGVC})  # only lora has 2+ seeds
    lora, dora, bitfit = row(board, "lora"), row(board, "dora"), row(board, "bitfit")
    n = len(FGVC)
    assert lora.headline_se == pytest.approx(math.sqrt(n * (1 / n) ** 2 * 1.0 / 3))
    assert dora.headline_se == pytest.approx(math.sqrt(n * (1 / n) ** 2 * 1.0 / 1))
    assert (lora.rank, dora.rank, bitfit.rank) == (1, 2, 3)
    assert abs(lora.overall_tasks - dora.overall_tasks) <= TIE_Z * math.hypot(lora.headline_se, dora.headline_se)
    assert dora.tied_with == 1 and lora.tied_with is None
    assert bitfit.tied_with is None  # 5 points: outside the noise of every row above
    head, cells = html_summary(board)
    rank_cells = [c[head.index("rank")] for c in cells]
    assert "≈1" in rank_cells[1] and "≈" not in rank_cells[0] and "≈" not in rank_cells[2]


def test_no_ties_without_a_noise_estimate(tmp_path):
    root = tmp_path / "runs"
    _fgvc(root, "lora", (0.0,), 80.0)
    _fgvc(root, "dora", (-0.1,), 80.0)
    board, _ = board_for(root, "fgvc")
    assert all(v is None for v in board.noise.values())
    assert row(board, "dora").headline_se is None and row(board, "dora").tied_with is None


def test_pooled_noise_weights_by_degrees_of_freedom(tmp_path):
    root = tmp_path / "runs"
    t = FGVC[0]
    for seed, v in ((1, 10.0), (2, 12.0)):  # s^2 = 2, 1 degree of freedom
        add_record(root, config="a", task=t, seed=seed, top1=v, suite="fgvc")
    for seed, v in ((1, 10.0), (2, 13.0), (3, 16.0)):  # s^2 = 9, 2 degrees of freedom
        add_record(root, config="b", task=t, seed=seed, top1=v, suite="fgvc")
    board, _ = board_for(root, "fgvc")
    assert board.noise[t] == pytest.approx(math.sqrt((1 * 2 + 2 * 9) / 3))


def test_headline_weights_are_those_of_the_mean_of_group_means():
    from peftbench.results.board import suite_grid

    grid = suite_grid("vtab")
    w = headline_weights(grid)
    assert sum(w.values()) == pytest.approx(1.0)
    assert w["cifar100"] == pytest.approx(1 / (3 * 7)) and w["eurosat"] == pytest.approx(1 / (3 * 4))
    board_values = sum(w[t] * VALUES[t] for t in VTAB)
    assert board_values == pytest.approx(57.0)  # the vpt-deep headline of test_leaderboard


def test_controls_are_not_ranked_nor_on_the_frontier(tmp_path):
    """A random-weight backbone (its preset's ``control``) is listed apart: even cheaper and better than
    everything, it neither ranks nor takes a place on the Pareto frontier."""
    root = tmp_path / "runs"
    _fgvc(root, "lora", (0.0,), 80.0, tuned_pct=1.0)
    _fgvc(root, "bitfit", (-3.0,), 80.0, tuned_pct=0.1)
    _fgvc(root, "linear@random", (5.0,), 80.0, tuned_pct=0.01, method="linear", backbone="demo-vit-random")
    board, _ = board_for(root, "fgvc")
    ctl = row(board, "linear@random")
    assert ctl.control == "random-weight backbone"
    assert ctl.rank is None and ctl.pareto is None
    assert row(board, "lora").rank == 1 and row(board, "bitfit").pareto is True  # would be dominated otherwise
    assert [r for r in board.reproduced if r.table == ctl.table][-1] is ctl  # after the ranked rows of its table
    assert ctl.table == "demo ViT (tiny)" and row(board, "lora").table == "vit-test"  # two backbones: two tables
    write_leaderboard(root, tmp_path / "out", "fgvc", reference_dir=False)
    (c,) = [x for x in read_csv(tmp_path / "out" / "fgvc-leaderboard.csv") if x["config"] == "linear@random"]
    assert c["control"] == "random-weight backbone" and c["rank"] == "" and c["pareto"] == ""
    html = (tmp_path / "out" / "fgvc-report.html").read_text()
    assert 'class="badge">control</span>' in html
    md = (tmp_path / "out" / "fgvc-table.md").read_text()
    assert "*Controls, demo ViT (tiny)*" in md


def test_tuned_params_beside_trainable_and_the_flags(tmp_path):
    """e2vpt-prune trains more than it keeps: tuned < trainable. CPU runs measure the process RSS: the report
    hides that memory; a head on cached features has its images/s marked."""
    root = tmp_path / "runs"
    for t in FGVC:
        p = add_record(root, config="e2vpt-prune", task=t, seed=1, top1=80.0, suite="fgvc", trainable=9000)
        rec = json.loads(p.read_text())
        rec["params"]["tuned"] = 5000
        rec["timing"]["memory_kind"] = "process_peak_rss"
        p.write_text(json.dumps(rec))
        p = add_record(root, config="linear", task=t, seed=1, top1=70.0, suite="fgvc", ips=90000.0)
        rec = json.loads(p.read_text())
        rec["timing"].update(cached_features=True, memory_kind="process_peak_rss")
        p.write_text(json.dumps(rec))
    board, _ = board_for(root, "fgvc")
    e2 = row(board, "e2vpt-prune")
    assert (e2.trainable, e2.tuned_params) == (9000, 5000)
    assert row(board, "linear").cached_features == "yes" and e2.cached_features == "no"
    head, cells = html_summary(board)
    assert head[:6] == ["rank", "config", "Tuned/Total %", "trainable params", "tuned params", "seeds"]
    assert "peak memory (MB)" not in head  # every row is a process-wide RSS
    lin = cells[[r.label for r in board.rows].index("linear")]
    assert "90000.0*" in lin[head.index("train images/s")]
    write_leaderboard(root, tmp_path / "out", "fgvc", reference_dir=False, plots=False, html=False)
    rows = {x["config"]: x for x in read_csv(tmp_path / "out" / "fgvc-leaderboard.csv")}
    assert rows["e2vpt-prune"]["tuned_params"] == "5000" and rows["e2vpt-prune"]["trainable_params"] == "9000"
    assert rows["linear"]["train_images_kind"] == "cached_features_head"
    assert rows["e2vpt-prune"]["train_images_kind"] == "backbone_training"
    # one CUDA row: the column is back, the RSS rows flagged
    for t in FGVC:
        add_record(root, config="lora", task=t, seed=1, top1=75.0, suite="fgvc")  # cuda_max_allocated
    board, _ = board_for(root, "fgvc")
    head, cells = html_summary(board)
    col = head.index("peak memory (MB)")
    by = dict(zip([r.label for r in board.rows], cells))
    assert by["lora"][col] == "<td>100</td>" and ">RSS<" in by["linear"][col]


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------


def test_pareto_axis_is_padded_and_controls_stay_off_the_frontier(tmp_path):
    from peftbench.results.plots import MIN_Y_SPAN, pareto_figure

    root = tmp_path / "runs"
    _fgvc(root, "lora", (0.0,), 80.0, tuned_pct=1.0)
    _fgvc(root, "dora", (-0.7,), 80.0, tuned_pct=2.0)  # 0.7 points apart
    _fgvc(root, "linear@random", (-40.0,), 80.0, tuned_pct=0.01, method="linear", backbone="demo-vit-random")
    board, _ = board_for(root, "fgvc")
    fig = pareto_figure(board)
    (ax,) = [a for a in fig.axes if a.get_visible()]
    lo, hi = ax.get_ylim()
    assert hi - lo >= MIN_Y_SPAN  # the 0.7-point gap fills at most a ninth of the panel
    assert lo > 42.0  # the control (at ~42) does not stretch the axis
    assert any("control linear@random" in t.get_text() for t in ax.texts)
    frontier = [ln for ln in ax.lines if ln.get_drawstyle() == "steps-post"]
    assert len(frontier) == 1
    assert min(frontier[0].get_xdata()) == pytest.approx(1.0)  # the control's x = 0.01 is not on it


def test_pareto_points_have_error_bars(vtab_store):
    from matplotlib.collections import LineCollection

    from peftbench.results.plots import pareto_figure

    board, _ = board_for(vtab_store)
    fig = pareto_figure(board)
    bars = [c for ax in fig.axes for c in ax.collections if isinstance(c, LineCollection)]
    assert len(bars) == 4  # vpt-deep (3 seeds) in each of the 3 group panels and overall; 1-seed rows have none
    seg = bars[-1].get_segments()[0]
    assert seg[1][1] - seg[0][1] == pytest.approx(2.0)  # ± 1 std over seeds


def test_heatmap_has_one_row_per_configuration(tmp_path):
    from matplotlib.image import AxesImage

    from peftbench.results.plots import task_heatmap_figure

    root = tmp_path / "runs"
    for k in range(24):  # beyond any palette: one heatmap row each
        _fgvc(root, f"cfg{k:02d}", (0.0,), 60.0 + k)
    board, _ = board_for(root, "fgvc")
    fig = task_heatmap_figure(board)
    (img,) = [c for c in fig.axes[0].get_children() if isinstance(c, AxesImage)]
    assert img.get_array().shape == (24, len(FGVC) + 1)  # tasks + the mean over tasks
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == "cfg23" and labels[-1] == "cfg00"  # in rank order


def test_plots_of_a_board_of_controls_only(tmp_path):
    from peftbench.results.plots import render_all

    root = tmp_path / "runs"
    _fgvc(root, "linear", (0.0,), 50.0, backbone="demo-vit-random")
    board, _ = board_for(root, "fgvc")
    out = render_all(board)
    assert out["tasks"]["png"][:8] == b"\x89PNG\r\n\x1a\n" and out["pareto"]["svg"]


def test_heatmap_colours_a_tiny_gap_alike_and_ties_at_printed_precision_the_same(tmp_path):
    """A column whose values differ by 0.07 points is not drawn lightest against darkest (a minimum span), and values
    that print the same (60.01, 60.04) share one colour."""
    from matplotlib.image import AxesImage

    from peftbench.results.plots import HEAT_MIN_SPAN, task_heatmap_figure

    root = tmp_path / "runs"
    for name, top1 in (("a", 60.00), ("b", 60.07), ("c", 60.01), ("d", 60.04)):
        _fgvc(root, name, (0.0,), top1)
    board, _ = board_for(root, "fgvc")
    fig = task_heatmap_figure(board)
    (img,) = [c for c in fig.axes[0].get_children() if isinstance(c, AxesImage)]
    colours = img.get_array()[:, 0]  # the first task's column, rows in rank order b, d, c, a
    assert float(colours.max() - colours.min()) < 0.8 * 0.1 / HEAT_MIN_SPAN + 1e-9  # 0.1 printed points of 2
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    same = [colours[labels.index(x)] for x in ("a", "c")]  # 60.0 and 60.0 as printed
    assert same[0] == same[1]
