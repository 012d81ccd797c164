"""The leaderboard as data: run records aggregated into one row per method configuration, with the
papers' reported rows beside them. Pure aggregation: no files, no plots (``write.py`` does those).

Conventions (never averaged away): a task counts as *done* for a row when it has at least one
final-stage (``spec.stage == "final"``) record with status ``ok``; a group mean or an overall mean
is empty unless every task it covers is done.

Uncertainty (docs/results.md gives the formulas): each group / overall mean has the sample std over
seeds of the per-seed means (the seeds every task of the mean has, at least two), and the headline
has a standard error from the suite's per-task seed noise (pooled over the configurations with two
or more seeds), with which rows within noise of a better-ranked row are marked as ties.
"""
from __future__ import annotations

import math
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

from .._text import terminal
from ..backbones import backbone_table, preset
from ..errors import PeftbenchError, UnknownNameError
from ..fingerprint import code_fingerprint, staleness
from ..methods import get_method
from ..provenance import parse_time
from ..store import ENDED, RunRecord, RunStatus, RunStore, finite, validate
from ..tasks import get_suite, get_task
from .reference import Reported

FINAL_STAGE = "final"
TIE_Z = 1.96  # two rows tie when their headline difference is within TIE_Z standard errors (95 %, normal)

# ---------------------------------------------------------------------------------------------
# reading the store
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One readable run record, with its path relative to the runs folder."""

    path: str
    record: RunRecord
    stale: bool = False  # produced by other code than the installed one (peftbench.fingerprint)
    stale_parts: tuple[str, ...] = ()  # what changed since: "method", "engine"

    @property
    def spec(self) -> dict:
        return self.record.spec

    @property
    def status(self) -> str:
        """The record's status as its string (compares equal to the :class:`RunStatus` members)."""
        return str(self.record.status)

    @property
    def params(self) -> dict:
        return self.record.params

    @property
    def timing(self) -> dict:
        return self.record.timing

    @property
    def device(self) -> str:
        return self.record.device

    @property
    def top1(self) -> float | None:
        return self.record.top1

    @property
    def precision(self) -> str:
        return str((self.spec.get("hparams") or {}).get("precision") or "fp32")

    def row_key(self) -> tuple[str, str, str, str, str]:
        """Runs of one row: same config, backbone, checkpoint, protocol and numeric precision (seeds of
        different precisions are never averaged into one row)."""
        s = self.spec
        return (str(s.get("config") or s.get("method")), str(s.get("backbone") or ""),
                str(s.get("checkpoint_id") or ""), str(s.get("protocol") or ""), self.precision)


@dataclass
class Skipped:
    path: str
    reason: str


def load_runs(runs_dir: str | Path, warn: Callable[[str], None] | None = None) -> tuple[list[Run], list[Skipped]]:
    """Every run record under ``runs_dir``. Corrupt or partial files, and records that fail the store's
    checks (quarantined, :func:`peftbench.store.store.record_problem`), are reported through ``warn``
    (default: a line on stderr naming the file) and skipped."""
    if warn is None:
        warn = _stderr_warn
    root = Path(runs_dir)
    runs, skipped = [], []
    for path, raw, err in RunStore(root, warn=lambda msg: None).iter_raw():  # reported below, once
        rel = _rel(path, root)
        reason = err and err.split(": ", 1)[-1]
        if raw is not None:
            reason = validate(raw)
        if reason:
            skipped.append(Skipped(rel, reason))
            warn(f"peftbench leaderboard: warning: skipping {path}: {reason}")
            continue
        runs.append(Run(rel, RunRecord.from_dict(raw)))
    _mark_stale(runs, warn)
    return runs, skipped


