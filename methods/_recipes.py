"""Training recipes: how a method trains under the VPT protocol, and the values other protocols and
suites need from it, as data.

A :class:`Recipe` holds the VPT-protocol settings (optimiser, batch size, epochs, warm-up, lr × wd
search grid). Values that only apply under one protocol or on one suite are declared beside them,
never tested for by name in code:

* ``protocols["<protocol>"]``: what that protocol reads from the method (the ``demo`` protocol reads
  ``lr``, ``wd``, ``epochs``, ``batch_size``; see :mod:`peftbench.sweep.protocols`);
* ``suites["<suite>"]``: :class:`SuiteOverride` values that replace the recipe's own on that suite
  (E^2VPT's FGVC batch size and lr grid), with the reason recorded in each run's ``option_sources``.

Learning rates are *base* rates: the engine multiplies them by ``batch_size / 256`` (the VPT code's rule).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping

VPT_LR_GRID = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
VPT_WD_GRID = (0.01, 0.001, 0.0001, 0.0)
FULL_FT_LR_GRID = (0.001, 0.0001, 0.0005, 0.005)


@dataclass(frozen=True)
class SuiteOverride:
    """Recipe values that apply on one suite, and where they come from."""

    values: Mapping[str, Any]
    source: str


def _frozen(d: Mapping | None) -> Mapping:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class Recipe:
    optimizer: str = "sgd"  # a registered optimiser (peftbench.train.optim): sgd | adamw | vpt-adamw
    batch_size: int = 64
    epochs: int = 100
    warmup_epochs: int = 10
    lr_grid: tuple[float, ...] = VPT_LR_GRID
    wd_grid: tuple[float, ...] = VPT_WD_GRID
    protocols: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: _frozen({}))
    suites: Mapping[str, SuiteOverride] = field(default_factory=lambda: _frozen({}))

    def __post_init__(self):
        object.__setattr__(self, "protocols", _frozen({k: _frozen(v) for k, v in self.protocols.items()}))
        object.__setattr__(self, "suites", _frozen(self.suites))

    def for_protocol(self, protocol: str, **values: Any) -> "Recipe":
        """A copy whose ``protocols[protocol]`` has ``values`` on top of what it had."""
        merged = {**self.protocols, protocol: {**self.protocols.get(protocol, {}), **values}}
        return replace(self, protocols=merged)

    def for_suite(self, suite: str, source: str, **values: Any) -> "Recipe":
        """A copy with an override of the recipe's own values on ``suite``."""
        return replace(self, suites={**self.suites, suite: SuiteOverride(_frozen(values), source)})

    def protocol_values(self, protocol: str) -> Mapping[str, Any]:
        return self.protocols.get(protocol, MappingProxyType({}))

    def suite_override(self, suite: str) -> SuiteOverride | None:
        return self.suites.get(suite)


PROMPT_RECIPE = Recipe()
# demo: 100 epochs, as the real protocol; the head trains on cached features, so they cost next to nothing
LINEAR_RECIPE = Recipe(batch_size=1024).for_protocol("demo", lr=1.0, batch_size=128, epochs=100)
FULL_FT_RECIPE = Recipe(optimizer="vpt-adamw", batch_size=384, warmup_epochs=5,
                        lr_grid=FULL_FT_LR_GRID).for_protocol("demo", lr=0.005)
# NOAH's optimisation (AdamW, batch 64, 100 epochs, 10 warm-up) for the VPT protocol's lr x wd search.
# Base rates: the engine multiplies them by batch/256, so 0.004 is NOAH's 1e-3 at batch 64. (The NOAH
# protocol itself, with its absolute lr 1e-3 and wd 1e-4, is ``--protocol fixed``.) Demo suite (tiny ViT,
# 10 epochs): base 0.04 (lr 0.01) beat 0.008 on demo_digits val for lora (96.5 vs 86.0 %) and
# adapter-noah (95.5 vs 80.0 %).
NOAH_RECIPE = Recipe(optimizer="adamw", batch_size=64, epochs=100, warmup_epochs=10,
                     lr_grid=(0.004, 0.002, 0.0004, 0.02),
                     wd_grid=(0.0001, 0.001, 0.01, 0.0)).for_protocol("demo", lr=0.04, wd=0.0001, batch_size=64)
# NOAH's optimisation without a search: AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs, 10 warm-up (base lr 0.004 =
# 1e-3 at batch 64), the recipe of Convpass, FacT, RepAdapter, Adapter+ and Jie & Deng's AdaptFormer baseline (each
# method's module cites its own source); the demo protocol keeps wd 1e-4 and batch 64 with the method's own lr.
NOAH_FIXED_RECIPE = Recipe(optimizer="adamw", batch_size=64, epochs=100, warmup_epochs=10,
                           lr_grid=(0.004,), wd_grid=(1e-4,))


def noah_fixed_recipe(demo_lr: float) -> Recipe:
    """:data:`NOAH_FIXED_RECIPE` with the demo protocol's lr (wd 1e-4, batch 64)."""
    return NOAH_FIXED_RECIPE.for_protocol("demo", lr=demo_lr, wd=0.0001, batch_size=64)
