"""One training loop for every method.

``execute(spec, store, env)`` runs one :class:`~peftbench.store.RunSpec` and writes its record:
build the backbone and the method's model, train what ``requires_grad`` says with the recipe's
optimiser and the per-epoch warm-up + cosine schedule, evaluate the last epoch on the stage's eval
split, checkpoint every epoch (a rerun resumes), record a loss that is not finite as ``diverged``
and any exception as ``failed`` (the sweep goes on).
"""
from __future__ import annotations

import copy
import math
import random
import resource
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import create_backbone, image_size
from .data import SplitData, load_split
from .images import IMAGENET_MEAN, IMAGENET_STD, Normalizer
from .method import PeftModel, get_method
from .optim import build_optimizer, effective_lr, lr_at_epoch, set_lr
from .provenance import now, provenance
from .store import RunSpec, RunStore, atomic_save_torch
from .task import get_task


class Diverged(RuntimeError):
    pass


@dataclass
class Env:
    """Process-wide settings and caches shared by the runs of a sweep."""

    device: str = "cpu"
    amp: bool | None = None  # bf16 autocast; None = on for CUDA
    eval_batch_size: int = 256
    checkpoint_every: int = 1
    quiet: bool = False
    prefix: str = ""  # progress prefix, e.g. "[run 3/12]"
    # called after every finished epoch with (spec, epoch); tests use it to interrupt a run
    epoch_callbacks: list[Callable[[RunSpec, int], None]] = field(default_factory=list)
    _backbones: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.amp is None:
            self.amp = torch.device(self.device).type == "cuda"

    def backbone(self, spec: RunSpec) -> torch.nn.Module:
        """A fresh copy of the pretrained backbone (loaded once per process)."""
        key = (spec.backbone, spec.checkpoint)
        if key not in self._backbones:
            self._backbones.clear()
            # own RNG: the caller's seeded state is not consumed (a run's init must not depend on whether
            # the backbone was cached), and a backbone without pretrained weights is the same every time
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self._backbones[key] = create_backbone(spec.backbone, spec.checkpoint)
        return copy.deepcopy(self._backbones[key])

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def normalizer_for(spec: RunSpec, device) -> Normalizer:
    mean = spec.hparams.get("mean", IMAGENET_MEAN)
    std = spec.hparams.get("std", IMAGENET_STD)
    return Normalizer(mean, std, device=device)


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------


def build_model(spec: RunSpec, env: Env, store: RunStore | None = None) -> PeftModel:
    """The method's model on the pretrained backbone, seeded by the run's seed.

    ``extras["init_state"]``: a weights file to load after building. A relative path names a file in
    this run's folder of the store (``<runs-dir>/<method>/<task>/``), e.g. another run's
    ``<key>.final.safetensors``: a pipeline can name it without knowing where the store is."""
    task = get_task(spec.task)
    method = get_method(spec.method)
    seed_everything(spec.seed)
    model = method.build(env.backbone(spec), task.num_classes, dict(spec.options))
    init_state = spec.extras.get("init_state")
    if init_state:
        path = Path(init_state)
        if not path.is_absolute() and store is not None:
            path = store.record_path(spec).parent / path
        load_trainable(model, path)
    return model


def load_trainable(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"{path}: tensors {unknown[:5]} do not exist in the model")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def save_trainable(model: PeftModel, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.trainable_state().items()}, str(tmp))
    tmp.replace(path)


def parameter_summary(model: PeftModel) -> dict:
    counts = model.parameter_counts()
    counts["tuned_total_pct"] = 100.0 * counts["tuned"] / counts["total"]
    return counts


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------


