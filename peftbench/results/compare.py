"""Two sets of results compared configuration by configuration: per task, per group and overall, B − A,
paired by seed, with paired significance tests (docs/results.md gives every formula).

The two sides are two run stores, two selections of one store (``--tag FIELD=VALUE``: e.g.
``backbone=demo-vit`` against ``backbone=demo-vit-random``, or ``precision=fp32`` against
``precision=bf16``), or a store against a reference CSV (``<suite>-top1.csv`` layout: the papers'
numbers, one value per task, no seeds). Rows match on their configuration label, backbone (+
checkpoint), protocol and precision, less the fields the tags select on.

Tests (scipy.stats):

* per task, over the seeds both sides ran: a sign-flip permutation test of the mean paired difference
  (exact: every one of the 2^n sign patterns) and a paired t-test (undefined when every difference
  is the same, e.g. a constant shift);
* per group mean and overall mean, over the (task, seed) pairs: a sign-flip permutation test of the
  mean's paired difference ``sum_t w_t mean_s d_ts`` (each pair's sign flipped independently: exact up
  to 2^20 patterns, else 10 000 random ones from a fixed seed); the same test clustered by task (all seeds
  of a task flipped together: the tasks are the units, which does not assume that a task's seeds are
  independent evidence), and a Wilcoxon signed-rank test over the tasks' mean differences (Demšar 2006).
  Without seeds on one side (a reference CSV) the units are the tasks.

A difference is marked significant only when every test that applies to it agrees: a task's sign-flip and
t-test over seeds; a mean's pair-level and task-clustered sign-flip tests (the pair-level test alone is the
most liberal one: seeds of one task share its data). Each line also has the standard error of its delta, and
``p_holm``: the largest of its tests' p adjusted by Holm's step-down over the matched configurations, so that
reading many configurations at once keeps the family-wise error at alpha.
"""
from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import SettingsError
from .board import Board, Row, Run, SuiteGrid, build_board, group_weights, load_runs, seed_std, suite_grid
from .reference import Reported, read_reference_file

ALPHA = 0.05
EXACT_MAX_UNITS = 20  # sign-flip tests enumerate every pattern up to 2^20, else sample RANDOM_FLIPS
FLIP_BATCH = 2 ** 16  # patterns evaluated at once (memory)
RANDOM_FLIPS = 10_000
MATCH_FIELDS = ("config", "backbone", "checkpoint", "protocol", "precision")  # also: method
# which row-key fields a selector on a spec field takes out of the matching
_DROPS = {"config": ("config",), "method": ("config",), "backbone": ("backbone", "checkpoint"),
          "checkpoint": ("checkpoint",), "checkpoint_id": ("checkpoint",), "protocol": ("protocol",),
          "precision": ("precision",), "hparams.precision": ("precision",)}
_ALIASES = {"precision": "hparams.precision", "checkpoint": "checkpoint_id"}


# ---------------------------------------------------------------------------------------------
# selecting runs: --tag FIELD=VALUE[,FIELD=VALUE]
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selector:
    """Runs whose spec has every ``field == value`` (dotted paths read nested dicts: ``hparams.lr``;
    ``precision`` is ``hparams.precision``, fp32 when unset; ``checkpoint`` is ``checkpoint_id``)."""

    text: str
    terms: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str, flag: str = "--tag") -> "Selector":
        terms = []
        for part in text.split(","):
            name, sep, value = part.partition("=")
            if not sep or not name.strip():
                raise SettingsError(f"{flag} {text!r}: expected FIELD=VALUE[,FIELD=VALUE] (e.g. backbone=demo-vit, "
                                    "config=lora, precision=bf16)")
            terms.append((name.strip(), value.strip()))
        return cls(text, tuple(terms))

    def matches(self, run: Run) -> bool:
        return all(_spec_value(run, name) == value for name, value in self.terms)

    @property
    def drops(self) -> set[str]:
        return {d for name, _ in self.terms for d in _DROPS.get(name, ())}


