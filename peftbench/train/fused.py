"""Fused configurations (``peftbench run --fuse K``, docs/fused.md): up to K runs of one frozen-backbone
method on one task that differ only in lr and wd, trained together in one model.

* :func:`plan_groups` groups a stage's specs: runs fuse when every part of their identity except the
  hyper-parameters in :data:`FUSED_HPARAMS` is equal, their method says it can fuse
  (:attr:`peftbench.methods.Method.fusable`) and they train (``job == "train"``).
* :class:`FusedModel` holds K models of one method whose frozen tensors are *shared* (the first
  model's; each other model's are checked equal, then dropped), and whose trainable tensors stay K
  separate leaves. A step stacks the K leaves (``torch.stack``: differentiable) and runs the first
  model's forward once over the stack with ``torch.func.functional_call`` under ``torch.func.vmap``
  (the frozen tensors and the batch are not mapped): one forward over K × batch. The loss is the sum
  of the K mean losses, so each configuration's gradient is its own loss's gradient; each has its own
  optimiser (its lr, wd, momentum or Adam state: exactly a separate run's, checkpointed as one).
  ``randomness="same"`` draws every dropout mask once for the K configurations, which is what K
  separate runs with the same seed draw, so fused runs equal separate runs with dropout on too.
* the one epoch loop (:func:`peftbench.train.loop.train_group`) trains a group through a :class:`FusedModel`
  and a single run through its counterpart of one model (``SingleStep``): every run writes its own ordinary
  record and checkpoint; a configuration whose loss stops being finite is recorded as diverged and the
  others go on.

:class:`CannotFuse` (raised before any optimisation step) means: train the runs one by one.
"""
from __future__ import annotations

import json
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.tuned_vit import TunedViT
from ..methods import get_method
from ..store import RunSpec
from .env import Env
from .optim import clip_gradients
from .precision import autocast
from .regularise import loss_smoothing

# the hyper-parameters the configurations of one fused group may differ in (they change no shape and
# nothing the forward computes: only what each configuration's optimiser does with its gradient)
FUSED_HPARAMS = ("lr", "wd")

# torch warns once per op without a vmap batching rule (scaled_dot_product_attention on CPU): it then
# loops over the configurations for that op, which is correct
_NO_BATCH_RULE = "There is a performance drop because we have not yet implemented the batching rule"


class CannotFuse(Exception):
    """The runs of a group cannot train as one model; nothing was trained (train them one by one)."""


# ---------------------------------------------------------------------------------------------
# grouping
# ---------------------------------------------------------------------------------------------


def fuse_key(spec: RunSpec) -> str | None:
    """Runs with equal keys can train fused; None for a run that never fuses."""
    if spec.job != "train":
        return None
    try:
        method = get_method(spec.method)
    except Exception:  # an unknown method fails in its own run, with its own message
        return None
    if not method.fusable:
        return None
    ident = {k: getattr(spec, k) for k in RunSpec.IDENTITY}
    ident["hparams"] = {k: v for k, v in spec.hparams.items() if k not in FUSED_HPARAMS}
    ident["method_version"], ident["data_root"] = spec.method_version, spec.data_root
    ident["resume_epoch"] = int((spec.resume_from or {}).get("epoch") or 0)  # halving: rung continuations fuse
    return json.dumps(ident, sort_keys=True, default=str)


def group_indices(specs: list[RunSpec], k: int) -> list[list[int]]:
    """The positions of ``specs`` in fused groups of at most ``k`` (singletons for runs that do not fuse),
    in the order of their first run; ``k <= 1``: every run alone."""
    if k <= 1:
        return [[i] for i in range(len(specs))]
    groups: list[list[int]] = []
    open_groups: dict[str, list[int]] = {}
    for i, spec in enumerate(specs):
        key = fuse_key(spec)
        if key is None:
            groups.append([i])
            continue
        group = open_groups.get(key)
        if group is None or len(group) >= k or any(specs[j].key == spec.key for j in group):
            group = open_groups[key] = []
            groups.append(group)
        group.append(i)
    return groups


def plan_groups(specs: list[RunSpec], k: int) -> list[list[RunSpec]]:
    """A stage's specs as fused groups of at most ``k`` runs (a run that cannot fuse is a group of one)."""
    return [[specs[i] for i in g] for g in group_indices(specs, k)]


# ---------------------------------------------------------------------------------------------
# K models as one
# ---------------------------------------------------------------------------------------------


