"""The board on screen: `peftbench leaderboard` and `peftbench run` print it, and so does the Python leaderboard."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import TINY_BACKBONE, make_data_root
from test_leaderboard import REFERENCE, board_for, make_vtab_store

import peftbench as pb
from peftbench.api.sweep import SweepResult
from peftbench.cli import main
from peftbench.results.tables import TERMINAL_REPORTED_MAX, terminal_table


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_vtab_store(tmp_path_factory.mktemp("board") / "runs")


def _block(text: str, table: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"[{table}]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    return [line for line in lines[start + 3:end] if line and not line.startswith("(+")]


def test_the_board_prints_each_backbone_table_ranked(store):
    board, _ = board_for(store, reference=REFERENCE)
    text = terminal_table(board)
    assert text.splitlines()[0] == "vtab: mean of the group means (top-1 %, final runs)"
    mine = _block(text, "vit-test")
    ranked = sorted((r for r in board.reproduced if r.rank), key=lambda r: r.rank)
    assert [line.split()[1] for line in mine[:len(ranked)]] == [r.label for r in ranked]
    assert mine[0].split()[0] == "1" and "19/19" in mine[0]
    vpt = next(r for r in board.reproduced if r.label == "vpt-deep")
    assert f"{vpt.headline(board.grid):.2f}" in mine[0] and f"{vpt.headline_std(board.grid):.2f}" in mine[0]
    assert mine[-1].split()[:2] == ["-", "linear"]  # incomplete: no rank, no mean, 18 of 19 tasks
    # the papers' ViT-B/16 table: its best rows and those paired with a reproduced one, by rank; the rest counted
    vit = _block(text, "ViT-B/16 ImageNet-21k")
    reported = [r for r in board.reported if r.table == "ViT-B/16 ImageNet-21k"]
    paired = [r for r in reported if r.paired_with]
    assert len(vit) == max(TERMINAL_REPORTED_MAX, len(paired))
    assert all(f"{r.label} (paper)" in text for r in paired)
    ranks = [int(line.split()[0]) for line in vit]
    assert ranks == sorted(ranks) and ranks[0] == 1
    assert f"(+ {len(reported) - len(vit)} more reported rows" in text
    assert "[Swin-B ImageNet-21k]" in text and "E^2VPT (Swin-B) (paper)" in text


def test_leaderboard_prints_the_board_then_the_files(store, tmp_path, capsys):
    assert main(["leaderboard", "--runs-dir", str(store), "--out", str(tmp_path / "a"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert out.index("[vit-test]") < out.index("files (") and "vtab-leaderboard.csv" in out
    assert main(["leaderboard", "--runs-dir", str(store), "--out", str(tmp_path / "b"), "--no-plots", "--quiet"]) == 0
    assert "[vit-test]" not in capsys.readouterr().out
    assert main(["leaderboard", "--runs-dir", str(store), "--format", "terminal"]) == 0
    out = capsys.readouterr().out
    assert "[vit-test]" in out and "files (" not in out


def test_the_python_leaderboard_prints_as_the_board(store):
    lb = pb.leaderboard(store, "vtab")
    text = repr(lb)
    assert text.startswith("vtab: mean of the group means") and "[vit-test]" in text
    assert text.rstrip().endswith(f"[{len(lb)} rows x {len(lb.columns)} columns: lb.columns lists them]")
    assert "rank" in lb.columns and len(lb.columns) > 40  # still the whole frame
    assert type(lb[["rank", "config"]]).__name__ == "DataFrame"  # a slice prints as a frame


def test_a_sweep_result_is_one_line():
    plan = SimpleNamespace(runs=[object()] * 12)
    result = SweepResult(plan, [], [{"error": None}] * 3, Path("runs"), None, Path("runs/leaderboard"), 42.4)
    text = repr(result)
    assert text == ("SweepResult(12 runs of 3 method x task pipelines, ok, 42 s; runs_dir='runs', "
                    "leaderboard='runs/leaderboard')")
    failed = SweepResult(plan, [SimpleNamespace(failed=1, diverged=0)], [{"error": "boom"}], Path("r"), None, None, 1)
    assert "1 failed, 1 stopped" in repr(failed) and "leaderboard=None" in repr(failed)


def test_run_ends_with_the_board(tmp_path, capsys):
    root = make_data_root(tmp_path / "data")
    assert main(["run", "--methods", "linear", "--suite", "testsuite", "--tasks", "toy", "--data-root", str(root),
                 "--runs-dir", str(tmp_path / "runs"), "--backbone", TINY_BACKBONE, "--protocol", "fixed",
                 "--seeds", "1", "--epochs", "1", "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "testsuite: mean of the group means" in out and "linear" in out.split("testsuite: mean")[1]
    assert out.index("testsuite: mean") < out.index("run records:")