def execute(spec: RunSpec, store: RunStore, env: Env) -> dict:
    """Run ``spec`` unless its record is final; return the record (also written to the store)."""
    old = store.load(spec)
    if old is not None and old.get("status") in ("ok", "diverged"):
        return old
    record = {
        "key": spec.key,
        "spec": spec.to_dict(),
        "status": "running",
        "error": None,
        "started_at": (old or {}).get("started_at") or now(),
        "ended_at": None,
        "attempts": int((old or {}).get("attempts", 0)) + 1,
        "provenance": provenance(env.device),
    }
    for k in ("slurm", "retries"):
        if old and k in old:
            record[k] = old[k]
    store.write(spec, record)
    t0 = time.time()
    try:
        if spec.job == "train":
            result = train(spec, store, env)
        else:
            result = get_method(spec.method).run_job(spec.job, spec, store, env)
        record.update(result)
        record["status"] = result.get("status", "ok")
    except Diverged as exc:
        record["status"] = "diverged"
        record["error"] = str(exc)
    except Exception:  # recorded, the sweep goes on
        record["status"] = "failed"
        record["error"] = traceback.format_exc(limit=20)
    record["ended_at"] = now()
    record["wall_s"] = round(time.time() - t0 + float((old or {}).get("wall_s") or 0.0), 3)
    store.write(spec, record)
    if record["status"] != "running":
        ckpt = store.checkpoint_path(spec)
        if ckpt.exists():
            ckpt.unlink()
    return record


def _device(env: Env) -> torch.device:
    return torch.device(env.device)


def _autocast(env: Env):
    dev = _device(env)
    if env.amp and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(dev.type, enabled=False)


def _peak_memory(dev: torch.device) -> dict:
    if dev.type == "cuda":
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1),
                "memory_kind": "cuda_max_allocated"}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_mb": round(rss_kb / 1024, 1), "memory_kind": "process_peak_rss"}