def _spec_value(run: Run, name: str) -> str:
    if name in ("precision", "hparams.precision"):
        return run.precision
    cur: object = run.spec
    for part in _ALIASES.get(name, name).split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return "" if cur is None else str(cur)


# ---------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------


@dataclass
class Line:
    """One task, group mean or overall mean of one matched configuration: B − A."""

    scope: str  # task | group | overall
    name: str  # the task, the group, or mean_of_groups / mean_over_tasks
    a: float | None = None
    b: float | None = None
    delta: float | None = None
    delta_std: float | None = None  # sample std over seeds of the paired difference
    pairs: int = 0  # paired observations: seeds (a task), (task, seed) pairs (a mean); 0 = unpaired
    p_sign_flip: float | None = None
    p_t: float | None = None
    p_wilcoxon: float | None = None
    p_task_flip: float | None = None  # a mean's sign-flip test clustered by task (tasks as the units)
    se: float | None = None  # standard error of delta (a task: std / sqrt(seeds); a mean: sqrt(sum w_t^2 se_t^2))
    # p_tests adjusted by Holm's step-down over the matched configurations (the same task / group / mean of each)
    p_holm: float | None = None

    @property
    def p_tests(self) -> float | None:
        """The largest p of the applicable tests (the sign-flip test, and a task's t-test / a mean's task-clustered
        test when defined): below ``alpha`` exactly when :meth:`significant`."""
        if self.p_sign_flip is None:
            return None
        others = [self.p_t] if self.scope == "task" else [self.p_task_flip]
        return max([self.p_sign_flip] + [p for p in others if p is not None])

    def significant(self, alpha: float = ALPHA) -> bool | None:
        """Every applicable test below ``alpha``: the sign-flip test, and the t-test of a task / the task-clustered
        test of a mean when they are defined."""
        p = self.p_tests
        return None if p is None else p < alpha

    def significant_holm(self, alpha: float = ALPHA) -> bool | None:
        """:meth:`significant` after Holm's correction for the number of configurations compared."""
        return None if self.p_holm is None else self.p_holm < alpha


@dataclass
class Match:
    a: Row
    b: Row
    lines: list[Line] = field(default_factory=list)

    def line(self, scope: str, name: str) -> Line | None:
        return next((x for x in self.lines if x.scope == scope and x.name == name), None)

    @property
    def like_for_like(self) -> str:
        """``yes`` when both sides were produced under the same recipe, data pipeline, backbone and selection
        (:class:`~peftbench.results.board.Basis`), else ``no: `` and what differs."""
        differs = self.a.basis.differences(self.b.basis)
        return "yes" if not differs else "no: " + "; ".join(differs)

    @property
    def headline(self) -> Line | None:
        return self.lines[-1] if self.lines else None


