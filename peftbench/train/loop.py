"""The training loop and its public pieces.

:func:`train` runs one training spec: build the model, load the splits, build the optimiser, resume
from the checkpoint, then per epoch: set the warm-up + cosine lr, train on the epoch's order (the one
batching policy of :mod:`peftbench.data.loader`), evaluate when asked, checkpoint. The bench and the
methods' jobs use the same pieces: :func:`autocast`, :func:`train_step`, :func:`evaluate`,
:func:`features`, :func:`uses_cached_features`; the fused loop (:mod:`peftbench.train.fused`) the pieces of
a run: :func:`run_data`, :func:`make_optimizer`, :func:`resume`, :func:`epoch_lr`, :func:`report_epoch`,
:func:`save_progress`, :func:`save_rung_end`, :func:`run_result`.

Code that wants to follow runs (experiment trackers, progress displays, a test that stops a run) implements
:class:`RunHooks` (or wraps a function in :class:`OnEpoch`) and is put into ``Env.hooks``: the one way to
hear about a run. The engine calls ``run_start`` before a run trains, the loop calls ``epoch`` after every
epoch (after its checkpoint) and the engine ``run_end`` with the final record. The loop knows no tracker.
One rule for an exception in a hook (:func:`call_hooks`): an ``Exception`` is reported on stderr and never
fails, stops or loses the run; an interrupt (``KeyboardInterrupt``, ``SystemExit``, any other
``BaseException``) goes through, as it would anywhere else.
"""
from __future__ import annotations

import contextlib
import math
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import image_size
from ..data.loader import SplitData, batches, load_split
from ..data.samplers import SAMPLERS, sampler_order
from ..data.transforms import augmenter, pipeline
from ..errors import Diverged, StoreError
from ..layers.tuned_vit import TunedViT
from ..methods import Method, get_method
from ..store import RunSpec, RunStore
from ..tasks import Task, get_task
from .build import build_model, copy_into, mean_std, normalizer_for, parameter_summary, save_trainable
from .env import Env
from .fused import FUSED_HPARAMS, CannotFuse, FusedModel, fuse_key
from .hparams import HParams, parse_hparams
from .optim import build_optimizer, clip_gradients, effective_lr, lr_at_epoch, lr_at_update, set_lr
from .precision import autocast
from .regularise import TrainableEMA, batch_regulariser, loss_smoothing

STEP_EVENT_S = 1.0  # the least time between two ``step`` events of a run (progress within an epoch)


class RunHooks:
    """What code that follows runs may implement (every method is optional to override).

    ``run_start(spec, info)``: the run is about to train (``info``: ``attempt``, ``resume_epoch``, ``device``);
    ``step(spec, where)``: progress within an epoch, at most once a second (``where``: ``epoch``, ``step``, the steps
    done in it, and ``steps``, the epoch's); ``epoch(spec, entry)``: an epoch ended (``entry``: ``epoch``, ``lr``,
    ``train_loss``, ``eval_top1`` when evaluated); ``run_end(spec, record)``: the run's final
    :class:`~peftbench.store.RunRecord` was written (status ok, failed or diverged)."""

    def run_start(self, spec: RunSpec, info: dict) -> None:
        pass

    def step(self, spec: RunSpec, where: dict) -> None:
        pass

    def epoch(self, spec: RunSpec, entry: dict) -> None:
        pass

    def run_end(self, spec: RunSpec, record) -> None:
        pass


class OnEpoch(RunHooks):
    """A run hook from a function of ``(spec, history entry)`` called after every epoch."""

    def __init__(self, fn: Callable[[RunSpec, dict], None]):
        self.fn = fn

    def epoch(self, spec: RunSpec, entry: dict) -> None:
        self.fn(spec, entry)


def call_hooks(env: Env, event: str, *args) -> None:
    """Call ``event`` on every hook of ``env``; an ``Exception`` is reported on stderr and swallowed (a hook
    never fails a run); any other ``BaseException`` (an interrupt) goes through."""
    for hook in env.hooks:
        fn = getattr(hook, event, None)
        if fn is None:
            continue
        try:
            fn(*args)
        except Exception as exc:  # a hook's failure is never the run's
            print(f"peftbench: warning: run hook {type(hook).__name__}.{event} failed ({type(exc).__name__}: {exc}); "
                  "the run goes on", file=sys.stderr, flush=True)