def train(spec: RunSpec, store: RunStore, env: Env) -> dict:
    dev = _device(env)
    task = get_task(spec.task)
    method = get_method(spec.method)
    hp = spec.hparams
    data_root = Path(spec.data_root)

    model = build_model(spec, env, store)
    if spec.extras.get("save_init"):
        save_trainable(model, store.artifact_path(spec, "init.safetensors"))
    params = parameter_summary(model)
    model.to(dev)
    size = image_size(model.backbone)
    train_data = load_split(task, data_root, spec.train_split, size)
    eval_data = load_split(task, data_root, spec.eval_split, size)
    norm = normalizer_for(spec, dev)

    epochs = int(hp["epochs"])
    batch = int(hp["batch_size"])
    # base lr × batch/256 (spec §2.4) unless the protocol gives absolute rates (NOAH style)
    peak_lr = effective_lr(float(hp["lr"]), batch) if hp.get("lr_scaling", True) else float(hp["lr"])
    optimizer = build_optimizer(hp.get("optimizer", "sgd"), model, peak_lr, float(hp["wd"]))
    eval_every = int(hp.get("eval_every", 0))

    # Methods whose head sees features that nothing trained changes: compute them once.
    cached = method.frozen_features and task.augment is None
    if cached:
        feats_train = _features(model, train_data, norm, env)
        feats_eval = _features(model, eval_data, norm, env)
        forward = model.head
        train_x, eval_x = feats_train, feats_eval
    else:
        forward = model
        train_x, eval_x = train_data.images, eval_data.images
    prepare = (lambda x: x.to(dev)) if cached else norm
    augment = _augmenter(task.augment, size)

    history: list[dict] = []
    start_epoch = 0
    train_time = 0.0
    train_images = 0
    ckpt_path = store.checkpoint_path(spec)
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        own = dict(model.named_parameters()) | dict(model.named_buffers())
        with torch.no_grad():
            for k, v in ck["state"].items():
                own[k].copy_(v)
        optimizer.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        history = ck["history"]
        start_epoch = ck["epoch"] + 1
        train_time, train_images = ck["train_time"], ck["train_images"]
        env.log(f"{env.prefix} resuming {spec.label()} after epoch {start_epoch}")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    n = len(train_data)
    steps = math.ceil(n / batch)
    t_run = time.time()
    for epoch in range(start_epoch, epochs):
        lr = lr_at_epoch(epoch, peak_lr, epochs, int(hp.get("warmup_epochs", 0)),
                         float(hp.get("warmup_lr", 0.0)), float(hp.get("min_lr", 0.0)))
        set_lr(optimizer, lr)
        model.train()
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch)  # order independent of resumes
        order = torch.randperm(n, generator=gen)
        loss_sum, t_epoch = 0.0, time.time()
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            batch_x = _gather(train_x, idx)
            x = prepare(augment(batch_x) if augment else batch_x)
            y = train_data.labels[idx].to(dev)
            with _autocast(env):
                logits = forward(x)
            loss = F.cross_entropy(logits.float(), y)
            if not torch.isfinite(loss):
                raise Diverged(f"loss became {loss.item()} at epoch {epoch} step {s} (lr {lr:g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        train_time += time.time() - t_epoch
        train_images += n
        entry = {"epoch": epoch, "lr": lr, "train_loss": loss_sum / n}
        last = epoch == epochs - 1
        if last or (eval_every and (epoch + 1) % eval_every == 0):
            entry["eval_top1"] = evaluate(model, forward, eval_x, eval_data.labels, prepare, env)
        history.append(entry)
        done = epoch - start_epoch + 1
        eta = (time.time() - t_run) / done * (epochs - epoch - 1)
        env.log(f"{env.prefix} {spec.label()} epoch {epoch + 1}/{epochs} loss {entry['train_loss']:.4f}"
                + (f" {spec.eval_split} top1 {entry['eval_top1']:.2f}" if "eval_top1" in entry else "")
                + f" | run left {_fmt_s(eta)}")
        if not last and env.checkpoint_every and (epoch + 1) % env.checkpoint_every == 0:
            atomic_save_torch({"epoch": epoch, "state": {k: v.cpu() for k, v in model.trainable_state().items()},
                               "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                               "history": history, "train_time": train_time, "train_images": train_images},
                              ckpt_path)
        for cb in env.epoch_callbacks:
            cb(spec, epoch)

    if spec.extras.get("save_final"):
        save_trainable(model, store.artifact_path(spec, "final.safetensors"))
    final_top1 = history[-1]["eval_top1"]
    evaluated = [h for h in history if "eval_top1" in h]
    best = max(evaluated, key=lambda h: h["eval_top1"])
    metrics = {
        "top1": final_top1,
        "eval_split": spec.eval_split,
        "final_train_loss": history[-1]["train_loss"],
        # Extra, flagged: picking an epoch by this number is selection on the eval split.
        "best_epoch_top1": best["eval_top1"],
        "best_epoch": best["epoch"],
        "best_epoch_is_selected_on_eval_split": True,
    }
    return {
        "params": params,
        "hparams_effective": {"lr": peak_lr, "batch_size": batch, "epochs": epochs},
        "history": history,
        "metrics": metrics,
        "timing": {
            "train_s": round(train_time, 3),
            "train_images_per_s": round(train_images / train_time, 2) if train_time > 0 else None,
            "cached_features": cached,
            **_peak_memory(dev),
        },
        "image_size": size,
        "num_train": n,
        "num_eval": len(eval_data),
    }


def _gather(xs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of ``xs``; numpy's gather is ~5x faster than torch indexing for CPU uint8 images."""
    if xs.device.type == "cpu":
        return torch.from_numpy(xs.numpy()[idx.numpy()])
    return xs[idx.to(xs.device)]


@torch.no_grad()
def _features(model: PeftModel, data: SplitData, norm: Normalizer, env: Env) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(data), env.eval_batch_size):
        with _autocast(env):
            out.append(model.features(norm(data.images[i:i + env.eval_batch_size])).float())
    return torch.cat(out)


@torch.no_grad()
def evaluate(model: PeftModel, forward, xs: torch.Tensor, labels: torch.Tensor, prepare, env: Env) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(labels), env.eval_batch_size):
        with _autocast(env):
            logits = forward(prepare(xs[i:i + env.eval_batch_size]))
        correct += (logits.float().argmax(1).cpu() == labels[i:i + env.eval_batch_size]).sum().item()
    model.train(was_training)
    return 100.0 * correct / len(labels)


def _augmenter(kind: str | None, size: int):
    if kind is None:
        return None
    if kind == "crop-flip":
        from .augment import random_crop_flip

        return lambda x: random_crop_flip(x, size)
    raise ValueError(f"unknown augmentation {kind!r}")


def _fmt_s(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
