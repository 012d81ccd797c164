"""Writing a suite's leaderboard files from the run store (the only module that draws and renders).

``write_leaderboard(runs_dir, out_dir, suite)`` reads every run record under ``runs_dir`` and
writes, per suite (docs/leaderboard.md documents every column and convention)::

    <out>/<suite>-leaderboard.csv     one row per method configuration (+ ``reported`` rows)
    <out>/<suite>-runs.csv            one row per run record (all stages, all statuses)
    <out>/<suite>-vs-reported.csv     reproduced − reported per task / group / overall (vtab, fgvc)
    <out>/<suite>-pareto.{png,svg}    accuracy vs Tuned/Total % (log x), Pareto frontier marked
    <out>/<suite>-tasks.{png,svg}     per-task heatmap (configurations x tasks)
    <out>/<suite>-table.tex, .md      the papers' Table 1 layout (LaTeX booktabs, Markdown)
    <out>/<suite>-compare.csv         B − A per task / group / overall (with ``comparisons``)
    <out>/<suite>-report.html         a static, self-contained report of all of the above

Everything is deterministic: the same run store gives byte-identical files (no timestamps, stable
sort orders, paths relative to the runs folder, fixed plot metadata). Nothing is written outside
``out_dir``: the suite name that prefixes every file is checked to be one file name
(:func:`peftbench._io.safe_component`; records whose names are not were quarantined on reading).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from .._io import atomic_write_bytes, safe_component
from ..errors import SettingsError, StoreError
from .board import Board, Run, build_board, load_runs, sorted_runs, suite_grid
from .columns import csv_text, table
from .compare import Comparison, comparison_csv
from .plots import render_all
from .reference import default_reference_dir, load_reference
from .report import render_comparison, render_report
from .tables import FORMATS, PRINTED


def _write(path: Path, data: bytes) -> Path:
    """One output file, written atomically; a full disk or a folder that cannot be written is a one-line error
    naming the file (the files written before it stay whole)."""
    try:
        return atomic_write_bytes(path, data, fsync=False)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from None


def _mkdir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the folder {out}: {exc.strerror or exc}") from None


def suites_in(runs: list[Run]) -> list[str]:
    return sorted({str(r.spec["suite"]) for r in runs})


def write_suite(board: Board, out_dir: str | Path, *, plots: bool = True, html: bool = True,
                comparison: Comparison | None = None, raw_names: bool = False) -> list[Path]:
    """Write one suite's files; returns their paths. Without plots and html: the CSV files only."""
    out = Path(out_dir)
    s = safe_component(board.grid.suite, "suite")
    _mkdir(out)
    written = []

    def write(name: str, data: bytes) -> None:
        written.append(_write(out / name, data))

    write(f"{s}-leaderboard.csv", csv_text(*table("leaderboard", board, board.rows)).encode())
    write(f"{s}-runs.csv", csv_text(*table("runs", board, sorted_runs(board))).encode())
    if board.has_reference:
        write(f"{s}-vs-reported.csv", csv_text(*table("vs-reported", board, board.pairs())).encode())
    if comparison is not None:
        write(f"{s}-compare.csv", comparison_csv(comparison).encode())
    figures: dict[str, dict[str, bytes]] = {}
    if plots or html:
        for make, ext in FORMATS.values():
            write(f"{s}-table.{ext}", make(board, raw_names=raw_names).encode())
        figures = render_all(board)
        if plots:
            for name, by_fmt in figures.items():
                for ext, data in by_fmt.items():
                    write(f"{s}-{name}.{ext}", data)
    if html:
        write(f"{s}-report.html", render_report(board, {n: f["svg"] for n, f in figures.items()},
                                                comparison).encode())
    return written