def uses_cached_features(method: Method, task: Task) -> bool:
    """Whether the head trains on features computed once: nothing trained changes them and the task
    does not augment its training images."""
    return method.frozen_features and task.augment is None


def train_step(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               optimizer: torch.optim.Optimizer, device: torch.device, precision: str = "fp32",
               scaler: "torch.amp.GradScaler | None" = None, label_smoothing: float = 0.0,
               extra_loss: Callable[[torch.Tensor], "torch.Tensor | None"] | None = None,
               clip: tuple[float, str] | None = None) -> torch.Tensor:
    """One optimisation step (loss in fp32 whatever the forward's precision); returns the loss: the cross entropy,
    plus what ``extra_loss(y)`` returns after the forward (a method's own term, :meth:`TunedViT.step_loss`, computed
    under the same autocast as the forward). ``clip``: ``(clip_grad, clip_mode)``, applied to the un-scaled
    gradients before the step (:func:`~peftbench.train.optim.clip_gradients`)."""
    with autocast(device, precision):
        logits = forward(x)
        extra = extra_loss(y) if extra_loss is not None else None
    loss = F.cross_entropy(logits.float(), y, label_smoothing=loss_smoothing(y, label_smoothing))
    if extra is not None:
        loss = loss + extra.float()
    if not torch.isfinite(loss):
        return loss
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip is not None:
            scaler.unscale_(optimizer)
            clip_gradients(optimizer, *clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip is not None:
            clip_gradients(optimizer, *clip)
        optimizer.step()
    return loss


@torch.no_grad()
def features(model: TunedViT, data: SplitData, norm, env: Env, precision: str = "fp32") -> torch.Tensor:
    model.eval()
    out = []
    dev = torch.device(env.device)
    for i in range(0, len(data), env.eval_batch_size):
        with autocast(dev, precision):
            out.append(model.features(norm(data.images[i:i + env.eval_batch_size])).float())
    return torch.cat(out)


@torch.no_grad()
def evaluate(model: TunedViT, forward, xs: torch.Tensor, labels: torch.Tensor, prepare, env: Env,
             precision: str = "fp32") -> float:
    was_training = model.training
    model.eval()
    correct = 0
    dev = torch.device(env.device)
    for i in range(0, len(labels), env.eval_batch_size):
        with autocast(dev, precision):
            logits = forward(prepare(xs[i:i + env.eval_batch_size]))
        correct += (logits.float().argmax(1).cpu() == labels[i:i + env.eval_batch_size]).sum().item()
    model.train(was_training)
    return 100.0 * correct / len(labels)


def peak_memory(dev: torch.device) -> dict:
    if dev.type == "cuda":
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1),
                "memory_kind": "cuda_max_allocated"}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_mb": round(rss_kb / 1024, 1), "memory_kind": "process_peak_rss"}


def fmt_s(s: float) -> str:
    """Seconds as h:mm:ss."""
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------------
# the pieces of a run (train() below, and the fused loop of peftbench.train.fused)
# ---------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """What a checkpoint restores: the history so far and the time spent (and the RNG it restored)."""

    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    train_time: float = 0.0
    train_images: int = 0
    resumed_from: dict | None = None  # the rung run this run continues ({"key", "epoch"})
    rng: dict | None = None  # the RNG state the checkpoint restored (None: not resumed)
    extra: dict = field(default_factory=dict)  # the checkpoint's other tensors (a model EMA's averages)


@dataclass
class RunData:
    """A run's data as the loop feeds it: the splits, the tensors batched from (images, or the features
    computed once when the method allows), how a batch is prepared and augmented."""

    train: SplitData
    eval: SplitData
    train_x: torch.Tensor
    eval_x: torch.Tensor
    prepare: Callable
    augment: Callable | None
    cached: bool
    size: int


