"""NOAH's evolutionary search over subnets of a trained supernet (ZhangYuanhan-AI/NOAH@e9c55f3 evolution.py:31-330),
draw for draw with its ``random`` calls, given a scoring function (the supernet's val200 top-1 of a subnet).

* A candidate is legal when it was not scored before and NOAH's count (:func:`model.noah_count`, in millions) lies
  within [``min_limit``, ``limit``]; legal candidates are scored once (``is_legal``, :84-122).
* ``population`` random candidates (``get_random_cand``: the three depths, then each module's sizes), then
  ``iterations`` times: the ``select`` best and the 50 best so far are updated with the new candidates (a stable
  sort by score, best first), ``mutation`` mutants and ``crossover`` crosses of the ``select`` best are made (each
  up to 10 times as many tries), and random candidates fill the population again (:284-330).
* A mutant (:171-252) changes, each with probability ``m_prob``, a module's depth: with probability ``s_prob`` a new
  depth is drawn (the blocks it adds get new random sizes, the blocks it removes become 0), else it keeps the depth,
  so that module is unchanged (NOAH's mutation never redraws a single size). A cross (:254-282) takes each module's
  whole list (the prefixes' too) from one of two parents.
* The result is the best of the ``select`` best after the last update. NOAH then makes and scores one more
  generation that is never ranked; peftbench stops instead (same result, less compute).
* Random candidates are drawn 10 at a time (``stack_random_cand``). NOAH's random fill never stops when the space
  holds fewer legal candidates than the population; peftbench stops after ``1000 x population`` draws.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .model import KINDS, Subnet

STACK = 10  # stack_random_cand's batch


@dataclass
class Evolution:
    choices: dict  # {"dims": (...), "depths": (...)}
    depth: int
    limit: float  # millions, NOAH's count
    min_limit: float = 0.0
    population: int = 50
    select: int = 10
    mutation: int = 25
    crossover: int = 25
    m_prob: float = 0.2
    s_prob: float = 0.4
    iterations: int = 20
    seed: int = 0
    # per candidate: {"params": M, "acc": top-1} (the scored ones)
    scored: dict = field(default_factory=dict)
    top: dict = field(default_factory=dict)
    history: list = field(default_factory=list)

    def run(self, score: Callable[[Subnet], float], count: Callable[[Subnet], int]) -> Subnet:
        rng = random.Random(self.seed)
        self.top = {self.select: [], 50: []}
        visited: set[Subnet] = set()

        def legal(cand: Subnet) -> bool:
            if cand in visited:
                return False
            params = count(cand) / 1e6
            if params > self.limit or params < self.min_limit:
                return False
            self.scored[cand] = {"params": params, "acc": float(score(cand))}
            visited.add(cand)
            return True

        def stacked(make: Callable[[], Subnet]) -> Iterator[Subnet]:
            while True:
                yield from [make() for _ in range(STACK)]

        def fill(candidates: list[Subnet]) -> None:
            it, tries = stacked(lambda: self._random(rng)), 1000 * self.population
            while len(candidates) < self.population and tries > 0:
                tries -= 1
                cand = next(it)
                if legal(cand):
                    candidates.append(cand)

        def made(make: Callable[[], Subnet], num: int) -> list[Subnet]:
            out: list[Subnet] = []
            it, tries = stacked(make), 10 * num
            while len(out) < num and tries > 0:
                tries -= 1
                cand = next(it)
                if legal(cand):
                    out.append(cand)
            return out

        candidates: list[Subnet] = []
        fill(candidates)
        for it in range(self.iterations):
            for k in (self.select, 50):
                ranked = self.top[k] + candidates
                ranked.sort(key=lambda c: self.scored[c]["acc"], reverse=True)
                self.top[k] = ranked[:k]
            if not self.top[self.select]:
                raise ValueError(f"noah search: no subnet within the limit of {self.limit}M parameters")
            self.history.append({"iteration": it, "scored": len(self.scored),
                                 "best": self.scored[self.top[self.select][0]]["acc"]})
            if it == self.iterations - 1:
                break
            candidates = made(lambda: self._mutant(rng), self.mutation) + made(lambda: self._cross(rng), self.crossover)
            fill(candidates)
        return self.top[self.select][0]

    # -- the candidates ----------------------------------------------------------------------------
    def _random(self, rng: random.Random) -> Subnet:
        depths = [rng.choice(self.choices["depths"]) for _ in KINDS]
        return Subnet(*(tuple(rng.choice(self.choices["dims"]) for _ in range(d)) + (0,) * (self.depth - d)
                        for d in depths))

    def _mutant(self, rng: random.Random) -> Subnet:
        parent = rng.choice(self.top[self.select])
        lists = []
        for kind in KINDS:
            sizes = list(getattr(parent, kind))
            if rng.random() < self.m_prob:
                s = rng.random()
                current = next((i for i, v in enumerate(sizes) if v == 0), self.depth)
                new = rng.choice(self.choices["depths"]) if s < self.s_prob else current
                if new > current:
                    sizes = sizes[:current] + [rng.choice(self.choices["dims"]) for _ in range(new - current)] \
                        + [0] * (self.depth - new)
                else:
                    sizes = sizes[:new] + [0] * (self.depth - new)
            lists.append(tuple(sizes))
        return Subnet(*lists)

    def _cross(self, rng: random.Random) -> Subnet:
        a, b = rng.choice(self.top[self.select]), rng.choice(self.top[self.select])
        picked = [rng.choice([getattr(a, k), getattr(b, k)]) for k in KINDS]
        rng.choice([0, 0])  # (the prefixes' lists, all zeros: one draw)
        return Subnet(*picked)