def _full(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class FusedModel:
    """K models of one method trained as one: frozen tensors shared, trainable tensors per model.

    ``FusedModel(first)`` then :meth:`add` for each other model (its frozen tensors are compared with
    the first model's and replaced by them: they are stored once). ``cached=True``: the step calls the
    heads on cached features (:func:`peftbench.train.loop.uses_cached_features`)."""

    def __init__(self, base: TunedViT, cached: bool = False):
        self.base = base
        self.cached = cached
        self.models: list[TunedViT] = [base]
        self.state_names = list(base.trainable_state())  # per-configuration tensors (names in the model)
        prefix = "head." if cached else ""
        outside = [n for n in self.state_names if not n.startswith(prefix)]
        if outside:
            raise CannotFuse(f"trained tensors outside the module a step calls: {outside[:3]}")
        self.module: nn.Module = base.head if cached else base
        self.local = {n: n[len(prefix):] for n in self.state_names}  # name in self.module
        params = dict(base.named_parameters())
        self.param_names = [n for n in self.state_names if n in params]
        self.buffer_names = [n for n in self.state_names if n not in params]
        self._vmapped = torch.func.vmap(self._call, in_dims=(0, 0, None), randomness="same")
        self._leaves: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [self._own(base)]

    def _own(self, model: TunedViT) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The model's per-configuration tensors (parameters, buffers), in :attr:`state_names` order."""
        return ([model.get_parameter(n) for n in self.param_names], [model.get_buffer(n) for n in self.buffer_names])

    def add(self, model: TunedViT) -> None:
        """Add a configuration's model; its frozen tensors must equal the first model's (CannotFuse)."""
        state = model.trainable_state()
        if list(state) != self.state_names:
            raise CannotFuse("the configurations train different tensors")
        for n, t in state.items():
            ref = self.base.get_parameter(n) if n in self.param_names else self.base.get_buffer(n)
            if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
                raise CannotFuse(f"tensor {n} has another shape, dtype or device in one configuration")
        per_config = set(self.state_names)
        for prefix, module in model.named_modules():
            for kind in ("_parameters", "_buffers"):
                table = getattr(module, kind)
                for name, t in list(table.items()):
                    full = _full(prefix, name)
                    if t is None or full in per_config:
                        continue
                    try:
                        ref = self.base.get_parameter(full) if kind == "_parameters" else self.base.get_buffer(full)
                    except AttributeError:
                        raise CannotFuse(f"{full} exists in one configuration only") from None
                    if ref.shape != t.shape or ref.dtype != t.dtype or ref.device != t.device or not torch.equal(ref, t):
                        raise CannotFuse(f"the frozen tensor {full} differs between the configurations")
                    table[name] = ref  # stored once: the first model's
        self.models.append(model)
        self._leaves.append(self._own(model))

    def __len__(self) -> int:
        return len(self.models)

    # -- the fused forward ------------------------------------------------------------------
    def _call(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.module, (params, buffers), (x,), strict=False)

    def _stacked(self, which: list[int], detach: bool) -> tuple[dict, dict]:
        params, buffers = {}, {}
        for j, n in enumerate(self.param_names):
            ts = [self._leaves[i][0][j] for i in which]
            params[self.local[n]] = torch.stack([t.detach() for t in ts] if detach else ts)
        for j, n in enumerate(self.buffer_names):
            buffers[self.local[n]] = torch.stack([self._leaves[i][1][j] for i in which])
        return params, buffers

    def forward(self, x: torch.Tensor, which: list[int] | None = None, *, detach: bool = False) -> torch.Tensor:
        """(len(which), batch, classes) logits of the models ``which`` (default all) on the same batch.
        The first model's train/eval mode applies to all; in train mode the models' buffers (batch-norm
        statistics) are updated as each model's own forward would."""
        which = list(range(len(self.models))) if which is None else list(which)
        params, buffers = self._stacked(which, detach)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_BATCH_RULE)
            out = self._vmapped(params, buffers, x)
        if buffers and self.module.training:
            with torch.no_grad():
                for j, n in enumerate(self.buffer_names):
                    stacked = buffers[self.local[n]]
                    for row, i in enumerate(which):
                        self._leaves[i][1][j].copy_(stacked[row])
        return out

    def train_step(self, x: torch.Tensor, y: torch.Tensor, optimizers: list, which: list[int], device: torch.device,
                   precision: str = "fp32", scalers: list | None = None, label_smoothing: float = 0.0,
                   clip: tuple[float, str] | None = None) -> list[float]:
        """One optimisation step of the models ``which`` (``optimizers[i]`` is model i's): their losses
        (fp32, as :func:`peftbench.train.loop.train_step` computes them). A model whose loss is not finite
        is not stepped (its caller records it as diverged)."""
        with autocast(device, precision):
            logits = self.forward(x, which)
        smoothing = loss_smoothing(y, label_smoothing)  # none for mixup's soft targets (they carry it)
        losses = [F.cross_entropy(logits[row].float(), y, label_smoothing=smoothing) for row in range(len(which))]
        values = torch.stack([loss.detach() for loss in losses]).tolist()  # one sync for the K losses
        ok = [row for row, v in enumerate(values) if math.isfinite(v)]
        if not ok:
            return values
        for row in ok:
            optimizers[which[row]].zero_grad(set_to_none=True)
        if scalers is not None:
            total = sum(scalers[which[row]].scale(losses[row]) for row in ok)
        else:
            total = sum(losses[row] for row in ok)
        total.backward()
        for row in ok:
            i = which[row]
            if clip is not None:  # each configuration's own tensors, as a separate run clips them
                if scalers is not None:
                    scalers[i].unscale_(optimizers[i])
                clip_gradients(optimizers[i], *clip)
            if scalers is not None:
                scalers[i].step(optimizers[i])
                scalers[i].update()
            else:
                optimizers[i].step()
        return values

    @torch.no_grad()
    def evaluate(self, xs: torch.Tensor, labels: torch.Tensor, prepare, env: Env, which: list[int],
                 precision: str = "fp32") -> list[float]:
        """Top-1 (%) of the models ``which`` on ``xs``, as :func:`peftbench.train.loop.evaluate` (eval mode;
        batches of ``env.eval_batch_size // len(which)`` images, so one pass holds as many as a run's)."""
        was_training = self.base.training
        self.base.eval()
        dev = torch.device(env.device)
        bs = max(1, env.eval_batch_size // len(which))
        correct = torch.zeros(len(which), dtype=torch.long)
        for i in range(0, len(labels), bs):
            with autocast(dev, precision):
                logits = self.forward(prepare(xs[i:i + bs]), which, detach=True)
            correct += (logits.float().argmax(-1).cpu() == labels[i:i + bs]).sum(1)
        self.base.train(was_training)
        return [100.0 * c / len(labels) for c in correct.tolist()]