def rng_state(dev: torch.device) -> dict[str, torch.Tensor]:
    """torch's generators, and numpy's and Python's global ones (timm's mixup and random erasing draw from them)."""
    state = {"cpu": torch.get_rng_state()}
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    state["numpy_pos"] = torch.tensor([float(pos), float(has_gauss), float(gauss)], dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    state["python"] = torch.tensor(internal, dtype=torch.int64)
    state["python_gauss"] = torch.tensor([float(version), float(gauss_next is not None), gauss_next or 0.0],
                                         dtype=torch.float64)
    return state


def set_rng_state(rng: dict[str, torch.Tensor], dev: torch.device) -> None:
    """Restore :func:`rng_state` (checkpoints written before numpy's and Python's were kept restore torch's)."""
    torch.set_rng_state(rng["cpu"])
    if dev.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], dev)
    if "numpy" in rng:
        pos, has_gauss, gauss = rng["numpy_pos"].tolist()
        np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    if "python" in rng:
        version, has_next, nxt = rng["python_gauss"].tolist()
        random.setstate((int(version), tuple(int(v) for v in rng["python"].tolist()), nxt if has_next else None))


def resume(spec: RunSpec, store: RunStore, model: TunedViT, optimizer, dev: torch.device, env: Env) -> Progress:
    """Where the run starts, restored into ``model`` / ``optimizer`` (trainable tensors, optimizer, RNG): its
    own checkpoint (an interrupted attempt), else the end state of the rung run it continues
    (``spec.resume_from``, successive halving), else epoch 0 (a fresh :class:`Progress`)."""
    ck, where = store.load_checkpoint(spec), store.checkpoint_path(spec)
    source = None
    if ck is None and spec.resume_from:
        key = str(spec.resume_from.get("key") or "")
        where = store.rung_state_path(spec, key)
        ck = store.load_rung_state(spec, key)
        if ck is None:
            env.log(f"{env.prefix} {spec.label()}: the end state of rung run {key} is gone ({where}); training "
                    "from epoch 0 (the same result, more compute)")
            return Progress()
        trajectory = ck["info"].get("trajectory")
        if trajectory != spec.trajectory_key:
            raise StoreError(f"{where}: the end state of another training run (trajectory {trajectory}), not an "
                             f"earlier part of {spec.label()} (trajectory {spec.trajectory_key}); delete it to "
                             "train this run from epoch 0")
        source = {"key": key, "epoch": int(ck["info"]["epoch"]) + 1}
    if ck is None:
        return Progress()
    copy_into(model, ck["state"], str(where))
    optimizer.load_state_dict(ck["optimizer"])
    set_rng_state(ck["rng"], dev)
    info = ck["info"]
    p = Progress(list(info["history"]), int(info["epoch"]) + 1, float(info["train_time"]), int(info["train_images"]),
                 source or info.get("resumed_from"), rng=dict(ck["rng"]), extra=dict(ck.get("extra") or {}))
    if source:
        env.log(f"{env.prefix} {spec.label()}: continuing rung run {source['key']} after epoch {p.start_epoch}")
    else:
        env.log(f"{env.prefix} resuming {spec.label()} after epoch {p.start_epoch}")
    if p.start_epoch >= spec_stop(spec):
        raise StoreError(f"{spec.label()}: starts after epoch {p.start_epoch} but stops at epoch {spec_stop(spec)}")
    return p


def spec_stop(spec: RunSpec) -> int:
    """The epoch the run stops at: ``hparams.stop_epoch`` for a rung run of successive halving, else its
    schedule's ``epochs``."""
    hp = spec.hparams
    return int(hp.get("stop_epoch") or hp["epochs"])


def state_info(spec: RunSpec, epoch: int, prog: Progress) -> dict:
    info = {"epoch": epoch, "history": prog.history, "train_time": prog.train_time, "train_images": prog.train_images,
            "trajectory": spec.trajectory_key}
    if prog.resumed_from:
        info["resumed_from"] = prog.resumed_from
    return info


