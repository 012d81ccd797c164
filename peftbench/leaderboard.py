"""Leaderboards regenerated from the run store, with the papers' reported numbers side by side.

``write_leaderboard(runs_dir, out_dir, suite)`` reads every run record under ``runs_dir`` and
writes, per suite (docs/leaderboard.md documents every column and convention)::

    <out>/<suite>-leaderboard.csv     one row per method configuration (+ ``reported`` rows)
    <out>/<suite>-runs.csv            one row per run record (all stages, all statuses)
    <out>/<suite>-vs-reported.csv     reproduced − reported per task / group / overall (vtab, fgvc)
    <out>/<suite>-pareto.{png,svg}    accuracy vs Tuned/Total % (log x), Pareto frontier marked
    <out>/<suite>-tasks.{png,svg}     per-task bars
    <out>/<suite>-report.html         a static, self-contained report of all of the above

Everything is deterministic: the same run store gives byte-identical files (no timestamps, stable
sort orders, paths relative to the runs folder, fixed plot metadata).

Conventions (never averaged away): a task counts as *done* for a row when it has at least one
final-stage (``spec.stage == "final"``) record with status ``ok``; a group mean or an overall mean
is empty unless every task it covers is done.
"""
from __future__ import annotations

import csv
import io
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .store import RunStore

GROUP_ORDER = ("natural", "specialized", "structured")
FINAL_STAGE = "final"
REFERENCE_ENV = "PEFTBENCH_REFERENCE"

# Leaderboard columns around the per-task/per-group block (see docs/leaderboard.md).
HEAD_COLUMNS = ["rank", "source", "config", "method", "backbone", "protocol"]
TAIL_COLUMNS = [
    "tasks_done", "tasks_total", "seeds_min", "seeds_max",
    "tuned_total_pct", "trainable_params", "trainable_params_excl_head",
    "peak_memory_mb", "memory_kind", "train_images_per_s", "device",
    "failed_runs", "diverged_runs", "unfinished_runs", "pareto", "paired_with",
]
END_COLUMNS = ["reference_source", "notes"]

RUNS_COLUMNS = [
    "record", "suite", "config", "method", "task", "group", "stage", "job", "protocol", "backbone",
    "checkpoint_id", "seed", "lr", "wd", "epochs", "batch_size", "train_split", "eval_split", "status",
    "in_leaderboard", "top1", "best_epoch_top1", "best_epoch", "trainable", "trainable_without_head",
    "tuned_total_pct", "train_images_per_s", "peak_memory_mb", "memory_kind", "wall_s", "attempts",
    "device", "key", "error",
]


