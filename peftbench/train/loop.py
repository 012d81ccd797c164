"""The training loop and its public pieces.

:func:`train` runs one training spec: build the model, load the splits, build the optimiser, resume
from the checkpoint, then per epoch: set the warm-up + cosine lr, train on the epoch's order (the one
batching policy of :mod:`peftbench.data.loader`), evaluate when asked, checkpoint. The bench and the
methods' jobs use the same pieces: :func:`autocast`, :func:`train_step`, :func:`evaluate`,
:func:`features`, :func:`uses_cached_features`; the fused loop (:mod:`peftbench.train.fused`) the pieces of
a run: :func:`run_data`, :func:`make_optimizer`, :func:`resume`, :func:`epoch_lr`, :func:`report_epoch`,
:func:`save_progress`, :func:`save_rung_end`, :func:`run_result`.

Code that wants to follow runs (experiment trackers, progress displays) implements :class:`RunHooks`
and is put into ``Env.hooks``: the engine calls ``run_start`` before a run trains, the loop calls
``epoch`` after every epoch and the engine ``run_end`` with the final record. The loop knows no
tracker: a hook is any object with these methods, and one that raises is reported on stderr and
never fails, stops or loses the run (:func:`call_hooks`).
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..backbones import image_size
from ..data.loader import SplitData, batches, epoch_order, load_split
from ..data.transforms import augmenter
from ..errors import Diverged, StoreError
from ..layers.tuned_vit import TunedViT
from ..methods import Method, get_method
from ..store import RunSpec, RunStore
from ..tasks import Task, get_task
from .build import build_model, copy_into, normalizer_for, parameter_summary, save_trainable
from .env import Env
from .hparams import HParams, parse_hparams
from .optim import build_optimizer, effective_lr, lr_at_epoch, set_lr

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class RunHooks:
    """What code that follows runs may implement (every method is optional to override).

    ``run_start(spec, info)``: the run is about to train (``info``: ``attempt``, ``resume_epoch``, ``device``);
    ``epoch(spec, entry)``: an epoch ended (``entry``: ``epoch``, ``lr``, ``train_loss``, ``eval_top1`` when
    evaluated); ``run_end(spec, record)``: the run's final :class:`~peftbench.store.RunRecord` was written
    (status ok, failed or diverged)."""

    def run_start(self, spec: RunSpec, info: dict) -> None:
        pass

    def epoch(self, spec: RunSpec, entry: dict) -> None:
        pass

    def run_end(self, spec: RunSpec, record) -> None:
        pass


def call_hooks(env: Env, event: str, *args) -> None:
    """Call ``event`` on every hook of ``env``; an exception is reported on stderr and swallowed (a hook
    never fails a run), interrupts (KeyboardInterrupt, SystemExit) go through."""
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


@contextlib.contextmanager
def autocast(device: torch.device, precision: str = "fp32"):
    """The numeric precision of a forward pass: fp32; tf32 (fp32 tensors, TF32 matmuls on CUDA); bf16 or
    fp16 autocast (on CPU too, where torch supports it)."""
    device = torch.device(device)
    if precision in _AUTOCAST_DTYPES:
        with torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision]):
            yield
    elif precision == "tf32" and device.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            with torch.autocast(device.type, enabled=False):
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        with torch.autocast(device.type, enabled=False):
            yield


def train_step(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               optimizer: torch.optim.Optimizer, device: torch.device, precision: str = "fp32",
               scaler: "torch.amp.GradScaler | None" = None) -> torch.Tensor:
    """One optimisation step (loss in fp32 whatever the forward's precision); returns the loss."""
    with autocast(device, precision):
        logits = forward(x)
    loss = F.cross_entropy(logits.float(), y)
    if not torch.isfinite(loss):
        return loss
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
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
    state = {"cpu": torch.get_rng_state()}
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


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
    torch.set_rng_state(ck["rng"]["cpu"])
    if dev.type == "cuda" and "cuda" in ck["rng"]:
        torch.cuda.set_rng_state(ck["rng"]["cuda"], dev)
    info = ck["info"]
    p = Progress(list(info["history"]), int(info["epoch"]) + 1, float(info["train_time"]), int(info["train_images"]),
                 source or info.get("resumed_from"), rng=dict(ck["rng"]))
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
    return dev, task, model, params, load_split(task, Path(spec.data_root), spec.train_split, size), size


def run_data(spec: RunSpec, model: TunedViT, env: Env, precision: str = "fp32") -> RunData:
    """Load the run's splits for ``model`` (on the env's device); a head that trains on features nothing
    trained changes gets them computed once (:func:`uses_cached_features`)."""
    dev = torch.device(env.device)
    task = get_task(spec.task)
    size = image_size(model.backbone)
    train_data = load_split(task, Path(spec.data_root), spec.train_split, size)
    eval_data = load_split(task, Path(spec.data_root), spec.eval_split, size)
    norm = normalizer_for(spec, dev)
    cached = uses_cached_features(get_method(spec.method), task)
    if cached:  # the head sees features that nothing trained changes: compute them once
        return RunData(train_data, eval_data, features(model, train_data, norm, env, precision),
                       features(model, eval_data, norm, env, precision), lambda x: x.to(dev), None, True, size)
    return RunData(train_data, eval_data, train_data.images, eval_data.images, norm, augmenter(task, size), False, size)


def forward_module(model: TunedViT, data: RunData) -> torch.nn.Module:
    """What one training step calls: the head on cached features, else the whole model."""
    return model.head if data.cached else model


def make_optimizer(hp: HParams, model: TunedViT, dev: torch.device):
    """``(peak lr, optimizer, fp16 grad scaler or None)``: base lr × batch/256 unless the protocol gives
    absolute rates (NOAH style)."""
    peak_lr = effective_lr(hp.lr, hp.batch_size) if hp.lr_scaling else hp.lr
    optimizer = build_optimizer(hp.optimizer, model, peak_lr, hp.wd)
    scaler = torch.amp.GradScaler(dev.type) if hp.precision == "fp16" else None
    return peak_lr, optimizer, scaler


def epoch_lr(hp: HParams, peak_lr: float, epoch: int) -> float:
    return lr_at_epoch(epoch, peak_lr, hp.epochs, hp.warmup_epochs, hp.warmup_lr, hp.min_lr)


def evaluates(hp: HParams, epoch: int) -> bool:
    """Whether ``epoch`` ends with an evaluation (the last one the run trains always does)."""
    return epoch == hp.stop - 1 or bool(hp.eval_every and (epoch + 1) % hp.eval_every == 0)


def report_epoch(spec: RunSpec, env: Env, hp: HParams, entry: dict, eta_s: float,
                 on_epoch: Callable[[dict], None] | None = None) -> None:
    """The epoch's progress line, the env's listeners and run hooks, the caller's ``on_epoch``."""
    env.log(f"{env.prefix} {spec.label()} epoch {entry['epoch'] + 1}/{hp.epochs} loss {entry['train_loss']:.4f}"
            + (f" {spec.eval_split} top1 {entry['eval_top1']:.2f}" if "eval_top1" in entry else "")
            + f" | run left {fmt_s(eta_s)}", detail=True)
    for listener in env.epoch_listeners:
        listener(spec, entry)
    call_hooks(env, "epoch", spec, dict(entry))
    if on_epoch is not None:
        on_epoch(entry)


def save_progress(spec: RunSpec, store: RunStore, env: Env, hp: HParams, model: TunedViT, optimizer,
                  dev: torch.device, prog: Progress, epoch: int) -> None:
    """The epoch's checkpoint (unless it is the run's last epoch or the env checkpoints less often)."""
    if epoch != hp.stop - 1 and env.checkpoint_every and (epoch + 1) % env.checkpoint_every == 0:
        store.save_checkpoint(spec, state=model.trainable_state(), optimizer=optimizer.state_dict(),
                              rng=rng_state(dev), info=state_info(spec, epoch, prog))


def save_rung_end(spec: RunSpec, store: RunStore, hp: HParams, model: TunedViT, optimizer, dev: torch.device,
                  prog: Progress) -> None:
    """A run stopped at a rung of successive halving (``hp.stop < hp.epochs``): its end state, which the
    next rung's run of the same trajectory continues from."""
    if hp.stop < hp.epochs:
        store.save_rung_state(spec, state=model.trainable_state(), optimizer=optimizer.state_dict(),
                              rng=rng_state(dev), info=state_info(spec, hp.stop - 1, prog))


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
    return {
        "params": params,
        "hparams_effective": {"lr": peak_lr, "batch_size": hp.batch_size, "epochs": hp.epochs,
                              **({"stop_epoch": hp.stop} if hp.stop < hp.epochs else {})},
        "history": history,
        "metrics": {
            "top1": history[-1]["eval_top1"],
            "eval_split": spec.eval_split,
            "final_train_loss": history[-1]["train_loss"],
            # Extra, flagged: picking an epoch by this number is selection on the eval split.
            "best_epoch_top1": best["eval_top1"],
            "best_epoch": best["epoch"],
            "best_epoch_is_selected_on_eval_split": True,
        },
        "timing": {
            "train_s": round(prog.train_time, 3),
            "train_images_per_s": round(prog.train_images / prog.train_time, 2) if prog.train_time > 0 else None,
            "cached_features": data.cached,
            **peak_memory(dev),
        },
        "image_size": data.size,
        **({"weights": weights.name} if weights is not None else {}),
        "num_train": len(data.train),
        "num_eval": len(data.eval),
        **({"stopped_at_epoch": hp.stop} if hp.stop < hp.epochs else {}),
        **({"resumed_from": prog.resumed_from} if prog.resumed_from else {}),
    }


# ---------------------------------------------------------------------------------------------
# one training run
# ---------------------------------------------------------------------------------------------


def train(spec: RunSpec, store: RunStore, env: Env, on_epoch: Callable[[dict], None] | None = None) -> dict:
    dev = torch.device(env.device)
    hp: HParams = parse_hparams(spec.hparams, where=spec.label())

    model = build_model(spec, env, store)
    if spec.extras.get("save_init"):
        save_trainable(model, store.artifact_path(spec, "init.safetensors"))
    params = parameter_summary(model)
    model.to(dev)
    data = run_data(spec, model, env, hp.precision)
    peak_lr, optimizer, scaler = make_optimizer(hp, model, dev)
    forward = forward_module(model, data)

    prog = resume(spec, store, model, optimizer, dev, env)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    n = len(data.train)
    t_run = time.time()
    stop = hp.stop  # the schedule is that of hp.epochs epochs; a run stopped at a rung trains [0, stop)
    for epoch in range(prog.start_epoch, stop):
        lr = epoch_lr(hp, peak_lr, epoch)
        set_lr(optimizer, lr)
        model.train()
        loss_sum, t_epoch = 0.0, time.time()
        order = epoch_order(spec.seed, epoch, n)
        for s, (x, y, idx) in enumerate(batches(data.train_x, data.train.labels, order, hp.batch_size,
                                                prepare=data.prepare, augment=data.augment, device=dev)):
            loss = train_step(forward, x, y, optimizer, dev, hp.precision, scaler)
            if not torch.isfinite(loss):
                raise Diverged(f"loss became {loss.item()} at epoch {epoch} step {s} (lr {lr:g})")
            loss_sum += loss.item() * len(idx)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        prog.train_time += time.time() - t_epoch
        prog.train_images += n
        entry = {"epoch": epoch, "lr": lr, "train_loss": loss_sum / n}
        if evaluates(hp, epoch):
            entry["eval_top1"] = evaluate(model, forward, data.eval_x, data.eval.labels, data.prepare, env, hp.precision)
        prog.history.append(entry)
        done = epoch - prog.start_epoch + 1
        report_epoch(spec, env, hp, entry, (time.time() - t_run) / done * (stop - epoch - 1), on_epoch)
        save_progress(spec, store, env, hp, model, optimizer, dev, prog, epoch)
        for cb in env.epoch_callbacks:
            cb(spec, epoch)
    save_rung_end(spec, store, hp, model, optimizer, dev, prog)
    return run_result(spec, store, env, hp, model, params, peak_lr, prog, data, dev)