def job_inputs(spec: RunSpec, store: RunStore, env: Env):
    """What a method's job (a pass over the training split before any training: E^2VPT's importance
    scores, GPS's gradients, SPT's sensitivity) starts from: ``(device, task, model on the device, its
    parameter summary, the training split, the image size)``."""
    dev = torch.device(env.device)
    task = get_task(spec.task)
    model = build_model(spec, env, store)
    params = parameter_summary(model)
    model.to(dev)
    size = image_size(model.backbone)
    return dev, task, model, params, load_split(task, Path(spec.data_root), spec.train_split, size,
                                                spec.hparams.get("interpolation")), size


def run_data(spec: RunSpec, model: TunedViT, env: Env, precision: str = "fp32") -> RunData:
    """Load the run's splits for ``model`` (on the env's device); a head that trains on features nothing
    trained changes gets them computed once (:func:`uses_cached_features`)."""
    dev = torch.device(env.device)
    task = get_task(spec.task)
    size = image_size(model.backbone)
    interpolation = spec.hparams.get("interpolation")
    train_data = load_split(task, Path(spec.data_root), spec.train_split, size, interpolation)
    eval_data = load_split(task, Path(spec.data_root), spec.eval_split, size, interpolation)
    norm = normalizer_for(spec, dev)
    # (stochastic depth, another augmentation, mixing or erasing make what the head sees random while training:
    # nothing to cache then)
    cached = uses_cached_features(get_method(spec.method), task) and not any(
        spec.hparams.get(k) for k in ("drop_path", "augment", "mixup", "cutmix", "random_erasing"))
    if cached:  # the head sees features that nothing trained changes: compute them once
        return RunData(train_data, eval_data, features(model, train_data, norm, env, precision),
                       features(model, eval_data, norm, env, precision), lambda x: x.to(dev), None, True, size)
    return RunData(train_data, eval_data, train_data.images, eval_data.images, norm,
                   augmenter(task, size, spec.hparams.get("augment")), False, size)


def forward_module(model: TunedViT, data: RunData) -> torch.nn.Module:
    """What one training step calls: the head on cached features, else the whole model."""
    return model.head if data.cached else model


def make_optimizer(hp: HParams, model: TunedViT, dev: torch.device):
    """``(peak lr, optimizer, fp16 grad scaler or None)``: base lr × batch/256 unless the protocol gives
    absolute rates (NOAH style)."""
    peak_lr = effective_lr(hp.lr, hp.batch_size) if hp.lr_scaling else hp.lr
    optimizer = build_optimizer(hp.optimizer, model, peak_lr, hp.wd, hp.head_wd)
    scaler = torch.amp.GradScaler(dev.type) if hp.precision == "fp16" else None
    return peak_lr, optimizer, scaler


def epoch_lr(hp: HParams, peak_lr: float, epoch: int, steps_per_epoch: int = 1) -> float:
    """The lr of the epoch's first update (every update's, unless the schedule is stepped per update)."""
    if hp.schedule_per_update:
        return update_lr(hp, peak_lr, epoch * steps_per_epoch, steps_per_epoch)
    return lr_at_epoch(epoch, peak_lr, hp.epochs, hp.warmup_epochs, hp.warmup_lr, hp.min_lr, hp.schedule,
                       hp.cosine_epochs, hp.schedule_lag)


def update_lr(hp: HParams, peak_lr: float, update: int, steps_per_epoch: int) -> float:
    """The lr of update ``update`` (0-based over the run) of a schedule stepped per update."""
    return lr_at_update(update, steps_per_epoch, peak_lr, hp.epochs, hp.warmup_epochs, hp.warmup_lr, hp.min_lr,
                        hp.cosine_epochs)


def clip_of(hp: HParams) -> tuple[float, str] | None:
    """What :func:`train_step` clips: ``(clip_grad, clip_mode)``, or None."""
    return (hp.clip_grad, hp.clip_mode) if hp.clip_grad > 0 else None