# ---------------------------------------------------------------------------------------------
# reading the store
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One readable run record, with its path relative to the runs folder."""

    path: str
    record: dict

    @property
    def spec(self) -> dict:
        return self.record["spec"]

    @property
    def status(self) -> str:
        return str(self.record.get("status"))

    @property
    def params(self) -> dict:
        p = self.record.get("params")
        return p if isinstance(p, dict) else {}

    @property
    def timing(self) -> dict:
        t = self.record.get("timing")
        return t if isinstance(t, dict) else {}

    @property
    def device(self) -> str:
        p = self.record.get("provenance")
        return str(p.get("device") or "") if isinstance(p, dict) else ""

    @property
    def top1(self) -> float | None:
        m = self.record.get("metrics")
        return _num(m.get("top1")) if isinstance(m, dict) else None

    def row_key(self) -> tuple[str, str, str, str]:
        s = self.spec
        return (str(s.get("config") or s.get("method")), str(s.get("backbone") or ""),
                str(s.get("checkpoint_id") or ""), str(s.get("protocol") or ""))


@dataclass
class Skipped:
    path: str
    reason: str


_REQUIRED_SPEC = ("method", "task", "suite", "stage", "seed")


def load_runs(runs_dir: str | Path, warn: Callable[[str], None] | None = None) -> tuple[list[Run], list[Skipped]]:
    """Every run record under ``runs_dir``. Corrupt or partial files are reported through ``warn``
    (default: a line on stderr naming the file) and skipped."""
    if warn is None:
        warn = _stderr_warn
    root = Path(runs_dir)
    runs, skipped = [], []
    for path, rec, err in RunStore(root).iter_records():
        rel = _rel(path, root)
        reason = err and err.split(": ", 1)[-1]
        if rec is not None:
            reason = _partial_reason(rec)
        if reason:
            skipped.append(Skipped(rel, reason))
            warn(f"peftbench leaderboard: warning: skipping {path}: {reason}")
            continue
        runs.append(Run(rel, rec))
    return runs, skipped


def _partial_reason(rec: dict) -> str | None:
    spec = rec.get("spec")
    if not isinstance(spec, dict):
        return "'spec' is not an object"
    missing = [k for k in _REQUIRED_SPEC if k not in spec]
    if missing:
        return f"spec lacks {', '.join(missing)}"
    if not isinstance(spec.get("hparams", {}), dict):
        return "spec.hparams is not an object"
    for k in ("method", "task", "suite", "stage"):
        if not isinstance(spec[k], str):
            return f"spec.{k} is not a string"
    try:
        int(spec["seed"])
    except (TypeError, ValueError):
        return "spec.seed is not an integer"
    if not isinstance(rec.get("status"), str):
        return "status is not a string"
    # a finished training run has metrics, params and timing (other jobs, e.g. pruning, need not)
    if rec.get("status") == "ok" and spec.get("job", "train") == "train":
        if not isinstance(rec.get("metrics"), dict) or _num(rec["metrics"].get("top1")) is None:
            return "status ok but no numeric metrics.top1 (partial record)"
        if not isinstance(rec.get("params"), dict) or not isinstance(rec.get("timing"), dict):
            return "status ok but no params/timing (partial record)"
    return None


def _stderr_warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


# ---------------------------------------------------------------------------------------------
# suite layout
# ---------------------------------------------------------------------------------------------


@dataclass
class Layout:
    suite: str
    tasks: list[str]
    groups: dict[str, list[str]]  # group -> tasks, in GROUP_ORDER; empty when the suite has no groups

    def group_of(self, task: str) -> str | None:
        for g, ts in self.groups.items():
            if task in ts:
                return g
        return None


def suite_layout(suite: str, runs: Iterable[Run] = ()) -> Layout:
    """The suite's tasks (registry order) and VTAB-style groups. A suite that is not registered (its
    plugin is not installed) falls back to the tasks its records name, sorted."""
    from .registry import UnknownNameError
    from .task import get_suite, get_task

    try:
        s = get_suite(suite)
        name, tasks = s.name, list(s.tasks)
    except UnknownNameError:
        name = suite
        tasks = sorted({r.spec["task"] for r in runs if r.spec.get("suite") == suite})
    groups: dict[str, list[str]] = {}
    for t in tasks:
        try:
            g = get_task(t).group
        except UnknownNameError:
            g = None
        if g:
            groups.setdefault(g, []).append(t)
    if groups and sum(len(v) for v in groups.values()) != len(tasks):
        groups = {}  # some tasks without a group: no group means
    order = {g: i for i, g in enumerate(GROUP_ORDER)}
    groups = dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    return Layout(name, tasks, groups)


# ---------------------------------------------------------------------------------------------
# reported numbers
# ---------------------------------------------------------------------------------------------


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


def default_reference_dir() -> Path | None:
    """``$PEFTBENCH_REFERENCE``, else the repository's ``results/reference``."""
    env = os.environ.get(REFERENCE_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent / "results" / "reference"
    return here if here.is_dir() else None


def load_reference(reference_dir: str | Path | None, layout: Layout) -> list[Reported]:
    """Reported rows of ``<dir>/<suite>-top1.csv`` (+ ``<suite>-tuned_total_pct.csv``); none if absent."""
    if reference_dir is None:
        return []
    d = Path(reference_dir)
    top1_file = d / f"{layout.suite}-top1.csv"
    if not top1_file.is_file():
        return []
    tuned_rows = {}
    tuned_file = d / f"{layout.suite}-tuned_total_pct.csv"
    if tuned_file.is_file():
        for row in _read_csv(tuned_file):
            tuned_rows[row["method"]] = row
    out = []
    for row in _read_csv(top1_file):
        top1 = {t: float(row[t]) for t in layout.tasks if (row.get(t) or "").strip()}
        tuned, tuned_source = {}, ""
        if row["method"] in tuned_rows:
            tr = tuned_rows[row["method"]]
            tuned = {t: float(tr[t]) for t in layout.tasks if (tr.get(t) or "").strip()}
            tuned_source = tr.get("source", "")
        printed = {k: float(v) for k, v in row.items() if k.startswith("printed_") and (v or "").strip()}
        configs = tuple(c.strip() for c in (row.get("peftbench_config") or "").split(";") if c.strip())
        out.append(Reported(row["method"], configs, row.get("source", ""), top1, tuned, tuned_source, printed,
                            row.get("note", "")))
    return out


def _read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One leaderboard row. Numbers are floats (None = empty)."""

    source: str  # reproduced | reported
    config: str
    method: str = ""
    backbone: str = ""
    checkpoint_id: str = ""
    protocol: str = ""
    mean: dict[str, float | None] = field(default_factory=dict)  # task -> mean top-1
    std: dict[str, float | None] = field(default_factory=dict)
    seeds: dict[str, int] = field(default_factory=dict)
    tuned: dict[str, float | None] = field(default_factory=dict)  # task -> Tuned/Total %
    group_mean: dict[str, float | None] = field(default_factory=dict)
    group_tuned: dict[str, float | None] = field(default_factory=dict)
    overall_groups: float | None = None
    overall_tasks: float | None = None
    tuned_total_pct: float | None = None
    trainable: float | None = None
    trainable_excl_head: float | None = None
    peak_memory_mb: float | None = None
    memory_kind: str = ""
    images_per_s: float | None = None
    device: str = ""
    failed: int = 0
    diverged: int = 0
    unfinished: int = 0
    pareto: bool | None = None
    paired_with: str = ""
    delta_groups: dict[str, float | None] = field(default_factory=dict)
    delta_overall_groups: float | None = None
    delta_overall_tasks: float | None = None
    reference_source: str = ""
    notes: str = ""
    rank: int | None = None
    label: str = ""  # display name (config, disambiguated when needed)

    @property
    def tasks_done(self) -> int:
        return sum(v is not None for v in self.mean.values())

    def headline(self, layout: Layout) -> float | None:
        return self.overall_groups if layout.groups else self.overall_tasks


@dataclass
class Board:
    layout: Layout
    rows: list[Row]  # reproduced rows, then reported rows
    runs: list[Run]  # the suite's readable records
    used: set[str]  # record paths that count in the leaderboard
    skipped: list[Skipped]
    superseded: list[tuple[str, str]]  # (record path, why)
    has_reference: bool

    @property
    def reproduced(self) -> list[Row]:
        return [r for r in self.rows if r.source == "reproduced"]

    @property
    def reported(self) -> list[Row]:
        return [r for r in self.rows if r.source == "reported"]

    def pairs(self) -> list[tuple[Row, Row]]:
        by_label = {r.label: r for r in self.reported}
        return [(r, by_label[r.paired_with]) for r in self.reproduced if r.paired_with in by_label]

    def problem_runs(self) -> list[Run]:
        return [r for r in self.runs if r.status != "ok"]


def _mean(values: list[float | None]) -> float | None:
    """Mean of all values, or None if any is missing (never averaged away)."""
    if not values or any(v is None for v in values):
        return None
    return statistics.fmean(values)


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def pareto_front(points: list[tuple[float | None, float | None]]) -> list[bool | None]:
    """For (x = cost, y = accuracy) points: True when no other point has x <= and y >= with one strict
    (lower cost and higher accuracy are better); None for points with a missing coordinate."""
    out: list[bool | None] = []
    for i, (x, y) in enumerate(points):
        if x is None or y is None:
            out.append(None)
            continue
        dominated = any(
            j != i and qx is not None and qy is not None and qx <= x and qy >= y and (qx < x or qy > y)
            for j, (qx, qy) in enumerate(points))
        out.append(not dominated)
    return out


def _fill_aggregates(row: Row, layout: Layout) -> None:
    for g, ts in layout.groups.items():
        row.group_mean[g] = _mean([row.mean.get(t) for t in ts])
        row.group_tuned[g] = _mean([row.tuned.get(t) for t in ts])
    if layout.groups:
        row.overall_groups = _mean([row.group_mean[g] for g in layout.groups])
    row.overall_tasks = _mean([row.mean.get(t) for t in layout.tasks])


def _latest(runs: list[Run]) -> Run:
    return max(runs, key=lambda r: (str(r.record.get("ended_at") or ""), r.path))


def build_board(runs: list[Run], suite: str, reference: list[Reported] | None = None,
                skipped: list[Skipped] | None = None, layout: Layout | None = None,
                warn: Callable[[str], None] | None = None) -> Board:
    """Aggregate the records of ``suite`` (other suites' records are ignored)."""
    warn = warn or _stderr_warn
    layout = layout or suite_layout(suite, runs)
    mine = [r for r in runs if r.spec.get("suite") == layout.suite]
    by_row: dict[tuple, list[Run]] = {}
    for r in mine:
        by_row.setdefault(r.row_key(), []).append(r)

    used: set[str] = set()
    superseded: list[tuple[str, str]] = []
    rows: list[Row] = []
    for key in sorted(by_row):
        config, backbone, ck, protocol = key
        recs = by_row[key]
        row = Row("reproduced", config, method=str(recs[0].spec["method"]), backbone=backbone, checkpoint_id=ck,
                  protocol=protocol)
        row.failed = sum(r.status == "failed" for r in recs)
        row.diverged = sum(r.status == "diverged" for r in recs)
        row.unfinished = sum(r.status not in ("ok", "failed", "diverged") for r in recs)
        final = [r for r in recs if r.status == "ok" and r.spec.get("stage") == FINAL_STAGE
                 and r.spec.get("task") in layout.tasks and r.top1 is not None]
        per_task: dict[str, list[Run]] = {}
        for r in final:
            per_task.setdefault(r.spec["task"], []).append(r)
        kept_all: list[Run] = []
        ips, params, params_nohead = [], [], []
        for t in layout.tasks:
            by_seed: dict[int, list[Run]] = {}
            for r in per_task.get(t, []):
                by_seed.setdefault(int(r.spec["seed"]), []).append(r)
            kept = []
            for seed in sorted(by_seed):
                cands = by_seed[seed]
                best = _latest(cands)
                kept.append(best)
                for c in sorted(cands, key=lambda c: c.path):
                    if c is not best:
                        why = f"superseded by {best.path} (same config, task {t}, seed {seed}; the later one counts)"
                        superseded.append((c.path, why))
                        warn(f"peftbench leaderboard: warning: {c.path}: {why}")
            if not kept:
                row.mean[t] = row.std[t] = row.tuned[t] = None
                row.seeds[t] = 0
                continue
            accs = [r.top1 for r in kept]
            row.mean[t] = statistics.fmean(accs)
            row.std[t] = statistics.stdev(accs) if len(accs) > 1 else None
            row.seeds[t] = len(accs)
            row.tuned[t] = _mean([_num(r.params.get("tuned_total_pct")) for r in kept])
            params.append(_mean([_num(r.params.get("trainable")) for r in kept]))
            params_nohead.append(_mean([_num(r.params.get("trainable_without_head")) for r in kept]))
            ips.append(_mean([_num(r.timing.get("train_images_per_s")) for r in kept]))
            kept_all.extend(kept)
        used.update(r.path for r in kept_all)
        _fill_aggregates(row, layout)
        done = [t for t in layout.tasks if row.mean.get(t) is not None]
        tuned_done = [row.tuned[t] for t in done if row.tuned[t] is not None]
        row.tuned_total_pct = statistics.fmean(tuned_done) if tuned_done and len(tuned_done) == len(done) else None
        row.trainable = _mean(params) if params else None
        row.trainable_excl_head = _mean(params_nohead) if params_nohead else None
        row.images_per_s = _mean(ips) if ips else None
        mems = [_num(r.timing.get("peak_memory_mb")) for r in kept_all]
        mems = [m for m in mems if m is not None]
        row.peak_memory_mb = max(mems) if mems else None
        kinds = sorted({str(r.timing.get("memory_kind")) for r in kept_all if r.timing.get("memory_kind")})
        row.memory_kind = kinds[0] if len(kinds) == 1 else ("mixed: " + " | ".join(kinds) if kinds else "")
        devices = sorted({r.device for r in kept_all if r.device})
        row.device = devices[0] if len(devices) == 1 else ("mixed: " + " | ".join(devices) if devices else "")
        rows.append(row)

    # display labels: the config label, disambiguated when a config ran on several backbones/protocols
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.config] = counts.get(r.config, 0) + 1
    for r in rows:
        r.label = r.config
        if counts[r.config] > 1:
            extra = r.backbone + (f"@{r.checkpoint_id[:8]}" if r.checkpoint_id else "")
            r.label = f"{r.config} [{extra}, {r.protocol}]"

    reported_rows = [_reported_row(ref, layout) for ref in (reference or [])]
    by_config = {}
    for r in rows:
        by_config.setdefault(r.config, []).append(r)
    for rep, ref in zip(reported_rows, reference or []):
        mates = [m for c in ref.configs for m in by_config.get(c, [])]
        if len(mates) == 1:  # pair only unambiguous matches
            mate = mates[0]
            mate.paired_with, rep.paired_with = rep.label, mate.label
            for target in (mate, rep):
                target.delta_groups = {g: _diff(mate.group_mean.get(g), rep.group_mean.get(g)) for g in layout.groups}
                target.delta_overall_groups = _diff(mate.overall_groups, rep.overall_groups)
                target.delta_overall_tasks = _diff(mate.overall_tasks, rep.overall_tasks)
            mate.reference_source = rep.reference_source

    for group in (rows, reported_rows):
        flags = pareto_front([(r.tuned_total_pct, r.headline(layout)) for r in group])
        for r, f in zip(group, flags):
            r.pareto = f
        group.sort(key=lambda r: (r.headline(layout) is None, -(r.headline(layout) or 0.0), r.label))
        rank = 0
        for r in group:
            if r.headline(layout) is not None:
                rank += 1
                r.rank = rank
    return Board(layout, rows + reported_rows, mine, used, list(skipped or []), superseded,
                 has_reference=bool(reference))


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _reported_row(ref: Reported, layout: Layout) -> Row:
    row = Row("reported", ref.method, reference_source=ref.source, label=ref.method)
    for t in layout.tasks:
        row.mean[t] = ref.top1.get(t)
        row.std[t] = None
        row.seeds[t] = 0
        row.tuned[t] = ref.tuned.get(t)
    _fill_aggregates(row, layout)
    notes = [ref.note] if ref.note else []
    if ref.tuned and all(ref.tuned.get(t) is not None for t in layout.tasks):
        row.tuned_total_pct = statistics.fmean(ref.tuned[t] for t in layout.tasks)
        notes.append(f"Tuned/Total: mean of per-task values ({ref.tuned_source})")
    elif "printed_tuned_total_pct" in ref.printed:
        row.tuned_total_pct = ref.printed["printed_tuned_total_pct"]
        for g in layout.groups:  # no per-task values: the method-level figure stands for every group
            row.group_tuned[g] = row.tuned_total_pct
        notes.append("Tuned/Total: VFPT Table 1 (mean over the 24 VTAB+FGVC tasks)")
    if ref.configs:
        notes.append("maps to peftbench config " + " or ".join(repr(c) for c in ref.configs))
    row.notes = "; ".join(notes)
    return row


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------


def leaderboard_columns(layout: Layout) -> list[str]:
    cols = list(HEAD_COLUMNS)
    for t in layout.tasks:
        cols += [t, f"{t}_std"]
    cols += [f"{g}_mean" for g in layout.groups]
    if layout.groups:
        cols.append("overall_mean_of_groups")
    cols.append("overall_mean_of_tasks")
    cols += TAIL_COLUMNS
    cols += [f"delta_{g}_mean" for g in layout.groups]
    if layout.groups:
        cols.append("delta_overall_mean_of_groups")
    cols.append("delta_overall_mean_of_tasks")
    cols += END_COLUMNS
    return cols


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


def leaderboard_records(board: Board) -> list[dict[str, str]]:
    lay = board.layout
    out = []
    for r in board.rows:
        rep = r.source == "reproduced"
        d: dict[str, str] = {
            "rank": fmt(r.rank), "source": r.source, "config": r.label, "method": r.method,
            "backbone": r.backbone + (f"@{r.checkpoint_id}" if r.checkpoint_id else ""), "protocol": r.protocol,
        }
        for t in lay.tasks:
            d[t] = fmt(r.mean.get(t))
            d[f"{t}_std"] = fmt(r.std.get(t))
        for g in lay.groups:
            d[f"{g}_mean"] = fmt(r.group_mean.get(g))
        if lay.groups:
            d["overall_mean_of_groups"] = fmt(r.overall_groups)
        d["overall_mean_of_tasks"] = fmt(r.overall_tasks)
        seeds = [r.seeds[t] for t in lay.tasks if r.seeds.get(t)]
        d.update({
            "tasks_done": fmt(r.tasks_done), "tasks_total": fmt(len(lay.tasks)),
            "seeds_min": fmt(min(seeds)) if seeds else "", "seeds_max": fmt(max(seeds)) if seeds else "",
            "tuned_total_pct": fmt(r.tuned_total_pct),
            "trainable_params": fmt(None if r.trainable is None else float(round(r.trainable)), 0),
            "trainable_params_excl_head": fmt(None if r.trainable_excl_head is None
                                              else float(round(r.trainable_excl_head)), 0),
            "peak_memory_mb": fmt(r.peak_memory_mb, 1), "memory_kind": r.memory_kind,
            "train_images_per_s": fmt(r.images_per_s, 1), "device": r.device,
            "failed_runs": fmt(r.failed) if rep else "", "diverged_runs": fmt(r.diverged) if rep else "",
            "unfinished_runs": fmt(r.unfinished) if rep else "",
            "pareto": fmt(r.pareto), "paired_with": r.paired_with,
        })
        for g in lay.groups:
            d[f"delta_{g}_mean"] = fmt(r.delta_groups.get(g))
        if lay.groups:
            d["delta_overall_mean_of_groups"] = fmt(r.delta_overall_groups)
        d["delta_overall_mean_of_tasks"] = fmt(r.delta_overall_tasks)
        d["reference_source"] = r.reference_source
        d["notes"] = r.notes
        out.append(d)
    return out


def vs_reported_columns(layout: Layout) -> list[str]:
    cols = ["config", "backbone", "protocol", "reported", "reference_source"]
    cols += [f"delta_{t}" for t in layout.tasks]
    cols += [f"delta_{g}_mean" for g in layout.groups]
    if layout.groups:
        cols.append("delta_overall_mean_of_groups")
    cols.append("delta_overall_mean_of_tasks")
    return cols


def vs_reported_records(board: Board) -> list[dict[str, str]]:
    lay = board.layout
    out = []
    for mine, rep in board.pairs():
        d = {"config": mine.label, "backbone": mine.backbone, "protocol": mine.protocol, "reported": rep.label,
             "reference_source": rep.reference_source}
        for t in lay.tasks:
            d[f"delta_{t}"] = fmt(_diff(mine.mean.get(t), rep.mean.get(t)))
        for g in lay.groups:
            d[f"delta_{g}_mean"] = fmt(mine.delta_groups.get(g))
        if lay.groups:
            d["delta_overall_mean_of_groups"] = fmt(mine.delta_overall_groups)
        d["delta_overall_mean_of_tasks"] = fmt(mine.delta_overall_tasks)
        out.append(d)
    return out


def runs_records(board: Board) -> list[dict[str, str]]:
    lay = board.layout
    order = {t: i for i, t in enumerate(lay.tasks)}
    superseded = dict(board.superseded)

    def sort_key(r: Run):
        s = r.spec
        return (r.row_key(), order.get(s["task"], len(order)), str(s["task"]), str(s["stage"]), str(s.get("job")),
                int(s["seed"]), r.path)

    out = []
    for r in sorted(board.runs, key=sort_key):
        s, rec = r.spec, r.record
        hp = s.get("hparams") or {}
        params, timing = r.params, r.timing
        metrics = rec["metrics"] if isinstance(rec.get("metrics"), dict) else {}
        err = str(rec.get("error") or "").strip().splitlines()
        if r.path in board.used:
            used = "yes"
        elif r.path in superseded:
            used = "superseded"
        else:
            used = "no"
        out.append({
            "record": r.path, "suite": s["suite"], "config": s.get("config") or s["method"], "method": s["method"],
            "task": s["task"], "group": lay.group_of(s["task"]) or "", "stage": s["stage"], "job": s.get("job", ""),
            "protocol": s.get("protocol", ""), "backbone": s.get("backbone", ""),
            "checkpoint_id": s.get("checkpoint_id") or "", "seed": fmt(int(s["seed"])),
            "lr": _plain(hp.get("lr")), "wd": _plain(hp.get("wd")), "epochs": _plain(hp.get("epochs")),
            "batch_size": _plain(hp.get("batch_size")), "train_split": s.get("train_split", ""),
            "eval_split": s.get("eval_split", ""), "status": r.status, "in_leaderboard": used,
            "top1": fmt(_num(metrics.get("top1"))), "best_epoch_top1": fmt(_num(metrics.get("best_epoch_top1"))),
            "best_epoch": _plain(metrics.get("best_epoch")),
            "trainable": _plain(params.get("trainable")), "trainable_without_head": _plain(params.get("trainable_without_head")),
            "tuned_total_pct": fmt(_num(params.get("tuned_total_pct")), 6),
            "train_images_per_s": fmt(_num(timing.get("train_images_per_s")), 1),
            "peak_memory_mb": fmt(_num(timing.get("peak_memory_mb")), 1), "memory_kind": timing.get("memory_kind") or "",
            "wall_s": fmt(_num(rec.get("wall_s")), 1), "attempts": _plain(rec.get("attempts")),
            "device": r.device, "key": rec.get("key") or Path(r.path).stem,
            "error": err[-1] if err else "",
        })
    return out


def _plain(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return repr(x)
    return str(x)


def csv_text(columns: list[str], records: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="raise")
    w.writeheader()
    for r in records:
        w.writerow(r)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def suites_in(runs: list[Run]) -> list[str]:
    return sorted({str(r.spec["suite"]) for r in runs})


def write_suite(board: Board, out_dir: str | Path, *, plots: bool = True, html: bool = True) -> list[Path]:
    """Write one suite's files; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = board.layout.suite
    written = []

    def text(name: str, content: str) -> None:
        p = out / name
        _atomic_write_bytes(p, content.encode("utf-8"))
        written.append(p)

    text(f"{s}-leaderboard.csv", csv_text(leaderboard_columns(board.layout), leaderboard_records(board)))
    text(f"{s}-runs.csv", csv_text(RUNS_COLUMNS, runs_records(board)))
    if board.has_reference:
        text(f"{s}-vs-reported.csv", csv_text(vs_reported_columns(board.layout), vs_reported_records(board)))
    figures: dict[str, dict[str, bytes]] = {}
    if plots or html:
        from .plots import render_all

        figures = render_all(board)
        if plots:
            for name, by_fmt in figures.items():
                for ext, data in by_fmt.items():
                    p = out / f"{s}-{name}.{ext}"
                    _atomic_write_bytes(p, data)
                    written.append(p)
    if html:
        from .report import render_report

        text(f"{s}-report.html", render_report(board, {n: f["svg"] for n, f in figures.items()}))
    return written


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write next to ``path`` and rename over it (readers never see half a file); the file gets the
    usual umask permissions (unlike the run store's private temporary files)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_leaderboard(runs_dir: str | Path, out_dir: str | Path, suite: str | None = None, *,
                      reference_dir: str | Path | None | bool = None, plots: bool = True, html: bool = True,
                      warn: Callable[[str], None] | None = None) -> list[Path]:
    """Regenerate the leaderboard files of ``suite`` (None: every suite that has records under
    ``runs_dir``) into ``out_dir``; return the paths written.

    ``reference_dir``: folder of reported numbers (None: :func:`default_reference_dir`; False: none).
    Corrupt or partial record files are reported on stderr (``warn``) and skipped.
    """
    runs, skipped = load_runs(runs_dir, warn)
    if reference_dir is None:
        reference_dir = default_reference_dir()
    elif reference_dir is False:
        reference_dir = None
    suites = [suite] if suite else suites_in(runs)
    written: list[Path] = []
    for s in suites:
        layout = suite_layout(s, runs)
        reference = load_reference(reference_dir, layout)
        board = build_board(runs, layout.suite, reference, skipped, layout=layout, warn=warn)
        written += write_suite(board, out_dir, plots=plots, html=html)
    return written


__all__ = ["write_leaderboard", "load_runs", "build_board", "suite_layout", "load_reference", "pareto_front",
           "Board", "Row", "Run", "Layout", "Reported", "leaderboard_columns", "leaderboard_records",
           "runs_records", "default_reference_dir"]
