"""How a search stage picks its configuration: the full grid (the papers' protocol) or successive halving.

* ``grid``: every point of the lr × wd grid trains the whole schedule (E epochs) on the search splits;
  the best last-epoch eval top-1 wins (:func:`peftbench.sweep.protocols.select_best`).
* ``halving``: successive halving over the same points with the **same** E-epoch schedule (warm-up and
  cosine over E epochs, never shortened). Rung r stops at epoch e_r = round(f_r · E) of that schedule
  (f = ``rungs``, the last one 1.0, so e_R = E); after each rung the best ⌈n / η⌉ of the n configurations
  (η = ``factor``; ranked as ``select_best`` ranks) continue from their rung state to the next rung, the
  others stop. A configuration that survives every rung has trained exactly the run the grid trains (the
  same record, docs/sweeps.md); the best of the last rung is the selection. A rung that would train a
  single configuration is skipped: the selection is made.

Budget (image-steps of the search stage, N = training images, n_1 = n configurations, e_0 = 0)::

    grid:     n · E · N
    halving:  N · Σ_r n_r · (e_r − e_{r−1}),   n_{r+1} = ⌈n_r / η⌉

The VPT grid (n = 40, E = 100) with the defaults (f = 0.1, 0.33, 1; η = 3): 40·10 + 14·23 + 5·67 = 1057
epoch-configurations instead of 4000, 3.8× fewer (:func:`budget`).

This module is the arithmetic (pure, no torch); the stages are made by
:func:`peftbench.sweep.protocols.search_stage`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import SettingsError

SEARCHES = ("grid", "halving")
DEFAULT_RUNGS = (0.1, 0.33, 1.0)
DEFAULT_FACTOR = 3.0


@dataclass(frozen=True)
class Search:
    """The search of a sweep: ``kind`` grid | halving, and the halving's rungs (fractions of the epochs,
    increasing, the last 1.0) and reduction factor η (keep the best ⌈n / η⌉ after each rung)."""

    kind: str = "grid"
    rungs: tuple[float, ...] = DEFAULT_RUNGS
    factor: float = DEFAULT_FACTOR

    def check(self) -> "Search":
        """Itself, or a :class:`~peftbench.errors.SettingsError` naming the flag."""
        if self.kind not in SEARCHES:
            raise SettingsError(f"--search {self.kind!r}: expected one of {', '.join(SEARCHES)}")
        r = tuple(float(x) for x in self.rungs)
        if not r:
            raise SettingsError("--halving-rungs: no value given")
        if any(not 0 < x <= 1 for x in r):
            bad = next(x for x in r if not 0 < x <= 1)
            raise SettingsError(f"--halving-rungs {bad!r}: a rung is a fraction of the epochs in (0, 1]")
        if any(b <= a for a, b in zip(r, r[1:])):
            raise SettingsError(f"--halving-rungs {','.join(f'{x:g}' for x in r)}: rungs must increase")
        if r[-1] != 1.0:
            raise SettingsError(f"--halving-rungs {','.join(f'{x:g}' for x in r)}: the last rung must be 1 (the "
                                "survivors finish the schedule, as a grid run does)")
        if not (isinstance(self.factor, (int, float)) and self.factor > 1 and math.isfinite(self.factor)):
            raise SettingsError(f"--halving-factor {self.factor!r}: must be a number > 1 (keep the best 1/factor)")
        return self

    def describe(self) -> str:
        if self.kind == "grid":
            return "grid"
        return f"halving (rungs {','.join(f'{x:g}' for x in self.rungs)} of the epochs, keep the best 1/{self.factor:g})"


def rung_epochs(rungs: tuple[float, ...], epochs: int) -> list[int]:
    """The stop epoch of each rung for an ``epochs``-epoch schedule: round(f · E), at least 1; rungs that
    round to the same epoch as the one before are dropped; the last is E."""
    out: list[int] = []
    for f in rungs:
        e = min(epochs, max(1, int(math.floor(f * epochs + 0.5))))
        if not out or e > out[-1]:
            out.append(e)
    if out[-1] != epochs:
        out.append(epochs)
    return out


def survivors(n: int, factor: float) -> int:
    """How many of ``n`` configurations continue after a rung: ⌈n / η⌉ (at least 1)."""
    return max(1, math.ceil(n / factor - 1e-9))


def rung_sizes(n: int, stops: list[int], factor: float) -> list[int]:
    """The configurations each rung trains (a rung that would train one configuration is not run)."""
    sizes = [n]
    for _ in stops[1:]:
        k = survivors(sizes[-1], factor)
        if k <= 1:
            break
        sizes.append(k)
    return sizes


def budget(n: int, epochs: int, search: Search) -> tuple[int, int]:
    """(grid, halving) epoch-configurations of a search over ``n`` points (× training images = image-steps)."""
    grid = n * epochs
    if n <= 1:
        return grid, grid
    stops = rung_epochs(search.rungs, epochs)
    sizes = rung_sizes(n, stops, search.factor)
    starts = [0] + stops[:-1]
    return grid, sum(k * (stops[i] - starts[i]) for i, k in enumerate(sizes))