def evaluates(hp: HParams, epoch: int) -> bool:
    """Whether ``epoch`` ends with an evaluation (the last one the run trains always does): after every
    ``eval_every``-th epoch, or (``eval_first``, a timm loop's ``epoch % N == 0``) after epochs 0, N, 2N...; and after
    each of the schedule's last ``eval_last`` epochs."""
    if epoch == hp.stop - 1 or epoch >= hp.epochs - hp.eval_last:
        return True
    if not hp.eval_every:
        return False
    return (epoch if hp.eval_first else epoch + 1) % hp.eval_every == 0


def report_epoch(spec: RunSpec, env: Env, hp: HParams, entry: dict, eta_s: float) -> None:
    """The epoch's progress line (a detail line: shown by a progress display when verbose)."""
    env.log(f"{env.prefix} {spec.label()} epoch {entry['epoch'] + 1}/{hp.epochs} loss {entry['train_loss']:.4f}"
            + (f" {spec.eval_split} top1 {entry['eval_top1']:.2f}" if "eval_top1" in entry else "")
            + f" | run left {fmt_s(eta_s)}", detail=True)


def _extra(model: TunedViT, ema: "TrainableEMA | None") -> dict:
    """A checkpoint's tensors beside the trained ones: a model EMA's averages, the per-step hooks' state."""
    out = {f"ema/{k}": v for k, v in ema.state().items()} if ema is not None else {}
    out.update({f"step/{k}": v for k, v in model.step_state().items()})
    return out


def save_progress(spec: RunSpec, store: RunStore, env: Env, hp: HParams, model: TunedViT, optimizer,
                  dev: torch.device, prog: Progress, epoch: int, ema: "TrainableEMA | None" = None) -> None:
    """The epoch's checkpoint (unless it is the run's last epoch or the env checkpoints less often)."""
    if epoch != hp.stop - 1 and env.checkpoint_every and (epoch + 1) % env.checkpoint_every == 0:
        store.save_checkpoint(spec, state=model.trainable_state(), optimizer=optimizer.state_dict(),
                              rng=rng_state(dev), info=state_info(spec, epoch, prog), extra=_extra(model, ema))


def save_rung_end(spec: RunSpec, store: RunStore, hp: HParams, model: TunedViT, optimizer, dev: torch.device,
                  prog: Progress, ema: "TrainableEMA | None" = None) -> None:
    """A run stopped at a rung of successive halving (``hp.stop < hp.epochs``): its end state, which the
    next rung's run of the same trajectory continues from."""
    if hp.stop < hp.epochs:
        store.save_rung_state(spec, state=model.trainable_state(), optimizer=optimizer.state_dict(),
                              rng=rng_state(dev), info=state_info(spec, hp.stop - 1, prog), extra=_extra(model, ema))


def run_result(spec: RunSpec, store: RunStore, env: Env, hp: HParams, model: TunedViT, params: dict,
               peak_lr: float, prog: Progress, data: RunData, dev: torch.device) -> dict:
    """What a finished run puts into its record (the final weights are written when asked)."""
    weights = None
    if spec.extras.get("save_final") or env.keeps_weights(spec, get_task(spec.task).splits["final"][1]):
        weights = store.artifact_path(spec, "final.safetensors")
        save_trainable(model, weights)
    history = prog.history
    evaluated = [h for h in history if "eval_top1" in h]
    best = max(evaluated, key=lambda h: h["eval_top1"])
    # report "best" (a paper whose code keeps the best evaluation, e.g. the best test epoch): top1 is that
    # best, flagged, and the last evaluation stays in last_top1
    reported = {"top1": best["eval_top1"], "last_top1": history[-1]["eval_top1"], "reported": "best-epoch"} \
        if hp.report == "best" else {"top1": history[-1]["eval_top1"]}
    return {
        "params": params,
        "hparams_effective": {"lr": peak_lr, "batch_size": hp.batch_size, "epochs": hp.epochs,
                              **({"stop_epoch": hp.stop} if hp.stop < hp.epochs else {})},
        "history": history,
        "metrics": {
            **reported,
            "eval_split": spec.eval_split,
            "final_train_loss": history[-1]["train_loss"],
            # Extra, flagged: picking an epoch by this number is selection on the eval split.
            "best_epoch_top1": best["eval_top1"],
            "best_epoch": best["epoch"],
            "best_epoch_is_selected_on_eval_split": True,
        },
        "timing": {
            "train_s": round(prog.train_time, 3),
            "train_images": prog.train_images,  # images trained on, every epoch (drop_last counts)
            "train_images_per_s": round(prog.train_images / prog.train_time, 2) if prog.train_time > 0 else None,
            "cached_features": data.cached,
            **peak_memory(dev),
        },
        "image_size": data.size,
        "data_pipeline": pipeline(get_task(spec.task), data.size, hp.interpolation, *mean_std(spec),
                                  data_root=spec.data_root, augment=hp.augment),
        **({"weights": weights.name} if weights is not None else {}),
        "num_train": len(data.train),
        "num_eval": len(data.eval),
        **({"stopped_at_epoch": hp.stop} if hp.stop < hp.epochs else {}),
        **({"resumed_from": prog.resumed_from} if prog.resumed_from else {}),
    }


