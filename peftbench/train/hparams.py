"""The hyper-parameters of one training run, typed and checked.

A run spec carries its hyper-parameters as a plain dict (that dict is hashed into the run key, so
its spelling is part of a run's identity and never changes). :func:`parse_hparams` reads that dict
into :class:`HParams`: an unknown key is an error (a typo no longer falls back to a default and
silently changes nothing but the key), and every value is checked before any compute.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..errors import SettingsError

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class HParams:
    lr: float
    wd: float
    epochs: int
    batch_size: int
    optimizer: str = "sgd"
    warmup_epochs: int = 0
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    lr_scaling: bool = True  # lr × batch / 256 (the VPT code's rule); False: absolute rates (NOAH)
    eval_every: int = 0  # evaluate every N epochs (0: the last epoch only)
    precision: str = "fp32"  # fp32 | tf32 | bf16 | fp16 (autocast); absent from the dict means fp32
    mean: tuple[float, float, float] | None = None  # normalisation (None: ImageNet's)
    std: tuple[float, float, float] | None = None
    # train epochs [0, stop_epoch) of the ``epochs``-epoch schedule and stop (a rung of successive halving,
    # docs/sweeps.md): the lr schedule is the full one; absent means the whole schedule
    stop_epoch: int | None = None

    @property
    def stop(self) -> int:
        """The epoch the run stops at (``epochs`` unless it stops at a rung)."""
        return self.epochs if self.stop_epoch is None else self.stop_epoch


_KINDS = {f.name: f.type for f in fields(HParams)}
_REQUIRED = ("lr", "wd", "epochs", "batch_size")


def _number(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingsError(f"hyper-parameter {key}={value!r}: expected a number")
    if kind is int:
        if float(value) != int(value):
            raise SettingsError(f"hyper-parameter {key}={value!r}: expected an integer")
        return int(value)
    v = float(value)
    if v != v:
        raise SettingsError(f"hyper-parameter {key}={value!r}: expected a number, got NaN")
    return v  # an infinite lr is allowed: the run diverges and is recorded as such


def parse_hparams(hp: dict, *, where: str = "") -> HParams:
    """``hp`` as :class:`HParams`; a :class:`~peftbench.errors.SettingsError` names the bad key."""
    at = f" ({where})" if where else ""
    unknown = sorted(set(hp) - set(_KINDS))
    if unknown:
        raise SettingsError(f"unknown hyper-parameter(s) {', '.join(unknown)}{at} (known: {', '.join(_KINDS)})")
    missing = [k for k in _REQUIRED if k not in hp]
    if missing:
        raise SettingsError(f"missing hyper-parameter(s) {', '.join(missing)}{at}")
    kw: dict[str, Any] = {}
    for key, value in hp.items():
        if key in ("lr", "wd", "warmup_lr", "min_lr"):
            kw[key] = _number(key, value, float)
        elif key in ("epochs", "batch_size", "warmup_epochs", "eval_every", "stop_epoch"):
            kw[key] = _number(key, value, int)
        elif key == "lr_scaling":
            if not isinstance(value, bool):
                raise SettingsError(f"hyper-parameter lr_scaling={value!r}{at}: expected true or false")
            kw[key] = value
        elif key in ("mean", "std"):
            if value is not None:
                if not isinstance(value, (list, tuple)) or len(value) != 3:
                    raise SettingsError(f"hyper-parameter {key}={value!r}{at}: expected 3 numbers")
                value = tuple(_number(key, v, float) for v in value)
            kw[key] = value
        else:
            kw[key] = str(value)
    h = HParams(**kw)
    checks = (
        (h.epochs >= 1, f"epochs={h.epochs}: must be at least 1"),
        (h.batch_size >= 1, f"batch_size={h.batch_size}: must be at least 1"),
        (h.lr >= 0, f"lr={h.lr:g}: must not be negative"),
        (h.wd >= 0, f"wd={h.wd:g}: must not be negative"),
        (h.warmup_epochs >= 0, f"warmup_epochs={h.warmup_epochs}: must not be negative"),
        (h.warmup_lr >= 0 and h.min_lr >= 0, "warmup_lr and min_lr must not be negative"),
        (h.eval_every >= 0, f"eval_every={h.eval_every}: must not be negative"),
        (h.precision in PRECISIONS, f"precision={h.precision!r}: expected one of {', '.join(PRECISIONS)}"),
        (h.std is None or all(s > 0 for s in h.std), "std: every value must be > 0"),
        (h.stop_epoch is None or 1 <= h.stop_epoch <= h.epochs,
         f"stop_epoch={h.stop_epoch}: must be in 1..epochs ({h.epochs})"),
    )
    for ok, msg in checks:
        if not ok:
            raise SettingsError(f"hyper-parameter {msg}{at}")
    return h
