"""The model every method builds: a frozen (or partly frozen) timm ViT and a classification head."""
from __future__ import annotations

import math

import torch
from torch import nn

# VPT / E^2VPT head init: bias = -log((1 - π) / π) with prior probability π = 0.01 (-4.595)
HEAD_BIAS_INIT = -math.log((1 - 0.01) / 0.01)


def make_head(in_features: int, num_classes: int) -> nn.Linear:
    """Linear(D, C) initialised as the VPT/E^2VPT code does: kaiming-normal (fan_out) weight, prior bias."""
    head = nn.Linear(in_features, num_classes)
    nn.init.kaiming_normal_(head.weight, mode="fan_out")
    nn.init.constant_(head.bias, HEAD_BIAS_INIT)
    return head


class TunedViT(nn.Module):
    """A frozen (or partly frozen) timm ViT + a classification head.

    * ``features(x)``: the CLS token after the final norm (override to insert prompts).
    * ``train_modules``: the modules put in train mode during training. Everything else stays in
      eval mode, so a frozen backbone never runs dropout.
    * ``no_weight_decay``: parameter names excluded from weight decay (the head bias).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad = False
        self.head = head if head is not None else make_head(backbone.num_features, num_classes)
        self.train_modules: list[nn.Module] = [self.head]

    def train_inserted(self, modules) -> "TunedViT":
        """Modules a method inserted into the backbone (frozen with it by ``__init__``): their parameters train, and
        they run in train mode while training (their dropout, DropPath); the rest of the backbone stays frozen and in
        eval mode. Returns the model."""
        for m in modules:
            m.requires_grad_(True)
            self.train_modules.append(m)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> "TunedViT":
        nn.Module.train(self, False)
        if mode:
            for m in self.train_modules:
                nn.Module.train(m, True)
        self.training = mode
        return self

    def no_weight_decay(self) -> set[str]:
        return {"head.bias"}

    # -- per-step hooks: a method whose training does more than minimise the cross entropy (AdaLoRA's rank
    # allocation and orthogonality penalty) overrides them; the loop calls them (docs/architecture.md, "the epoch
    # loop"); a model that overrides any of them is never fused (peftbench.train.fused) ---------------------------
    def start_training(self, total_steps: int) -> None:
        """Called once before the first step (a resumed run too): the schedule's number of optimiser steps."""

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called before epoch ``epoch`` (0-based) of the schedule's ``epochs`` trains (a resumed run: from the epoch
        it resumes at)."""

    def step_loss(self, y: torch.Tensor) -> torch.Tensor | None:
        """A term added to this step's cross entropy, computed after the step's forward (None: nothing); ``y``: the
        step's targets (class indices, or soft targets after mixup / CutMix)."""
        return None

    def after_step(self, step: int) -> None:
        """After optimiser step ``step`` (0-based, counted over the whole run), its gradients still in place."""

    def step_state(self) -> dict[str, torch.Tensor]:
        """What the per-step hooks keep between steps beyond the trained tensors (saved in every checkpoint, so
        that a resumed run continues bit for bit)."""
        return {}

    def load_step_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Restore :meth:`step_state` from a checkpoint (``where`` names it in errors)."""

    def has_step_hooks(self) -> bool:
        """Whether this model's class overrides any per-step hook."""
        return any(getattr(type(self), name) is not getattr(TunedViT, name)
                   for name in ("start_training", "start_epoch", "step_loss", "after_step", "step_state",
                                "load_step_state"))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors (what a checkpoint needs): trainable parameters + buffers of train modules."""
        state = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
        for prefix, module in self.named_modules():
            if any(module is m for m in self.train_modules):
                for n, b in module.named_buffers():
                    state[f"{prefix}.{n}" if prefix else n] = b.detach()
        return state

    def merged(self) -> nn.Module | None:
        """The trained model as a plain timm ViT with its classifier, the method's update folded into the
        backbone's weights (inference at the backbone's own speed, ``peftbench export``), or None when the
        method cannot be merged (it adds non-linear modules or tokens). Its eval-mode logits must equal
        this model's (each merging method has a test).

        By default: a plain copy when this is a TunedViT as built (no subclass, a linear head) whose
        backbone holds only timm's and torch's own modules, i.e. the method trained backbone weights in
        place (linear probe, full fine-tuning, BitFit, partial tuning, LayerNorm tuning)."""
        from .merge import is_plain_timm, plain_vit

        if type(self) is TunedViT and isinstance(self.head, nn.Linear) and is_plain_timm(self.backbone):
            return plain_vit(self.backbone, self.head)
        return None

    def peft_model(self) -> nn.Module | None:
        """This model as a Hugging Face ``peft.PeftModel`` on a plain timm classifier (the head in peft's
        ``modules_to_save``), with this model's eval-mode logits, for ``peftbench export`` (``adapter_config.json`` +
        ``adapter_model.safetensors``, which ``peft.PeftModel.from_pretrained`` loads onto the timm backbone); None
        when the method is not one of peft's tuners (the default)."""
        return None

    def inference_variants(self) -> dict[str, nn.Module]:
        """Cheaper models with this model's eval-mode logits, by name, for ``peftbench bench`` (inference
        rows) and ``peftbench export``: ``merged`` (a plain timm ViT, from :meth:`merged`) and whatever a
        subclass adds (e.g. ``compacted``: pruned prompts physically removed). Each has a logits test."""
        merged = self.merged()
        return {"merged": merged} if merged is not None else {}

    def parameter_counts(self) -> dict[str, int]:
        """trainable (incl. head), trainable_without_head, head, total, tuned (what the papers' Tuned/Total
        counts, incl. head; subclasses lower it, e.g. pruned E^2VPT's soft-masked entries)."""
        head = sum(p.numel() for p in self.head.parameters() if p.requires_grad)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {
            "trainable": trainable,
            "trainable_without_head": trainable - head,
            "head": head,
            "total": total,
            "tuned": trainable,
        }
