"""GLoRA's evolutionary search (Arnav0400/ViT-Slim@0fed674 GLoRA/evolution_utils.py), draw for draw with its ``random``
calls: the AutoFormer search that NOAH's is also taken from (methods/noah/search.py runs the loop: legality, the top-k
updates, the generations), with GLoRA's candidates: one configuration (A, B, C, D, E paths) per layer.

* random candidate (``get_random_cand``, :180-191): per layer, ``random.choice`` of A, B, C, D, E in this order;
* mutant (``get_mutation``, :204-237): a parent drawn from the ``select`` best; per layer and term, with probability
  ``m_prob`` (``random.random() < m_prob``) a new path is drawn, else the parent's is kept;
* cross (``get_crossover``, :239-267): two parents drawn; per layer and term, ``random.choice`` of the two parents' paths.

The official search (evolution.py) scores candidates on the **test** loader and never saves the best; peftbench scores
on the search split's evaluation split (val200) and records the best of the ``select`` best after the last update.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..noah.search import Evolution
from .model import CHOICES, TERMS


@dataclass
class GLoRAEvolution(Evolution):
    """``choices``: {term: paths}; ``depth``: the number of layers (48 on ViT-B: 12 blocks x 4 Linears)."""

    def _random(self, rng: random.Random):
        return tuple(tuple(rng.choice(CHOICES[t]) for t in TERMS) for _ in range(self.depth))

    def _mutant(self, rng: random.Random):
        parent = rng.choice(self.top[self.select])
        return tuple(tuple(rng.choice(CHOICES[t]) if rng.random() < self.m_prob else layer[j]
                           for j, t in enumerate(TERMS)) for layer in parent)

    def _cross(self, rng: random.Random):
        a, b = rng.choice(self.top[self.select]), rng.choice(self.top[self.select])
        return tuple(tuple(rng.choice([la[j], lb[j]]) for j in range(len(TERMS))) for la, lb in zip(a, b))
