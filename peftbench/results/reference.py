"""The papers' reported numbers: ``<suite>-top1.csv`` (+ ``<suite>-tuned_total_pct.csv``) in a
reference folder, shipped with the package (``peftbench/results/reference/``); columns in
docs/leaderboard.md."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .._io import safe_component
from ..backbones import BACKBONES
from ..errors import SettingsError, UnknownNameError

if TYPE_CHECKING:
    from .board import SuiteGrid

REFERENCE_ENV = "PEFTBENCH_REFERENCE"


@dataclass
class Reported:
    method: str  # as the paper names it, e.g. "VPT-deep"
    configs: tuple[str, ...]  # the peftbench configuration labels it maps to (CSV: ";"-separated; () = none)
    source: str
    top1: dict[str, float]
    tuned: dict[str, float]  # per-task Tuned/Total % (printed or computed, see tuned_source)
    tuned_source: str
    printed: dict[str, float]  # printed_* columns
    note: str
    printed_tuned_source: str = ""  # where printed_tuned_total_pct comes from (column tuned_total_pct_source)
    # what the numbers were produced under (columns recipe, data_pipeline, backbone, selection; the mean
    # convention is which printed overall the row has): peftbench.results.board.Basis
    recipe: str = ""
    data_pipeline: str = ""
    backbone: str = ""
    selection: str = ""
    mean_convention: str = ""
    # the backbone preset (or timm name) whose table the row belongs in (column preset; empty: the suite's default
    # backbone): leaderboards rank each backbone's table apart (peftbench.backbones.backbone_table)
    preset: str = ""


def default_reference_dir() -> Path | None:
    """``$PEFTBENCH_REFERENCE``, else the reference numbers shipped with the package."""
    env = os.environ.get(REFERENCE_ENV)
    if env:
        return Path(env)
    here = Path(str(resources.files("peftbench.results") / "reference"))
    return here if here.is_dir() else None


def load_reference(reference_dir: str | Path | None, grid: "SuiteGrid") -> list[Reported]:
    """Reported rows of ``<dir>/<suite>-top1.csv`` (+ ``<suite>-tuned_total_pct.csv``); none if absent."""
    if reference_dir is None:
        return []
    top1_file = Path(reference_dir) / f"{safe_component(grid.suite, 'suite')}-top1.csv"
    if not top1_file.is_file():
        return []
    return read_reference_file(top1_file, grid)


def read_reference_file(top1_file: str | Path, grid: "SuiteGrid") -> list[Reported]:
    """Reported rows of one top-1 CSV (columns in docs/leaderboard.md), with the per-task Tuned/Total of
    ``<suite>-tuned_total_pct.csv`` beside it when that file exists."""
    top1_file = Path(top1_file)
    tuned_rows = {}
    tuned_file = top1_file.parent / f"{safe_component(grid.suite, 'suite')}-tuned_total_pct.csv"
    if tuned_file.is_file():
        for row in _read_csv(tuned_file):
            tuned_rows[row["method"]] = row
    rows = _read_csv(top1_file)
    if rows and "method" not in rows[0]:
        raise SettingsError(f"{top1_file}: no 'method' column (a reference CSV has method, <task>..., source, "
                            "peftbench_config; docs/leaderboard.md)")
    out = []
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        name = (row.get("preset") or "").strip()
        if name:
            try:
                BACKBONES.get(name)
            except UnknownNameError as e:
                raise SettingsError(f"{top1_file}:{line}: column preset: {e}") from None
        if row["method"] in seen:
            raise SettingsError(f"{top1_file}: the row {row['method']!r} appears twice (a reference row is named once)")
        seen.add(row["method"])
        top1 = {t: float(row[t]) for t in grid.tasks if (row.get(t) or "").strip()}
        tuned, tuned_source = {}, ""
        if row["method"] in tuned_rows:
            tr = tuned_rows[row["method"]]
            tuned = {t: float(tr[t]) for t in grid.tasks if (tr.get(t) or "").strip()}
            tuned_source = tr.get("source", "")
        printed = {k: float(v) for k, v in row.items() if k.startswith("printed_") and (v or "").strip()}
        configs = tuple(c.strip() for c in (row.get("peftbench_config") or "").split(";") if c.strip())
        tasks_mean = "printed_overall_mean_of_tasks" in printed
        groups_mean = "printed_overall_mean_of_groups" in printed
        convention = "tasks" if tasks_mean and not groups_mean else "groups" if groups_mean and not tasks_mean else \
            "both" if tasks_mean else ""
        out.append(Reported(row["method"], configs, row.get("source", ""), top1, tuned, tuned_source, printed,
                            row.get("note", ""), (row.get("tuned_total_pct_source") or "").strip(),
                            *((row.get(k) or "").strip() for k in ("recipe", "data_pipeline", "backbone", "selection")),
                            convention, (row.get("preset") or "").strip()))
    return out


def _read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))
