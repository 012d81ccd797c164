"""The hyper-parameters of one training run, typed and checked.

A run spec carries its hyper-parameters as a plain dict (that dict is hashed into the run key, so
its spelling is part of a run's identity and never changes). :func:`parse_hparams` reads that dict
into :class:`HParams`: an unknown key is an error (a typo no longer falls back to a default and
silently changes nothing but the key), and every value is checked before any compute.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .._registry import normalise
from ..data.images import RESAMPLINGS
from ..errors import SettingsError
from ..store.records import RUN_POSITION

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
SCHEDULES = ("vpt", "timm-cosine")  # peftbench.train.optim.lr_at_epoch
REPORTS = ("last", "best")  # metrics.top1 of a run: its last evaluation, or its best one (flagged)
HEAD_INITS = ("vpt", "trunc-normal", "torch")  # peftbench.train.build.init_head
CLIP_MODES = ("norm", "value")  # peftbench.train.optim.clip_gradients
# when the images are resized: PIL's bilinear / bicubic, or TF 2's tf.image.resize (peftbench.data.images)
INTERPOLATIONS = RESAMPLINGS
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
    # what the papers' own recipes need (--protocol paper, docs/protocols.md §5-§7); absent: the defaults,
    # so runs planned before these existed keep their keys
    schedule: str = "vpt"  # vpt: warm-up then cosine over the rest; timm-cosine: timm's CosineLRScheduler
    cosine_epochs: int | None = None  # timm-cosine: its t_initial (epochs past it run at min_lr: a cool-down)
    schedule_lag: int = 0  # timm-cosine: 1 when the official loop steps the scheduler with the epoch just ended
    drop_last: bool = False  # drop the last partial batch of every epoch (a DataLoader's drop_last=True)
    label_smoothing: float = 0.0
    # None: the data's (the layout's pipeline: TFDS files tf-bilinear, else PIL bilinear); bicubic: PIL bicubic
    # (NOAH, SSF, FacT...); tf-bilinear: TF's tf.image.resize (VPT, E^2VPT)
    interpolation: str | None = None
    drop_path: float = 0.0  # stochastic depth on the (frozen) backbone's blocks while training, timm's linear rule
    eval_first: bool = False  # evaluate after epochs 0, N, 2N, ... (epoch % eval_every == 0) and the last: timm loops
    eval_last: int = 0  # also evaluate after each of the schedule's last N epochs (SNELL's, SPT's loops: N = 10)
    report: str = "last"  # best: metrics.top1 is the run's best evaluation (selection on the eval split, flagged)
    head_init: str = "vpt"  # vpt: kaiming-normal fan_out, bias -log(99); trunc-normal: timm's std 0.02, bias 0
    # timm's training regularisers (SSF / GPS on FGVC: peftbench.train.regularise); 0: off
    mixup: float = 0.0  # mixup's Beta(α, α)
    cutmix: float = 0.0  # CutMix's Beta(α, α)
    mixup_prob: float = 1.0  # the chance a batch is mixed (when mixup or cutmix is on)
    mixup_switch_prob: float = 0.5  # the chance a mixed batch uses CutMix (when both are on)
    random_erasing: float = 0.0  # the chance an image gets one box of normal noise (timm's mode "pixel")
    ema_decay: float = 0.0  # > 0: a model EMA of the trained tensors, evaluated (and saved) in place of the model
    augment: str | None = None  # the training augmentation instead of the task's (peftbench.data.transforms)
    # what DA-VPT's loop does (docs/protocols.md §5-§7); absent: the defaults
    sampler: str = "shuffle"  # the epochs' order and batches (peftbench.data.samplers): shuffle | class-balanced
    samples_per_class: int = 2  # class-balanced: images of each drawn class in a batch (divides batch_size)
    schedule_per_update: bool = False  # timm-cosine stepped after every update (timm's sched_on_updates), not per epoch
    clip_grad: float = 0.0  # > 0: clip the gradients (after un-scaling fp16's) before each step, as timm's clip_grad
    clip_mode: str = "norm"  # norm: the trained tensors' total L2 norm; value: every element to ±clip_grad
    head_wd: float | None = None  # the weight decay of the head's decayed tensors (None: wd, as every other tensor)

    @property
    def stop(self) -> int:
        """The epoch the run stops at (``epochs`` unless it stops at a rung)."""
        return self.epochs if self.stop_epoch is None else self.stop_epoch


_KINDS = {f.name: f.type for f in fields(HParams)}
# the hyper-parameters a recipe sets (a paper's recipe card, an exported card: peftbench.sweep.paper)
RECIPE_KEYS = tuple(k for k in _KINDS if k not in RUN_POSITION)
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
        if key in ("lr", "wd", "warmup_lr", "min_lr", "label_smoothing", "drop_path", "mixup", "cutmix", "mixup_prob",
                   "mixup_switch_prob", "random_erasing", "ema_decay", "clip_grad"):
            kw[key] = _number(key, value, float)
        elif key in ("epochs", "batch_size", "warmup_epochs", "eval_every", "stop_epoch", "cosine_epochs",
                     "schedule_lag", "eval_last", "samples_per_class"):
            kw[key] = None if value is None and key in ("stop_epoch", "cosine_epochs") else _number(key, value, int)
        elif key == "head_wd":
            kw[key] = None if value is None else _number(key, value, float)
        elif key in ("lr_scaling", "drop_last", "eval_first", "schedule_per_update"):
            if not isinstance(value, bool):
                raise SettingsError(f"hyper-parameter {key}={value!r}{at}: expected true or false")
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
        (h.eval_last >= 0, f"eval_last={h.eval_last}: must not be negative"),
        (h.precision in PRECISIONS, f"precision={h.precision!r}: expected one of {', '.join(PRECISIONS)}"),
        (h.std is None or all(s > 0 for s in h.std), "std: every value must be > 0"),
        (h.stop_epoch is None or 1 <= h.stop_epoch <= h.epochs,
         f"stop_epoch={h.stop_epoch}: must be in 1..epochs ({h.epochs})"),
        (h.schedule in SCHEDULES, f"schedule={h.schedule!r}: expected one of {', '.join(SCHEDULES)}"),
        (h.cosine_epochs is None or h.cosine_epochs >= 1, f"cosine_epochs={h.cosine_epochs}: must be at least 1"),
        (h.schedule_lag in (0, 1), f"schedule_lag={h.schedule_lag}: expected 0 or 1"),
        (h.schedule == "timm-cosine" or (h.cosine_epochs is None and h.schedule_lag == 0),
         "cosine_epochs and schedule_lag belong to schedule timm-cosine"),
        (0 <= h.label_smoothing < 1, f"label_smoothing={h.label_smoothing:g}: must be in [0, 1)"),
        (0 <= h.drop_path < 1, f"drop_path={h.drop_path:g}: must be in [0, 1)"),
        (h.report in REPORTS, f"report={h.report!r}: expected one of {', '.join(REPORTS)}"),
        (h.head_init in HEAD_INITS, f"head_init={h.head_init!r}: expected one of {', '.join(HEAD_INITS)}"),
        (h.mixup >= 0 and h.cutmix >= 0, "mixup and cutmix (Beta α) must not be negative"),
        (0 <= h.mixup_prob <= 1 and 0 <= h.mixup_switch_prob <= 1, "mixup_prob and mixup_switch_prob must be in [0, 1]"),
        (0 <= h.random_erasing <= 1, f"random_erasing={h.random_erasing:g}: must be in [0, 1]"),
        (0 <= h.ema_decay < 1, f"ema_decay={h.ema_decay:g}: must be in [0, 1)"),
        (not (h.mixup or h.cutmix) or (h.drop_last and h.batch_size % 2 == 0),
         "mixup / cutmix need drop_last = true and an even batch_size (timm's Mixup mixes a batch with its reverse; "
         "the official loaders drop the last batch)"),
        (normalise(h.sampler) != "class-balanced" or (h.samples_per_class >= 1
                                                       and h.batch_size % h.samples_per_class == 0),
         f"samples_per_class={h.samples_per_class}: must be at least 1 and divide batch_size ({h.batch_size})"),
        (normalise(h.sampler) != "shuffle" or "samples_per_class" not in hp,
         "samples_per_class belongs to a sampler other than shuffle (class-balanced)"),
        (h.schedule == "timm-cosine" or not h.schedule_per_update, "schedule_per_update belongs to schedule timm-cosine"),
        (not h.schedule_per_update or h.schedule_lag == 0,
         "schedule_per_update steps after every update (lag 0): drop schedule_lag"),
        (h.clip_grad >= 0, f"clip_grad={h.clip_grad:g}: must not be negative"),
        (h.clip_grad > 0 or "clip_mode" not in hp, "clip_mode belongs to clip_grad > 0"),
        (h.clip_mode in CLIP_MODES, f"clip_mode={h.clip_mode!r}: expected one of {', '.join(CLIP_MODES)}"),
        (h.head_wd is None or h.head_wd >= 0, f"head_wd={h.head_wd}: must not be negative"),
        (h.interpolation is None or h.interpolation in INTERPOLATIONS,
         f"interpolation={h.interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}"),
    )
    for ok, msg in checks:
        if not ok:
            raise SettingsError(f"hyper-parameter {msg}{at}")
    from ..errors import UnknownNameError

    if normalise(h.sampler) != "shuffle":
        from ..data.samplers import SAMPLERS

        try:
            SAMPLERS.get(h.sampler)
        except UnknownNameError as exc:
            raise SettingsError(f"hyper-parameter sampler{at}: {exc}") from None
    if h.augment is not None:
        from ..data.transforms import AUGMENT

        try:
            AUGMENT.get(h.augment)
        except UnknownNameError as exc:
            raise SettingsError(f"hyper-parameter augment{at}: {exc}") from None
    return h
