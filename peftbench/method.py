"""What a method plugin is: its options, its training recipe and how it turns a backbone into a model.

A plugin is one file in ``methods/`` (or in any package that declares a ``peftbench.methods`` entry
point) with a :class:`Method` subclass decorated by :func:`register_method`::

    @register_method
    class BitFit(Method):
        name = "bitfit"
        description = "biases of the backbone + head"
        recipe = FULL_FT_RECIPE

        def build(self, backbone, num_classes, opts):
            model = PeftModel(backbone, num_classes)
            for n, p in backbone.named_parameters():
                p.requires_grad = n.endswith("bias")
            return model

The engine never asks which method it runs: it builds the model, trains whatever ``requires_grad``
says, keeps every module except ``model.train_modules`` in eval mode, and counts parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Generator, Iterable

import torch
from torch import nn

from .registry import Registry, import_builtin, load_entry_points

# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """A method option: ``--set <method>.<name>=<value>`` (or ``--set <name>=<value>``).

    Values are converted to ``type`` (default: the type of ``default``); ``keywords`` are literal
    values accepted as they are (e.g. ``"auto"`` for a per-task value)."""

    default: Any
    help: str
    choices: tuple | None = None
    type: type | None = None
    keywords: tuple[str, ...] = ()

    def parse(self, name: str, raw: Any) -> Any:
        """Convert a command-line string (or a value from a file) to the option's type."""
        if raw in self.keywords:
            return raw
        kind = self.type or type(self.default)
        value = raw
        try:
            if isinstance(raw, str):
                if kind is bool:
                    low = raw.strip().lower()
                    if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError(raw)
                    value = low in ("1", "true", "yes", "on")
                elif kind in (int, float):
                    value = kind(raw)
                elif kind is not str:
                    value = _auto(raw)
            elif kind in (int, float) and not isinstance(raw, bool):
                value = kind(raw)
        except (TypeError, ValueError):
            allowed = f" or one of {', '.join(self.keywords)}" if self.keywords else ""
            raise OptionError(f"option {name!r}: cannot read {raw!r} as {kind.__name__}{allowed}") from None
        if self.choices is not None and value not in self.choices:
            raise OptionError(f"option {name!r}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        return value


def _auto(raw: str) -> Any:
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw


class OptionError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# Training recipes (the optimisation defaults of the VPT protocol, spec §2.4 and §4)
# ---------------------------------------------------------------------------------------------

VPT_LR_GRID = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
VPT_WD_GRID = (0.01, 0.001, 0.0001, 0.0)
FULL_FT_LR_GRID = (0.001, 0.0001, 0.0005, 0.005)


@dataclass(frozen=True)
class Recipe:
    """How a method trains under the VPT protocol. Learning rates are *base* rates: the engine
    multiplies them by ``batch_size / 256`` (spec §2.4)."""

    optimizer: str = "sgd"  # sgd | adamw | vpt-adamw (see peftbench.optim)
    batch_size: int = 64
    epochs: int = 100
    warmup_epochs: int = 10
    lr_grid: tuple[float, ...] = VPT_LR_GRID
    wd_grid: tuple[float, ...] = VPT_WD_GRID
    # demo protocol: fixed hyper-parameters, few epochs (the demo backbone is tiny). Each method's
    # demo_lr was chosen on the demo tasks' val200 splits: results/demo-hparam-search.csv
    # (scripts/demo_hparams.py says how)
    demo_lr: float = 1.0
    demo_wd: float = 0.0001
    demo_epochs: int = 10
    demo_batch_size: int = 64


PROMPT_RECIPE = Recipe()
# demo: 100 epochs, as the real protocol; the head trains on cached features, so they cost next to nothing
LINEAR_RECIPE = Recipe(batch_size=1024, demo_lr=1.0, demo_batch_size=128, demo_epochs=100)
FULL_FT_RECIPE = Recipe(
    optimizer="vpt-adamw", batch_size=384, warmup_epochs=5, lr_grid=FULL_FT_LR_GRID, demo_lr=0.005
)


# ---------------------------------------------------------------------------------------------
# The model a method builds
# ---------------------------------------------------------------------------------------------

HEAD_BIAS_INIT = -math.log((1 - 0.01) / 0.01)  # prior probability 0.01 (spec §2.3): -4.595


def make_head(in_features: int, num_classes: int) -> nn.Linear:
    """Linear(D, C) initialised as the VPT/E^2VPT code does (spec §2.3)."""
    head = nn.Linear(in_features, num_classes)
    nn.init.kaiming_normal_(head.weight, mode="fan_out")
    nn.init.constant_(head.bias, HEAD_BIAS_INIT)
    return head


class PeftModel(nn.Module):
    """A frozen (or partly frozen) timm ViT + a classification head.

    * ``features(x)``: the CLS token after the final norm (override to insert prompts).
    * ``train_modules``: the modules put in train mode during training. Everything else stays in
      eval mode, so a frozen backbone never runs dropout (spec §1, §7.3).
    * ``no_weight_decay``: parameter names excluded from weight decay (the head bias, spec §2.3).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad = False
        self.head = head if head is not None else make_head(backbone.num_features, num_classes)
        self.train_modules: list[nn.Module] = [self.head]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> "PeftModel":
        nn.Module.train(self, False)
        if mode:
            for m in self.train_modules:
                nn.Module.train(m, True)
        self.training = mode
        return self

    def no_weight_decay(self) -> set[str]:
        return {"head.bias"}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors (what a checkpoint needs): trainable parameters + buffers of train modules."""
        state = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
        for prefix, module in self.named_modules():
            if any(module is m for m in self.train_modules):
                for n, b in module.named_buffers():
                    state[f"{prefix}.{n}" if prefix else n] = b.detach()
        return state

    def parameter_counts(self) -> dict[str, int]:
        """Spec §5 counts. Subclasses add keys (e.g. pruned E^2VPT's soft-masked count)."""
        head = sum(p.numel() for p in self.head.parameters() if p.requires_grad)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {
            "trainable": trainable,
            "trainable_without_head": trainable - head,
            "head": head,
            "total": total,
            "tuned": trainable,  # the count the papers' Tuned/Total uses (incl. head)
        }


# ---------------------------------------------------------------------------------------------
# Method plugins
# ---------------------------------------------------------------------------------------------


class Method:
    """Base class of a method plugin. Subclasses set the class attributes and implement ``build``."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    recipe: ClassVar[Recipe] = PROMPT_RECIPE
    # True when the features fed to the head do not depend on anything trained (linear probe,
    # MLP head): the engine may then compute them once and train the head on cached features.
    frozen_features: ClassVar[bool] = False

    def build(self, backbone: nn.Module, num_classes: int, opts: dict[str, Any]) -> PeftModel:
        raise NotImplementedError

    # -- options ----------------------------------------------------------------------------
    def default_options(self) -> dict[str, Any]:
        return {k: o.default for k, o in self.options.items()}

    def parse_options(self, raw: dict[str, Any]) -> dict[str, Any]:
        opts = self.default_options()
        for key, value in raw.items():
            if key not in self.options:
                known = ", ".join(sorted(self.options)) or "none"
                raise OptionError(f"method {self.name!r} has no option {key!r} (its options: {known})")
            opts[key] = self.options[key].parse(key, value)
        return opts

    def resolve_options(self, opts: dict[str, Any], task) -> tuple[dict[str, Any], dict[str, str]]:
        """Per-task option values (e.g. released prompt lengths) and where each value came from."""
        return dict(opts), {}

    # -- protocol hooks -----------------------------------------------------------------------
    def pipeline(self, ctx, protocol) -> Generator[list, list, None]:
        """The stages of this method under ``protocol``; by default the protocol's own pipeline."""
        return protocol.pipeline(ctx)

    def run_job(self, job: str, spec, store, env) -> dict:
        """Non-training jobs a custom pipeline schedules (e.g. importance scores). Returns the fields
        to merge into the run record; artifacts go to ``store.artifact_path(spec, name)``."""
        raise NotImplementedError(f"method {self.name!r} has no job {job!r}")

    def __repr__(self) -> str:
        return f"<method {self.name}>"


def _load_methods() -> None:
    import_builtin("peftbench.methods")
    load_entry_points("peftbench.methods", _register_object)


METHODS: Registry[Method] = Registry("method", loader=_load_methods)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register one instance of a :class:`Method` subclass under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    METHODS.add(cls.name, cls(), cls.aliases)
    return cls


def _register_object(obj: object) -> None:
    if isinstance(obj, type) and issubclass(obj, Method):
        if obj.name not in METHODS._display.values():  # a module that registered it already
            register_method(obj)
    elif isinstance(obj, Method):
        METHODS.add(obj.name, obj, obj.aliases)
    else:
        raise TypeError(f"a peftbench.methods entry point must name a module or a Method subclass, got {obj!r}")


def get_method(name: str) -> Method:
    return METHODS.get(name)


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def freeze(params: Iterable[nn.Parameter]) -> None:
    for p in params:
        p.requires_grad = False