def _mark_stale(runs: list[Run], warn: Callable[[str], None]) -> None:
    """Flag the finished runs whose code fingerprints differ from the installed code's."""
    current: dict[str, dict] = {}
    count: Counter = Counter()
    for r in runs:
        m = str(r.spec.get("method"))
        if not r.record.code or not r.record.is_final:
            continue
        if m not in current:
            try:
                current[m] = code_fingerprint(get_method(m))
            except PeftbenchError:
                current[m] = {}
        changed = staleness(r.record.code, current[m]) if current[m] else []
        if changed:
            r.stale, r.stale_parts = True, tuple(changed)
            count[m] += 1
    for m, n in sorted(count.items()):
        warn(f"peftbench leaderboard: warning: {n} run record(s) of {m!r} were produced by other code than the "
             "installed one: their results may be stale (`peftbench run ... --rerun-stale` reruns them)")


def code_text(code: dict) -> str:
    """A record's code fingerprints as one cell: ``method <fp> engine <fp>``."""
    return f"method {code.get('method', '?')} engine {code.get('engine', '?')}"


@dataclass
class Freshness:
    """Whether a board's counted runs were made by the installed code (what its banner says)."""

    counted: int
    stale: int
    engine_changed: bool
    methods_changed: list[str]  # methods whose own code changed
    engines: list[str]  # the engine fingerprints of the counted records
    installed_engine: str

    @property
    def text(self) -> str:
        """One line: empty when every counted run was made by the installed code."""
        if not self.stale:
            return ""
        what = [p for p in (["the training engine"] if self.engine_changed else [])
                + ([f"method code ({', '.join(self.methods_changed)})"] if self.methods_changed else [])]
        return (f"Made by older code: {self.stale} of the {self.counted} counted runs were produced by other code "
                f"than the installed peftbench ({' and '.join(what)} changed since); their numbers may differ from what "
                "today's code gives. `peftbench run ... --rerun-stale` retrains them (the committed demo board: "
                "`python scripts/refresh_demo.py`).")


def freshness(board: "Board") -> Freshness:
    from ..fingerprint import engine_fingerprint

    counted = [r for r in board.runs if r.path in board.used]
    stale = [r for r in counted if r.stale]
    return Freshness(len(counted), len(stale), any("engine" in r.stale_parts for r in stale),
                     sorted({str(r.spec.get("method")) for r in stale if "method" in r.stale_parts}),
                     sorted({str(r.record.code.get("engine")) for r in counted if r.record.code}),
                     engine_fingerprint())


def _stderr_warn(msg: str) -> None:
    print(terminal(msg), file=sys.stderr, flush=True)


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


# ---------------------------------------------------------------------------------------------
# suite grid: tasks and groups
# ---------------------------------------------------------------------------------------------


@dataclass
class SuiteGrid:
    """A suite's tasks and their groups, in the order leaderboards show them."""

    suite: str
    tasks: list[str]
    groups: dict[str, list[str]]  # group -> tasks; empty when the suite has no groups

    def group_of(self, task: str) -> str | None:
        for g, ts in self.groups.items():
            if task in ts:
                return g
        return None