@dataclass
class Comparison:
    grid: SuiteGrid
    label_a: str
    label_b: str
    matches: list[Match]
    only_a: list[str]  # row labels without a partner
    only_b: list[str]
    match_fields: tuple[str, ...]
    paired: bool  # B has seeds (a run store), not a reference CSV
    alpha: float = ALPHA

    def __post_init__(self) -> None:
        adjust_holm(self.matches)

    @property
    def headline_name(self) -> str:
        return "mean_of_groups" if self.grid.groups else "mean_over_tasks"


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``ps`` (Holm 1979), in their order: the i-th smallest p becomes
    max over j <= i of min(1, (m - j + 1) · p_(j)). Rejecting where the adjusted p is below alpha controls the
    family-wise error rate at alpha for any dependence between the tests."""
    m = len(ps)
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda k: ps[k])):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def adjust_holm(matches: list[Match]) -> None:
    """Set ``p_holm`` on every line that has tests: per task, group and mean, over the matched configurations that
    have that line (the family: "which configurations changed on X")."""
    families: dict[tuple[str, str], list[Line]] = {}
    for m in matches:
        for line in m.lines:
            if line.p_tests is not None:
                families.setdefault((line.scope, line.name), []).append(line)
    for lines in families.values():
        for line, p in zip(lines, holm([x.p_tests for x in lines])):  # type: ignore[misc]
            line.p_holm = p


def _facet(row: Row, name: str) -> str:
    return {"config": row.config, "method": row.method, "backbone": row.backbone, "checkpoint": row.checkpoint_id,
            "protocol": row.protocol, "precision": row.precision}[name]


def compare_boards(a: Board, b: Board, *, label_a: str, label_b: str,
                   match_fields: tuple[str, ...] = MATCH_FIELDS, alpha: float = ALPHA) -> Comparison:
    """Match the reproduced rows of ``a`` and ``b`` on ``match_fields`` and compare each pair."""
    grid = a.grid
    key = lambda r: tuple(_facet(r, f) for f in match_fields)  # noqa: E731
    rows_b: dict[tuple, list[Row]] = {}
    for r in b.reproduced:
        rows_b.setdefault(key(r), []).append(r)
    matches, only_a, used = [], [], set()
    for r in a.reproduced:
        mates = rows_b.get(key(r), [])
        if len(mates) == 1:
            matches.append(Match(r, mates[0], compare_rows(r, mates[0], grid)))
            used.add(id(mates[0]))
        else:
            only_a.append(r.label + (f" ({len(mates)} candidates)" if mates else ""))
    only_b = [r.label for r in b.reproduced if id(r) not in used]
    return Comparison(grid, label_a, label_b, matches, only_a, only_b, tuple(match_fields), True, alpha)


def compare_with_reference(a: Board, reported: list[Row], refs: list[Reported], *, label_a: str, label_b: str,
                           alpha: float = ALPHA) -> Comparison:
    """Each reproduced row of ``a`` against the reported row that names its config (``peftbench_config``)."""
    grid = a.grid
    matches, only_a, used = [], [], set()
    for r in a.reproduced:
        mates = [rep for rep, ref in zip(reported, refs) if r.config in ref.configs and id(rep) not in used]
        if len(mates) == 1:
            matches.append(Match(r, mates[0], compare_rows(r, mates[0], grid)))
            used.add(id(mates[0]))
        else:
            only_a.append(r.label + (f" ({len(mates)} candidates)" if mates else ""))
    only_b = [r.label for r in reported if id(r) not in used]
    return Comparison(grid, label_a, label_b, matches, only_a, only_b, ("config",), False, alpha)


def compare_rows(a: Row, b: Row, grid: SuiteGrid) -> list[Line]:
    """Per task, then per group, then overall (the headline last): B − A."""
    lines: list[Line] = []
    diffs: dict[str, dict[int, float]] = {}  # task -> seed -> d
    for t in grid.tasks:
        sa, sb = a.per_seed.get(t) or {}, b.per_seed.get(t) or {}
        common = sorted(set(sa) & set(sb))
        if common:
            d = [sb[s] - sa[s] for s in common]
            diffs[t] = dict(zip(common, d))
            line = Line("task", t, statistics.fmean(sa[s] for s in common), statistics.fmean(sb[s] for s in common),
                        statistics.fmean(d), statistics.stdev(d) if len(d) > 1 else None, len(d))
            line.p_sign_flip = sign_flip_p(d, [1.0] * len(d))
            line.p_t = paired_t_p(d)
            line.se = line.delta_std / math.sqrt(len(d)) if line.delta_std is not None else None
        else:
            ma, mb = a.mean.get(t), b.mean.get(t)
            line = Line("task", t, ma, mb, None if ma is None or mb is None else mb - ma)
        lines.append(line)
    by_task = {x.name: x for x in lines}
    scopes = [("group", g, group_weights(grid, g)) for g in grid.groups]
    if grid.groups:
        scopes.append(("overall", "mean_of_groups", group_weights(grid, None)))
    scopes.append(("overall", "mean_over_tasks", {t: 1 / len(grid.tasks) for t in grid.tasks}))
    for scope, name, weights in scopes:
        lines.append(_mean_line(scope, name, weights, by_task, diffs))
    return lines


def _mean_line(scope: str, name: str, weights: dict[str, float], by_task: dict[str, Line],
               diffs: dict[str, dict[int, float]]) -> Line:
    tl = [by_task[t] for t in weights]
    if any(x.delta is None for x in tl):
        return Line(scope, name)
    line = Line(scope, name, sum(weights[x.name] * x.a for x in tl), sum(weights[x.name] * x.b for x in tl),
                sum(weights[x.name] * x.delta for x in tl))
    if all(x.name in diffs for x in tl):  # paired on every task: units are the (task, seed) pairs
        values, w = [], []
        for t, wt in weights.items():
            for d in diffs[t].values():
                values.append(d)
                w.append(wt / len(diffs[t]))
        line.pairs = len(values)
        line.delta_std = seed_std(diffs, weights)
        if all(x.se is not None for x in tl):
            line.se = math.sqrt(sum((weights[x.name] * x.se) ** 2 for x in tl))
    else:  # unpaired: the tasks are the units
        values, w = [x.delta for x in tl], [weights[x.name] for x in tl]
    line.p_sign_flip = sign_flip_p(values, w)
    line.p_task_flip = sign_flip_p([x.delta for x in tl], [weights[x.name] for x in tl]) if line.pairs \
        else line.p_sign_flip
    line.p_wilcoxon = wilcoxon_p([x.delta for x in tl])
    return line


# ---------------------------------------------------------------------------------------------
# the tests (scipy.stats)
# ---------------------------------------------------------------------------------------------


def sign_flip_p(values: list[float], weights: list[float]) -> float | None:
    """Two-sided p-value of the statistic ``sum_i w_i d_i`` under independent sign flips of the d_i (the
    paired permutation test, ``scipy.stats.permutation_test(permutation_type="samples")``)."""
    if not values:
        return None
    if len(values) == 1 or all(v == 0 for v in values):
        return 1.0  # one unit: both signs are as extreme as the observed one
    import numpy as np
    from scipy import stats

    d = np.asarray(values, dtype=float)
    w = np.asarray(weights, dtype=float)
    n = len(d)
    if n <= EXACT_MAX_UNITS:  # every sign pattern, as bits of 0 .. 2^n − 1, FLIP_BATCH patterns at a time
        wd = w * d
        observed = abs(float(wd.sum()))
        tol = 1e-12 * max(1.0, observed)  # (sums of the same terms in another order: equal up to rounding)
        extreme = 0
        for start in range(0, 2 ** n, FLIP_BATCH):
            codes = np.arange(start, min(start + FLIP_BATCH, 2 ** n), dtype=np.int64)
            signs = 1.0 - 2.0 * ((codes[:, None] >> np.arange(n)) & 1)
            extreme += int(np.count_nonzero(np.abs(signs @ wd) >= observed - tol))
        return float(min(1.0, extreme / 2 ** n))
    res = stats.permutation_test((d, np.zeros_like(d)), lambda x, y, axis: np.sum(w * (x - y), axis=axis),
                                 permutation_type="samples", vectorized=True, alternative="two-sided",
                                 n_resamples=RANDOM_FLIPS, **_rng())
    return float(min(1.0, res.pvalue))


def _rng() -> dict:
    import inspect

    import numpy as np
    from scipy import stats

    params = inspect.signature(stats.permutation_test).parameters
    return {"rng": np.random.default_rng(0)} if "rng" in params else {"random_state": 0}


def paired_t_p(d: list[float]) -> float | None:
    """Two-sided p of a paired t-test on the differences; None with fewer than two or no spread."""
    if len(d) < 2 or statistics.pstdev(d) == 0:
        return None
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = stats.ttest_1samp(d, 0.0).pvalue
    return float(p) if math.isfinite(p) else None


def wilcoxon_p(d: list[float]) -> float | None:
    """Two-sided p of the Wilcoxon signed-rank test over the differences (zeros dropped); None with
    fewer than two non-zero differences."""
    nz = [x for x in d if x != 0]
    if len(nz) < 2:
        return None
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (RuntimeWarning, UserWarning))
        p = stats.wilcoxon(nz).pvalue
    return float(p) if math.isfinite(p) else None


# ---------------------------------------------------------------------------------------------
# from paths
# ---------------------------------------------------------------------------------------------


def _is_reference(path: Path) -> bool:
    return path.is_file() and path.suffix == ".csv"


def compare_paths(a: str | Path, b: str | Path | None = None, *, tags: tuple[str, str] | None = None,
                  suite: str | None = None, match_fields: tuple[str, ...] | None = None, alpha: float = ALPHA,
                  warn: Callable[[str], None] | None = None) -> list[Comparison]:
    """Compare run store ``a`` with ``b`` (a run store or a reference CSV), or two ``tags`` selections of
    ``a``; one comparison per suite (``suite``: only that one)."""
    a = Path(a)
    if not a.is_dir():
        raise SettingsError(f"{a}: not a run store folder")
    if (b is None) == (tags is None):
        raise SettingsError("compare: give a second run store (or a reference CSV), or two --tag selections")
    runs_a, skipped = load_runs(a, warn)
    sides: tuple[list[Run], list[Run]]
    refs_file: Path | None = None
    if tags is not None:
        sel_a, sel_b = Selector.parse(tags[0]), Selector.parse(tags[1])
        fields = tuple(f for f in (match_fields or MATCH_FIELDS) if f not in sel_a.drops | sel_b.drops)
        sides = ([r for r in runs_a if sel_a.matches(r)], [r for r in runs_a if sel_b.matches(r)])
        labels = (sel_a.text, sel_b.text)
        for sel, rs in zip((sel_a, sel_b), sides):
            if not rs:
                raise SettingsError(f"--tag {sel.text}: no run record of {a} matches")
    else:
        b = Path(b)
        fields = tuple(match_fields or MATCH_FIELDS)
        labels = (str(a), str(b))
        if _is_reference(b):
            refs_file = b
            sides = (runs_a, [])
        elif b.is_dir():
            sides = (runs_a, load_runs(b, warn)[0])
        else:
            raise SettingsError(f"{b}: neither a run store folder nor a reference CSV file")
    suites = [suite] if suite else sorted({str(r.spec["suite"]) for r in sides[0] + sides[1]})  # an empty A: B's
    out = []
    for s in suites:
        grid = suite_grid(s, sides[0] + sides[1])
        board_a = build_board(sides[0], grid.suite, None, skipped, grid=grid, warn=warn)
        if refs_file is not None:
            refs = read_reference_file(refs_file, grid)
            board_r = build_board([], grid.suite, refs, grid=grid, warn=warn)
            reported = {r.label: r for r in board_r.reported}
            out.append(compare_with_reference(board_a, [reported[ref.method] for ref in refs], refs,
                                              label_a=labels[0], label_b=labels[1], alpha=alpha))
        else:
            board_b = build_board(sides[1], grid.suite, None, grid=grid, warn=warn)
            out.append(compare_boards(board_a, board_b, label_a=labels[0], label_b=labels[1], match_fields=fields,
                                      alpha=alpha))
    return out


def comparison_csv(cmp: Comparison) -> str:
    """``<suite>-compare.csv``: one row per (matched configuration, task | group | overall)."""
    from .columns import csv_text, table

    header, records = table("compare", cmp, [(m, line) for m in cmp.matches for line in m.lines])
    return csv_text(header, records)
