"""Building a run's model: seeding, the method's model on a fresh copy of the backbone, the weights a
pipeline hands over (``extras["init_state"]``), parameter counts, input normalisation."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..backbones import normalisation
from ..data.images import IMAGENET_MEAN, IMAGENET_STD, Normalizer
from ..errors import SettingsError
from ..layers.tuned_vit import TunedViT
from ..methods import get_method
from ..store import RunSpec, RunStore
from ..store.checkpoints import write_tensors
from ..tasks import get_task
from .env import Env


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def mean_std(spec: RunSpec) -> tuple:
    """The run's input normalisation: its hyper-parameters' mean/std, else its backbone preset's, else ImageNet's."""
    mean0, std0 = normalisation(spec.backbone) or (IMAGENET_MEAN, IMAGENET_STD)
    return tuple(spec.hparams.get("mean") or mean0), tuple(spec.hparams.get("std") or std0)


def normalizer_for(spec: RunSpec, device) -> Normalizer:
    """:func:`mean_std` as the batch transform."""
    mean, std = mean_std(spec)
    return Normalizer(mean, std, device=device)


def build_model(spec: RunSpec, env: Env, store: RunStore | None = None) -> TunedViT:
    """The method's model on the pretrained backbone, seeded by the run's seed.

    ``extras["init_state"]``: a weights file to load after building. A relative path names a file in
    this run's folder of the store (``<runs-dir>/<method>/<task>/``), e.g. another run's
    ``<key>.final.safetensors``: a pipeline can name it without knowing where the store is."""
    task = get_task(spec.task)
    method = get_method(spec.method)
    seed_everything(spec.seed)
    model = method.build(env.backbone(spec), task.num_classes, dict(spec.options))
    init_head(model, str(spec.hparams.get("head_init", "vpt")))
    add_stochastic_depth(model, float(spec.hparams.get("drop_path") or 0.0))
    init_state = spec.extras.get("init_state")
    if init_state:
        path = Path(init_state)
        if not path.is_absolute() and store is not None:
            path = store.record_path(spec).parent / path
        load_trainable(model, path)
    return model


def init_head(model: TunedViT, kind: str) -> None:
    """The head's initialisation (``HParams.head_init``): ``vpt`` leaves the method's own (the VPT/E^2VPT code's
    kaiming-normal fan_out weight and bias -log(99), :func:`peftbench.layers.tuned_vit.make_head`);
    ``trunc-normal`` is timm's ``reset_classifier`` / ``init_weights_vit_timm`` of the NOAH lineage and SSF:
    weight trunc-normal std 0.02 (cut at ±2), bias 0; ``torch`` is a fresh ``nn.Linear``'s own (kaiming-uniform
    a = √5 weight, bias uniform ±1/√fan_in): timm 0.4-0.6's ``reset_classifier``, which FacT, Convpass and
    RepAdapter call."""
    if kind == "vpt":
        return
    head = model.head
    if not isinstance(head, torch.nn.Linear):
        raise SettingsError(f"head_init={kind!r}: the head of this method is a {type(head).__name__}, not a Linear")
    with torch.no_grad():
        if kind == "torch":
            head.reset_parameters()
        else:
            torch.nn.init.trunc_normal_(head.weight, std=0.02)
            torch.nn.init.zeros_(head.bias)


def add_stochastic_depth(model: TunedViT, rate: float) -> None:
    """``HParams.drop_path``: timm's stochastic depth on the backbone's blocks (block i drops its branches with
    probability rate · i / (depth − 1), :func:`peftbench.layers.timm_parts.add_drop_path`), active while the model
    trains: what the official loops that call ``model.train()`` on a frozen timm ViT do (NOAH, SSF, FacT, SPT...).
    The backbone stays frozen; only these modules join ``train_modules``."""
    if rate <= 0:
        return
    from ..layers.timm_parts import add_drop_path

    if not hasattr(model.backbone, "blocks"):
        raise SettingsError(f"drop_path={rate:g}: the backbone has no timm blocks")
    model.train_modules.extend(add_drop_path(model.backbone, rate))


def copy_into(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``state`` into the model's parameters and buffers of the same names."""
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"{where}: tensors {unknown[:5]} do not exist in the model")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def load_trainable(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    copy_into(model, load_file(str(path)), str(path))


def save_trainable(model: TunedViT, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state().items()}
    write_tensors(path, state, what="the trained tensors")


def parameter_summary(model: TunedViT) -> dict:
    counts = model.parameter_counts()
    counts["tuned_total_pct"] = 100.0 * counts["tuned"] / counts["total"]
    return counts