def suite_grid(suite: str, runs: Iterable[Run] = ()) -> SuiteGrid:
    """The suite's tasks (registry order) and groups (``Suite.groups`` order, else sorted by name). A
    suite that is not registered (its plugin is not installed) falls back to the tasks its records
    name, sorted."""
    order: tuple[str, ...] = ()
    try:
        s = get_suite(suite)
        name, tasks, order = s.name, list(s.tasks), s.groups
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
    rank = {g: i for i, g in enumerate(order)}
    groups = dict(sorted(groups.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))
    return SuiteGrid(name, tasks, groups)


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Basis:
    """What a row's numbers were produced under. Two rows compare like for like only when their recipe, data
    pipeline, backbone and selection rule agree (docs/leaderboard.md, "like for like").

    * ``recipe``: the training recipe: a paper's (``vpt``, ``e2vpt``, ``noah``, ``ssf``...: the card names of
      ``methods/papers/``, so a ``--protocol paper`` row matches its paper's row), ``peftbench <protocol>`` for
      peftbench's unified protocols, ``card <name>`` for ``--protocol card``;
    * ``data_pipeline``: the files and the preprocessing (``noah files, resize (bilinear)``; the papers' own:
      ``tfds files, resize (tf-bilinear)``, ``noah files, resize (bicubic)``...);
    * ``backbone``: the weights (a timm name with its tag);
    * ``selection``: how the configuration was chosen and which epoch is reported (``val search, last epoch``,
      ``fixed, best test epoch``...);
    * ``mean_convention``: which overall mean the source prints (``groups``: of the group means; ``tasks``: of
      the tasks); a reproduced row has both."""

    recipe: str = ""
    data_pipeline: str = ""
    backbone: str = ""
    selection: str = ""
    mean_convention: str = ""

    def differences(self, other: "Basis") -> list[str]:
        """What differs between two bases (an unknown side counts as a difference: it cannot be checked)."""
        out = []
        for name in ("recipe", "data_pipeline", "backbone", "selection"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b or not a:
                out.append(f"{name.replace('_', ' ')} {a or 'unknown'} vs {b or 'unknown'}")
        return out


def run_basis(run: "Run", searched: bool) -> Basis:
    """The basis of a reproduced run (``searched``: its configuration was chosen by a search stage)."""
    s = run.spec
    hp = s.get("hparams") or {}
    protocol = str(s.get("protocol") or "")
    sources = s.get("option_sources") or {}
    if sources.get("paper.card"):
        recipe = ("card " if protocol == "card" else "") + str(sources["paper.card"])
    else:
        recipe = f"peftbench {protocol}"
    chosen = "val search" if searched else "fixed"
    reported = f"best {s.get('eval_split') or 'eval'} epoch" if hp.get("report") == "best" else "last epoch"
    return Basis(recipe, data_pipeline(str(s.get("task")), run.record.data_pipeline, hp.get("interpolation")),
                 str(s.get("backbone") or ""), f"{chosen}, {reported}")


def data_pipeline(task: str, recorded: dict | None = None, interpolation: str | None = None) -> str:
    """How a run's images were fed, in words: the files (the task's layout), the preprocessing and augmentation
    and PIL's resampling (``record.data_pipeline`` when the record has it; records from before it: the task's
    definition, bilinear; docs/protocols.md §10-§11)."""
    d = recorded or {}
    if d.get("layout"):
        layout, pre, aug, interp = d["layout"], d.get("preprocess"), d.get("augment"), d.get("interpolation")
    else:
        try:
            t = get_task(task)
        except UnknownNameError:
            return ""
        layout, pre, aug, interp = t.layout, t.preprocess, t.augment, interpolation or "bilinear"
    return f"{layout} files, {pre}" + (f" + {aug}" if aug else "") + f" ({interp or 'bilinear'})"


@dataclass
class Row:
    """One leaderboard row. Numbers are floats (None = empty)."""

    source: str  # reproduced | reported
    config: str
    method: str = ""
    backbone: str = ""
    table: str = ""  # the papers' table of the backbone (peftbench.backbones.backbone_table): ranked apart
    checkpoint_id: str = ""
    protocol: str = ""
    precision: str = ""
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
    tuned_params: float | None = None  # params.tuned: what Tuned/Total counts (after pruning, e.g. e2vpt-prune)
    per_seed: dict[str, dict[int, float]] = field(default_factory=dict)  # task -> seed -> top-1 of the counted run
    group_std: dict[str, float | None] = field(default_factory=dict)  # std over seeds of the per-seed group mean
    overall_groups_std: float | None = None
    overall_tasks_std: float | None = None
    headline_se: float | None = None  # standard error of the headline from the suite's per-task noise
    tied_with: int | None = None  # the best rank whose row this row is within noise of (a tie)
    control: str = ""  # why this row is a control (a random-weight backbone): not ranked, not on the frontier
    cached_features: str = ""  # yes | no | mixed: the counted runs trained a head on cached features
    peak_memory_mb: float | None = None
    memory_kind: str = ""
    images_per_s: float | None = None
    device: str = ""
    failed: int = 0
    diverged: int = 0
    unfinished: int = 0
    stale: int = 0  # counted runs produced by other code than the installed one
    code: str = ""  # the code fingerprints of the counted runs' records ("method <fp> engine <fp>"; several: "; ")
    pareto: bool | None = None
    paired_with: str = ""
    delta_groups: dict[str, float | None] = field(default_factory=dict)
    delta_overall_groups: float | None = None
    delta_overall_tasks: float | None = None
    reference_source: str = ""
    notes: str = ""
    rank: int | None = None
    label: str = ""  # display name (config, disambiguated when needed)
    basis: Basis = field(default_factory=Basis)  # what the numbers were produced under (like for like)
    like_for_like: str = ""  # paired rows: "yes", or "no: " and what differs

    @property
    def tasks_done(self) -> int:
        return sum(v is not None for v in self.mean.values())

    def headline(self, grid: SuiteGrid) -> float | None:
        return self.overall_groups if grid.groups else self.overall_tasks

    def headline_std(self, grid: SuiteGrid) -> float | None:
        return self.overall_groups_std if grid.groups else self.overall_tasks_std

    @property
    def seeds_min(self) -> int | None:
        n = [v for v in self.seeds.values() if v]
        return min(n) if n else None


@dataclass
class Board:
    grid: SuiteGrid
    rows: list[Row]  # reproduced rows, then reported rows
    runs: list[Run]  # the suite's readable records
    used: set[str]  # record paths that count in the leaderboard
    skipped: list[Skipped]
    superseded: list[tuple[str, str]]  # (record path, why)
    has_reference: bool
    noise: dict[str, float | None] = field(default_factory=dict)  # task -> pooled seed std of the reproduced rows
    # the backbones' tables of the rows in board order: the suite's default backbone's first, then by name
    tables: list[str] = field(default_factory=list)

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
        return [r for r in self.runs if r.status != RunStatus.OK]


def _mean(values: list[float | None]) -> float | None:
    """Mean of all values, or None if any is missing (never averaged away)."""
    if not values or any(v is None for v in values):
        return None
    return statistics.fmean(values)


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


def _fill_aggregates(row: Row, grid: SuiteGrid) -> None:
    for g, ts in grid.groups.items():
        row.group_mean[g] = _mean([row.mean.get(t) for t in ts])
        row.group_tuned[g] = _mean([row.tuned.get(t) for t in ts])
        row.group_std[g] = seed_std(row.per_seed, {t: 1 / len(ts) for t in ts})
    if grid.groups:
        row.overall_groups = _mean([row.group_mean[g] for g in grid.groups])
        row.overall_groups_std = seed_std(row.per_seed, headline_weights(grid))
    row.overall_tasks = _mean([row.mean.get(t) for t in grid.tasks])
    row.overall_tasks_std = seed_std(row.per_seed, {t: 1 / len(grid.tasks) for t in grid.tasks})


def headline_weights(grid: SuiteGrid) -> dict[str, float]:
    """Each task's weight in the headline mean: 1/(G·|group|) for the mean of G group means, else 1/T."""
    if grid.groups:
        return {t: 1 / (len(grid.groups) * len(ts)) for ts in grid.groups.values() for t in ts}
    return {t: 1 / len(grid.tasks) for t in grid.tasks}


def group_weights(grid: SuiteGrid, group: str | None) -> dict[str, float]:
    """Task weights of a group mean (``group``), or of the headline (None)."""
    if group is None:
        return headline_weights(grid)
    ts = grid.groups[group]
    return {t: 1 / len(ts) for t in ts}


def seed_std(per_seed: dict[str, dict[int, float]], weights: dict[str, float]) -> float | None:
    """Sample std over seeds of the weighted per-seed mean ``sum_t w_t * top1[t][s]``, over the seeds that
    every weighted task has (at least two of them); None otherwise."""
    if not weights or any(not per_seed.get(t) for t in weights):
        return None
    common = set.intersection(*(set(per_seed[t]) for t in weights))
    if len(common) < 2:
        return None
    return statistics.stdev([sum(w * per_seed[t][s] for t, w in weights.items()) for s in sorted(common)])


def pooled_noise(rows: list[Row], tasks: list[str]) -> dict[str, float | None]:
    """Per task: the pooled sample std over seeds, sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1)), over the rows
    with two or more seeds on the task; None when none has."""
    out: dict[str, float | None] = {}
    for t in tasks:
        num = den = 0.0
        for r in rows:
            n, sd = r.seeds.get(t) or 0, r.std.get(t)
            if n >= 2 and sd is not None:
                num += (n - 1) * sd * sd
                den += n - 1
        out[t] = math.sqrt(num / den) if den else None
    return out


def headline_se(row: Row, weights: dict[str, float], noise: dict[str, float | None]) -> float | None:
    """Standard error of a row's weighted mean: sqrt(sum_t w_t^2 sigma_t^2 / n_t), sigma_t the task's
    pooled noise and n_t the row's seeds on it; None when a task has no noise estimate or no run."""
    total = 0.0
    for t, w in weights.items():
        n, sigma = row.seeds.get(t) or 0, noise.get(t)
        if not n or sigma is None:
            return None
        total += w * w * sigma * sigma / n
    return math.sqrt(total)


def within_noise(a: Row, b: Row, grid: SuiteGrid, z: float = TIE_Z) -> bool:
    """The headlines of ``a`` and ``b`` differ by no more than ``z`` standard errors of the difference."""
    ha, hb = a.headline(grid), b.headline(grid)
    if ha is None or hb is None or a.headline_se is None or b.headline_se is None:
        return False
    return abs(ha - hb) <= z * math.hypot(a.headline_se, b.headline_se)


def _latest(runs: list[Run]) -> Run:
    """The run that ended last (times compared as times, whatever the zone they were written in)."""
    early = datetime.min.replace(tzinfo=timezone.utc)
    return max(runs, key=lambda r: (parse_time(r.record.ended_at) or early, r.path))


def build_board(runs: list[Run], suite: str, reference: list[Reported] | None = None,
                skipped: list[Skipped] | None = None, grid: SuiteGrid | None = None,
                warn: Callable[[str], None] | None = None) -> Board:
    """Aggregate the records of ``suite`` (other suites' records are ignored)."""
    warn = warn or _stderr_warn
    grid = grid or suite_grid(suite, runs)
    mine = [r for r in runs if r.spec.get("suite") == grid.suite]
    by_row: dict[tuple, list[Run]] = {}
    for r in mine:
        by_row.setdefault(r.row_key(), []).append(r)

    used: set[str] = set()
    superseded: list[tuple[str, str]] = []
    rows: list[Row] = []
    for key in sorted(by_row):
        config, backbone, ck, protocol, precision = key
        recs = by_row[key]
        row = Row("reproduced", config, method=str(recs[0].spec["method"]), backbone=backbone, checkpoint_id=ck,
                  protocol=protocol, precision=precision)
        row.failed = sum(r.status == RunStatus.FAILED for r in recs)
        row.diverged = sum(r.status == RunStatus.DIVERGED for r in recs)
        row.unfinished = sum(r.status not in ENDED for r in recs)
        final = [r for r in recs if r.status == RunStatus.OK and r.spec.get("stage") == FINAL_STAGE
                 and r.spec.get("task") in grid.tasks and r.top1 is not None]
        per_task: dict[str, list[Run]] = {}
        for r in final:
            per_task.setdefault(r.spec["task"], []).append(r)
        kept_all: list[Run] = []
        ips, params, params_nohead, tuned_params = [], [], [], []
        for t in grid.tasks:
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
            row.per_seed[t] = {int(r.spec["seed"]): float(r.top1) for r in kept}
            row.mean[t] = statistics.fmean(accs)
            row.std[t] = statistics.stdev(accs) if len(accs) > 1 else None
            row.seeds[t] = len(accs)
            row.tuned[t] = _mean([finite(r.params.get("tuned_total_pct")) for r in kept])
            params.append(_mean([finite(r.params.get("trainable")) for r in kept]))
            params_nohead.append(_mean([finite(r.params.get("trainable_without_head")) for r in kept]))
            tuned_params.append(_mean([finite(r.params.get("tuned", r.params.get("trainable"))) for r in kept]))
            ips.append(_mean([finite(r.timing.get("train_images_per_s")) for r in kept]))
            kept_all.extend(kept)
        used.update(r.path for r in kept_all)
        if kept_all:
            searched = any(str(r.spec.get("stage", "")).startswith("search") for r in recs)
            bases = {run_basis(r, searched) for r in kept_all}
            row.basis = bases.pop() if len(bases) == 1 else Basis("mixed", "mixed", backbone, "mixed")
        row.stale = sum(r.stale for r in kept_all)
        row.code = "; ".join(sorted({code_text(r.record.code) for r in kept_all if r.record.code}))
        _fill_aggregates(row, grid)
        done = [t for t in grid.tasks if row.mean.get(t) is not None]
        tuned_done = [row.tuned[t] for t in done if row.tuned[t] is not None]
        row.tuned_total_pct = statistics.fmean(tuned_done) if tuned_done and len(tuned_done) == len(done) else None
        row.trainable = _mean(params) if params else None
        row.trainable_excl_head = _mean(params_nohead) if params_nohead else None
        row.tuned_params = _mean(tuned_params) if tuned_params else None
        cached = {bool(r.timing.get("cached_features")) for r in kept_all}
        row.cached_features = ("mixed" if len(cached) > 1 else ("yes" if cached == {True} else "no")) if cached else ""
        row.control = _control(backbone)
        row.images_per_s = _mean(ips) if ips else None
        mems = [finite(r.timing.get("peak_memory_mb")) for r in kept_all]
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
            r.label = f"{r.config} [{extra}, {r.protocol}" + (f", {r.precision}" if r.precision != "fp32" else "") + "]"

    suite_backbone = _suite_backbone(grid)
    for r in rows:
        r.table = _table(r.backbone)
    reported_rows = [_reported_row(ref, grid) for ref in (reference or [])]
    for rep, ref in zip(reported_rows, reference or []):
        rep.table = _table(ref.preset or suite_backbone)
    by_config = {}
    for r in rows:
        by_config.setdefault(r.config, []).append(r)
    taken: set[int] = set()
    for rep, ref in zip(reported_rows, reference or []):
        mates = [m for c in ref.configs for m in by_config.get(c, []) if id(m) not in taken]
        # a row of the reported row's own backbone table first; else one of another backbone (its like-for-like
        # says the backbone differs)
        mates = [m for m in mates if m.table == rep.table] or mates
        alike = [m for m in mates if not m.basis.differences(rep.basis)]
        same_recipe = [m for m in mates if m.basis.recipe == rep.basis.recipe]
        # the reproduction gap: the row trained with the paper's own recipe (like for like, else the same
        # recipe); else the only reproduced row of that configuration, flagged
        pick = alike if len(alike) == 1 else same_recipe if len(same_recipe) == 1 else mates if len(mates) == 1 else []
        if pick:
            mate = pick[0]
            taken.add(id(mate))
            mate.paired_with, rep.paired_with = rep.label, mate.label
            differs = mate.basis.differences(rep.basis)
            mate.like_for_like = rep.like_for_like = "yes" if not differs else "no: " + "; ".join(differs)
            for target in (mate, rep):
                target.delta_groups = {g: diff(mate.group_mean.get(g), rep.group_mean.get(g)) for g in grid.groups}
                target.delta_overall_groups = diff(mate.overall_groups, rep.overall_groups)
                target.delta_overall_tasks = diff(mate.overall_tasks, rep.overall_tasks)
            mate.reference_source = rep.reference_source

    noise = pooled_noise([r for r in rows if not r.control], grid.tasks)
    weights = headline_weights(grid)
    for r in rows:
        r.headline_se = headline_se(r, weights, noise)
    # each backbone's table is ranked apart (its own frontier, ranks and ties): the suite's default backbone first
    first = _table(suite_backbone)
    order = {t: i for i, t in enumerate(sorted({r.table for r in rows + reported_rows},
                                                key=lambda t: (t != first, t.lower())))}
    for group in (rows, reported_rows):
        for table in order:
            ranked = [r for r in group if r.table == table and not r.control]  # controls: not ranked, not on the frontier
            flags = pareto_front([(r.tuned_total_pct, r.headline(grid)) for r in ranked])
            for r, f in zip(ranked, flags):
                r.pareto = f
        group.sort(key=lambda r: (order[r.table], bool(r.control), r.headline(grid) is None,
                                  -(r.headline(grid) or 0.0), r.label))
        rank, table = 0, None
        above: list[Row] = []
        for r in group:
            if r.table != table:
                rank, table, above = 0, r.table, []
            if r.headline(grid) is not None and not r.control:
                rank += 1
                r.rank = rank
                r.tied_with = next((a.rank for a in above if within_noise(a, r, grid)), None)
                above.append(r)
    return Board(grid, rows + reported_rows, mine, used, list(skipped or []), superseded,
                 has_reference=bool(reference), noise=noise, tables=list(order))


def _control(backbone: str) -> str:
    """Why results on ``backbone`` are a control (its preset's ``control``), else ""."""
    try:
        p = preset(backbone)
    except Exception:  # noqa: BLE001 - a broken backbone plugin must not stop a leaderboard
        return ""
    return p.control if p is not None else ""


def _table(backbone: str) -> str:
    """The papers' table of ``backbone`` (:func:`peftbench.backbones.backbone_table`); the name itself when a broken
    backbone plugin cannot say."""
    try:
        return backbone_table(backbone)
    except Exception:  # noqa: BLE001 - a broken backbone plugin must not stop a leaderboard
        return backbone


def _suite_backbone(grid: SuiteGrid) -> str:
    """The suite's default backbone (whose table comes first, and holds the reported rows that name no preset)."""
    try:
        return get_suite(grid.suite).backbone
    except UnknownNameError:
        return ""


def diff(a: float | None, b: float | None) -> float | None:
    """``a - b``, None when either is missing."""
    return None if a is None or b is None else a - b


def _reported_row(ref: Reported, grid: SuiteGrid) -> Row:
    row = Row("reported", ref.method, reference_source=ref.source, label=ref.method, backbone=ref.backbone,
              basis=Basis(ref.recipe, ref.data_pipeline, ref.backbone, ref.selection, ref.mean_convention))
    for t in grid.tasks:
        row.mean[t] = ref.top1.get(t)
        row.std[t] = None
        row.seeds[t] = 0
        row.tuned[t] = ref.tuned.get(t)
    _fill_aggregates(row, grid)
    notes = [ref.note] if ref.note else []
    printed_groups = {g: ref.printed.get(f"printed_{g}_mean") for g in grid.groups}
    if grid.groups and not ref.top1 and all(v is not None for v in printed_groups.values()):
        # a source that prints group means only (other backbones' tables): those stand for the groups
        row.group_mean = dict(printed_groups)
        row.overall_groups = statistics.fmean(v for v in printed_groups.values() if v is not None)
        notes.append("group means as printed (the source's per-task values are not in the reference file)")
    if ref.tuned and all(ref.tuned.get(t) is not None for t in grid.tasks):
        row.tuned_total_pct = statistics.fmean(ref.tuned[t] for t in grid.tasks)
        notes.append(f"Tuned/Total: mean of per-task values ({ref.tuned_source})")
    elif "printed_tuned_total_pct" in ref.printed:
        row.tuned_total_pct = ref.printed["printed_tuned_total_pct"]
        for g in grid.groups:  # no per-task values: the method-level figure stands for every group
            row.group_tuned[g] = row.tuned_total_pct
        if ref.printed_tuned_source:
            notes.append(f"Tuned/Total: {ref.printed_tuned_source}")
    if ref.configs:
        notes.append("maps to peftbench config " + " or ".join(repr(c) for c in ref.configs))
    row.notes = "; ".join(notes)
    return row


def sorted_runs(board: Board) -> list[Run]:
    """The suite's records in the order of ``<suite>-runs.csv``: by configuration, task (suite order),
    stage, job, seed, path."""
    order = {t: i for i, t in enumerate(board.grid.tasks)}

    def sort_key(r: Run):
        s = r.spec
        return (r.row_key(), order.get(s["task"], len(order)), str(s["task"]), str(s["stage"]), str(s.get("job")),
                int(s["seed"]), r.path)

    return sorted(board.runs, key=sort_key)