# ---------------------------------------------------------------------------------------------
# the epoch loop: one run, or a fused group of runs (--fuse K), the same code
# ---------------------------------------------------------------------------------------------


class SingleStep:
    """How the loop steps and evaluates one model (the counterpart of :class:`~peftbench.train.fused.FusedModel`,
    which does it for K models at once): the same interface, a group of one."""

    def __init__(self, model: TunedViT, data: RunData):
        self.base = model
        self.models = [model]
        self.forward = forward_module(model, data)

    def train_step(self, x, y, optimizers, which, device, precision="fp32", scalers=None,
                   label_smoothing: float = 0.0, clip: tuple[float, str] | None = None, step: int = 0) -> list[float]:
        """One step; ``step`` (0-based over the run) goes to the model's :meth:`~TunedViT.after_step`."""
        hooks = self.base.has_step_hooks()
        loss = train_step(self.forward, x, y, optimizers[0], device, precision, scalers[0] if scalers else None,
                          label_smoothing, self.base.step_loss if hooks else None, clip)
        value = loss.item()
        if hooks and math.isfinite(value):
            self.base.after_step(step)
        return [value]

    def evaluate(self, xs, labels, prepare, env, which, precision="fp32") -> list[float]:
        return [evaluate(self.base, self.forward, xs, labels, prepare, env, precision)]


@dataclass
class Member:
    """One run of a group: its spec, hyper-parameters, optimiser and progress."""

    spec: RunSpec
    hp: HParams
    params: dict
    peak_lr: float = 0.0
    optimizer: torch.optim.Optimizer | None = None
    scaler: "torch.amp.GradScaler | None" = None
    prog: Progress = field(default_factory=Progress)
    lr: float = 0.0
    loss_sum: float = 0.0
    diverged: Diverged | None = None