def write_comparison(cmp: Comparison, out_dir: str | Path, *, html: bool = True) -> list[Path]:
    """``<suite>-compare.csv`` (+ ``<suite>-compare.html``) of a comparison; returns the paths."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SettingsError(f"--out {out_dir}: is a file, not a folder")
    s = safe_component(cmp.grid.suite, "suite")
    _mkdir(out)
    paths = [_write(out / f"{s}-compare.csv", comparison_csv(cmp).encode())]
    if html:
        paths.append(_write(out / f"{s}-compare.html", render_comparison(cmp).encode()))
    return paths


STAMP = ".peftbench-leaderboard.stamp"  # which store the files of a folder come from


def check_out_dir(runs_dir: str | Path, out_dir: str | Path, *, force: bool = False) -> None:
    """``out_dir`` may receive the leaderboard of ``runs_dir``: it is a folder (or can be made) and its
    leaderboard files, if any, were written from the same store (``force``: overwrite anyway)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SettingsError(f"--out {out_dir}: is a file, not a folder")
    if force or not out.is_dir():
        return
    stamp = out / STAMP
    mine = _store_id(runs_dir, out)
    if stamp.is_file():
        try:
            theirs = json.loads(stamp.read_text()).get("runs_dir")
        except (OSError, ValueError):
            theirs = None
        if theirs == mine:
            return
        raise SettingsError(f"--out {out_dir}: its leaderboard files were written from another run store "
                            f"({theirs!r}, relative to it; this one is {mine!r}); pass --force to overwrite them, "
                            "or choose another --out")
    existing = sorted(p.name for p in out.glob("*-leaderboard.csv"))
    if existing:
        raise SettingsError(f"--out {out_dir}: holds leaderboard files ({', '.join(existing)}) not written from "
                            f"this run store; pass --force to overwrite them, or choose another --out")


def _store_id(runs_dir: str | Path, out: Path) -> str:
    return Path(os.path.relpath(Path(runs_dir).resolve(), out.resolve())).as_posix()


def _boards(runs_dir, suite, reference_dir, warn) -> list[Board]:
    runs, skipped = load_runs(runs_dir, warn)
    if reference_dir is None:
        reference_dir = default_reference_dir()
    elif reference_dir is False:
        reference_dir = None
    out = []
    for s in [suite] if suite else suites_in(runs):
        grid = suite_grid(s, runs)
        reference = load_reference(reference_dir, grid)
        out.append(build_board(runs, grid.suite, reference, skipped, grid=grid, warn=warn))
    return out


def leaderboard_tables(runs_dir: str | Path, fmt: str, suite: str | None = None, *,
                       reference_dir: str | Path | None | bool = None,
                       warn: Callable[[str], None] | None = None, raw_names: bool = False) -> dict[str, str]:
    """suite -> the leaderboard as a LaTeX (``fmt="latex"``) or Markdown (``"markdown"``) table, or as the terminal's
    plain text (``"terminal"``; peftbench.results.tables), for every suite of ``runs_dir`` (or ``suite``).
    ``raw_names``: the tables name methods and tasks by their identifiers, not the papers' display names."""
    make = PRINTED[fmt][0]
    kw = {"raw_names": raw_names} if fmt in FORMATS else {}
    return {b.grid.suite: make(b, **kw) for b in _boards(runs_dir, suite, reference_dir, warn)}


def write_leaderboard(runs_dir: str | Path, out_dir: str | Path, suite: str | None = None, *,
                      reference_dir: str | Path | None | bool = None, plots: bool = True, html: bool = True,
                      warn: Callable[[str], None] | None = None, force: bool = False,
                      comparisons: dict[str, Comparison] | None = None, raw_names: bool = False) -> list[Path]:
    """Regenerate the leaderboard files of ``suite`` (None: every suite that has records under
    ``runs_dir``) into ``out_dir``; return the paths written.

    ``reference_dir``: folder of reported numbers (None: :func:`default_reference_dir`; False: none).
    Corrupt or partial record files are reported on stderr (``warn``) and skipped. Files in ``out_dir``
    that another run store produced are not overwritten unless ``force`` (:func:`check_out_dir`).
    ``comparisons``: suite -> a :class:`~peftbench.results.compare.Comparison` to add to that suite's
    files (``<suite>-compare.csv`` and a section of the report).
    """
    check_out_dir(runs_dir, out_dir, force=force)
    boards = _boards(runs_dir, suite, reference_dir, warn)
    if boards:  # the stamp first: a concurrent driver of the same store checking the folder finds it
        _mkdir(Path(out_dir))
        _write(Path(out_dir) / STAMP, (json.dumps({"runs_dir": _store_id(runs_dir, Path(out_dir))}) + "\n").encode())
    written: list[Path] = []
    for board in boards:
        written += write_suite(board, out_dir, plots=plots, html=html,
                               comparison=(comparisons or {}).get(board.grid.suite), raw_names=raw_names)
    return written