def _same_rng(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_group(specs: list[RunSpec], store: RunStore, env: Env,
                on_epoch: Callable[[RunSpec, dict], None] | None = None) -> list[dict | Diverged]:
    """Train ``specs``: one run, or a fused group (:func:`peftbench.train.fused.plan_groups`: runs that differ only
    in lr and wd, trained as one model). The one epoch loop: per epoch the warm-up + cosine lr of each run, the
    epoch's order (one seed: it is part of the fuse key), the batches, a step of every live run, evaluation when
    asked, the progress line, ``on_epoch(spec, entry)`` (the engine keeps the record's wall time), the
    checkpoints, then the run hooks (observers: trackers, progress views; :func:`call_hooks`).

    Returns, per run, what goes into its record, or the :class:`~peftbench.errors.Diverged` that ended it (a
    run of a group whose loss stops being finite ends; its siblings go on). :class:`~peftbench.train.fused.
    CannotFuse` before any step of a group: nothing was trained (train the runs one by one)."""
    fused = len(specs) > 1
    if fused:
        keys = {fuse_key(s) for s in specs}
        if None in keys or len(keys) != 1:
            raise CannotFuse("the runs differ in more than " + " and ".join(FUSED_HPARAMS))
    dev = torch.device(env.device)
    members: list[Member] = []
    stepper: SingleStep | FusedModel | None = None
    data: RunData | None = None
    for spec in specs:
        hp = parse_hparams(spec.hparams, where=spec.label())
        model = build_model(spec, env, store)  # seeded by the run's seed: each run's own initialisation
        if spec.extras.get("save_init"):
            save_trainable(model, store.artifact_path(spec, "init.safetensors"))
        m = Member(spec, hp, parameter_summary(model))
        model.to(dev)
        if stepper is None:
            data = run_data(spec, model, env, hp.precision)
            stepper = FusedModel(model, cached=data.cached) if fused else SingleStep(model, data)
        else:
            stepper.add(model)
        m.peak_lr, m.optimizer, m.scaler = make_optimizer(hp, model, dev)
        members.append(m)
    assert stepper is not None and data is not None
    for m, model in zip(members, stepper.models):
        m.prog = resume(m.spec, store, model, m.optimizer, dev, env)
    first = members[0].prog
    if any(m.prog.start_epoch != first.start_epoch or not _same_rng(m.prog.rng, first.rng) for m in members):
        raise CannotFuse("the runs resume from different epochs or random states")
    hp0 = members[0].hp
    if fused and hp0.ema_decay:
        raise CannotFuse("a model EMA (ema_decay) averages one model's own tensors")
    # the recipe's model EMA (evaluated and saved in place of the model) and batch regularisers (mixup, CutMix,
    # random erasing): peftbench.train.regularise
    ema = TrainableEMA(stepper.models[0], hp0.ema_decay) if hp0.ema_decay else None
    if ema is not None and first.extra:
        ema.load({k[len("ema/"):]: v for k, v in first.extra.items() if k.startswith("ema/")},
                 str(store.checkpoint_path(specs[0])))
    regularise = batch_regulariser(hp0, get_task(specs[0].task).num_classes, dev)
    # the epochs' orders: the sampler's (peftbench.data.samplers), each of n indices
    n = SAMPLERS.get(hp0.sampler).length(len(data.train), hp0.batch_size)
    steps_per_epoch = n // hp0.batch_size if hp0.drop_last else -(-n // hp0.batch_size)
    clip = clip_of(hp0)
    hooked = any(model.has_step_hooks() for model in stepper.models)
    if hooked:
        if fused:
            raise CannotFuse("the method's model has per-step hooks (TunedViT.after_step, step_loss)")
        model0 = stepper.models[0]
        model0.start_training(steps_per_epoch * hp0.epochs)  # (the schedule's steps: a rung run stops earlier)
        state = {k[len("step/"):]: v for k, v in first.extra.items() if k.startswith("step/")}
        if first.start_epoch > 0:
            model0.load_step_state(state, str(store.checkpoint_path(specs[0])))
    scalers = [m.scaler for m in members] if hp0.precision == "fp16" else None
    optimizers = [m.optimizer for m in members]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_run = time.time()
    stepped = False
    for epoch in range(first.start_epoch, hp0.stop):  # (a rung run of successive halving stops early)
        live = [i for i, m in enumerate(members) if m.diverged is None]
        if not live:
            break
        for i in live:
            m = members[i]
            m.lr = epoch_lr(m.hp, m.peak_lr, epoch, steps_per_epoch)
            set_lr(m.optimizer, m.lr)
            m.loss_sum = 0.0
        if hooked:
            stepper.models[0].start_epoch(epoch, hp0.epochs)
        stepper.base.train()
        t_epoch = time.time()
        order = sampler_order(hp0.sampler, data.train.labels, specs[0].seed, epoch, hp0.batch_size,
                              hp0.samples_per_class)
        seen = 0
        t_step_event = time.time()
        for s, (x, y, idx) in enumerate(batches(data.train_x, data.train.labels, order, hp0.batch_size,
                                                prepare=data.prepare, augment=data.augment, device=dev,
                                                drop_last=hp0.drop_last)):
            seen += len(idx)
            if regularise is not None:
                x, y = regularise(x, y)
            if hp0.schedule_per_update and s:
                for i in live:
                    set_lr(members[i].optimizer, update_lr(members[i].hp, members[i].peak_lr,
                                                           epoch * steps_per_epoch + s, steps_per_epoch))
            try:
                if fused:
                    values = stepper.train_step(x, y, optimizers, live, dev, hp0.precision, scalers,
                                                hp0.label_smoothing, clip)
                else:
                    values = stepper.train_step(x, y, optimizers, live, dev, hp0.precision, scalers,
                                                hp0.label_smoothing, clip, step=epoch * steps_per_epoch + s)
                if ema is not None:
                    ema.update()
            except Exception as exc:
                if stepped or not fused:
                    raise
                raise CannotFuse(f"the fused step failed: {type(exc).__name__}: {exc}") from exc
            stepped = True
            for i, v in zip(list(live), values):
                m = members[i]
                if math.isfinite(v):
                    m.loss_sum += v * len(idx)
                else:
                    m.diverged = Diverged(f"loss became {v} at epoch {epoch} step {s} (lr {m.lr:g})")
                    if fused:
                        env.log(f"{env.prefix} {m.spec.label()}: diverged ({m.diverged}); its fused siblings go on")
            live = [i for i in live if members[i].diverged is None]
            if not live:
                break
            if env.hooks and time.time() - t_step_event >= STEP_EVENT_S and s + 1 < steps_per_epoch:
                t_step_event = time.time()
                for i in live:
                    call_hooks(env, "step", members[i].spec, {"epoch": epoch, "step": s + 1, "steps": steps_per_epoch})
        if not live:
            break
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.time() - t_epoch
        entries = {}
        for i in live:
            m = members[i]
            m.prog.train_time += dt
            m.prog.train_images += seen
            entries[i] = {"epoch": epoch, "lr": m.lr, "train_loss": m.loss_sum / max(1, seen)}
        if evaluates(hp0, epoch):
            with ema.applied() if ema is not None else contextlib.nullcontext():  # the EMA is what is evaluated
                tops = stepper.evaluate(data.eval_x, data.eval.labels, data.prepare, env, live, hp0.precision)
            for i, top1 in zip(live, tops):
                entries[i]["eval_top1"] = top1
        eta = (time.time() - t_run) / (epoch - first.start_epoch + 1) * (hp0.stop - epoch - 1)
        for i in live:
            m = members[i]
            m.prog.history.append(entries[i])
            report_epoch(m.spec, env, m.hp, entries[i], eta)
            if on_epoch is not None:
                on_epoch(m.spec, entries[i])
        for i in live:
            m = members[i]
            save_progress(m.spec, store, env, m.hp, stepper.models[i], m.optimizer, dev, m.prog, epoch, ema)
        for i in live:
            call_hooks(env, "epoch", members[i].spec, dict(entries[i]))

    out: list[dict | Diverged] = []
    for i, m in enumerate(members):
        if m.diverged is not None:
            out.append(m.diverged)
            continue
        save_rung_end(m.spec, store, m.hp, stepper.models[i], m.optimizer, dev, m.prog, ema)
        with ema.applied() if ema is not None else contextlib.nullcontext():  # the EMA's weights are the result
            result = run_result(m.spec, store, env, m.hp, stepper.models[i], m.params, m.peak_lr, m.prog, data, dev)
        if fused:
            t = m.prog.train_time
            result["fused"] = {
                "group_size": len(specs),
                "siblings": [s.key for s in specs if s.key != m.spec.key],
                # every configuration's images per second of training time (the group's throughput)
                "configs_images_per_s": round(len(specs) * m.prog.train_images / t, 2) if t > 0 else None,
            }
        out.append(result)
    return out


def train(spec: RunSpec, store: RunStore, env: Env, on_epoch: Callable[[dict], None] | None = None) -> dict:
    """One run (:func:`train_group` of one): what goes into its record; raises the Diverged that ended it."""
    (result,) = train_group([spec], store, env, None if on_epoch is None else (lambda s, entry: on_epoch(entry)))
    if isinstance(result, Diverged):
        raise result
    return result
