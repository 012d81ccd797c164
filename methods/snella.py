"""SNELLA (the SNELL repository's adaptive variant; ssfgunner/SNELL@e9d5185 ``SNELLA`` and ``MixK`` in
model/vision_transformer_timm.py, ``Allocator`` in sparse_allocator.py, ``train_alloc.py``; docs/methods/snella.md):
SNELL's kernelised sparse updates with a learned non-linear kernel mix and a per-matrix sparsity that an allocator
moves during training.

Every adapted matrix (q, k, v, proj, fc1, fc2 of every block, as SNELL) has SNELL's factors A^h, B^h and three scalars
α = 1, γ = 1, β = 0 (trained, no weight decay: 1-d tensors):

    K  = 0.1·‖A⁰_i − B⁰_j‖₂ − 0.1·‖A¹_i − B¹_j‖₂                        (SNELL's kernel, d_in × d_out)
    K' = K + α·softmax(K / γ, over the outputs) + β                       (MixK.pathIntegrals)
    S  = K' ⊙ sg(|K'| ⊙ 1[|K'| > quantile(|K'|, s_m)])                    (variant snella: always, s_m may be 0)
    S  = K'                                                               (variant mixk: dense, no allocator)

and y = W0 x + b0 + DropPath_0.1(Dropout_0.1(x) · S) as SNELL. The allocator (variant snella) keeps, per matrix m,
the EMAs of the sensitivity |p ⊙ ∇p| of its factors (β1 = β2 = 0.85; after every optimiser step) and at the start of
every epoch e sets the budget of non-zero entries V_e = V_T + (V_0 − V_T)·(1 − e/E)³ (V_0 = Σ (1 − s_init)·d_in·d_out,
V_T = Σ (1 − s_target)·d_in·d_out; the epoch is the allocator's step: ``total_step = args.epochs``), shares it among
the matrices by their mean importance × uncertainty, and sets s_m = 1 − V_m / (d_in·d_out).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.errors import StoreError
from peftbench.layers.merge import wrap_module
from peftbench.methods import Method, Option, PerTask, noah_fixed_recipe, register_method

from .snell import TARGETS, KernelDelta, SnellLinear, SnellViT

SETTINGS = Path(__file__).with_name("snella_settings.csv")  # the official SNELLA-32 VTAB scripts' per-task values
SOURCE = "ssfgunner/SNELL@e9d5185 scripts/vtab/snella32/<task>.sh"
# tasks without an official script: the allocator with the median target of the official VTAB scripts (0.2, 0.4, 0.55,
# 0.63, 0.76, 0.8, 0.93 -> 0.63) and their initial 0.01; unpublished, our choice
FALLBACK_VARIANT, FALLBACK_TARGET, FALLBACK_INIT = "snella", 0.63, 0.01


class MixKernelDelta(KernelDelta):
    """SNELLA's (and MixK's) matrix: SNELL's kernel K mixed with α·softmax(K / γ) + β; ``sparsity`` is s_m, which the
    allocator moves; ``dense`` (MixK) skips the sparsification."""

    def __init__(self, d_in: int, d_out: int, rank: int, sparsity: float, dense: bool = False):
        # s_m is a float64 buffer: the trained state (checkpoints, saved weights, exports) carries where the allocator
        # left it, so a reloaded model computes what the trained one did
        self._initial = float(sparsity)
        super().__init__(d_in, d_out, rank, sparsity)
        self.alpha = nn.Parameter(torch.ones(1))
        self.gamma = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.zeros(1))
        self.dense = dense
        self.d_in, self.d_out = d_in, d_out

    @property
    def sparsity(self) -> float:
        s = self.s_m
        return self._initial if s.is_meta else float(s)

    @sparsity.setter
    def sparsity(self, value: float) -> None:
        if "s_m" not in self._buffers:
            self.register_buffer("s_m", torch.tensor(float(value), dtype=torch.float64))
        else:
            with torch.no_grad():
                self.s_m.fill_(float(value))

    def kernel(self) -> torch.Tensor:
        k = super().kernel()
        return k + self.alpha * F.softmax(k / self.gamma, dim=-1) + self.beta

    def update(self) -> torch.Tensor:
        k = self.kernel()
        if self.dense:
            return k
        mag = k.detach().abs()  # (SNELLA sparsifies at s = 0 too: quantile 0 keeps every entry above the least)
        tau = torch.quantile(mag.flatten(), self.sparsity)
        return k * F.threshold(mag, float(tau), 0.0)


class SnellaLinear(SnellLinear):
    Delta = MixKernelDelta


class Allocator:
    """sparse_allocator.py's ``Allocator`` with its ``ipt`` metric, restated (tests/test_snella.py checks it against a
    transcription): EMAs of the factors' sensitivity after every step, the budget and the sparsities at every epoch's
    start. ``deltas``: (name, MixKernelDelta) in the official model's module order."""

    def __init__(self, deltas: list[tuple[str, MixKernelDelta]], target: float, init_warmup: int = 0,
                 final_warmup: int = 0, mask_interval: int = 1, beta1: float = 0.85, beta2: float = 0.85):
        self.deltas = deltas
        self.initial_warmup, self.final_warmup, self.mask_interval = init_warmup, final_warmup, mask_interval
        self.beta1, self.beta2 = beta1, beta2
        self.total_step: int | None = None
        self.max_alloc = [d.d_in * d.d_out for _, d in deltas]
        self.init_nonzero = 0.0
        self.target_nonzero = 0.0
        for _, d in deltas:  # (accumulated as the official loop does, in Python floats)
            self.init_nonzero += (1 - d.sparsity) * d.d_in * d.d_out
            self.target_nonzero += (1 - target) * d.d_in * d.d_out
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def schedule(self, step: int) -> tuple[float, bool]:
        """``schedule_threshold``: the budget of non-zero entries at allocator step ``step`` and whether to mask."""
        total = self.total_step
        assert total is not None
        if step <= self.initial_warmup:
            return self.init_nonzero, False
        if step > total - self.final_warmup:
            return self.target_nonzero, True
        coeff = 1 - (step - self.initial_warmup) / (total - self.final_warmup - self.initial_warmup)
        volume = int(self.target_nonzero + (self.init_nonzero - self.target_nonzero) * (coeff ** 3))
        return volume, step % self.mask_interval == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        """After an optimiser step: |p ⊙ ∇p| of every factor (NaN as 0) into the two EMAs."""
        for name, d in self.deltas:
            for key, p in ((f"{name}.In_Qs", d.a), (f"{name}.Out_Qs", d.b)):
                if key not in self.exp_avg_ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(p)
                    self.exp_avg_unc[key] = torch.zeros_like(p)
                ipt = (p * p.grad).abs()
                ipt = torch.where(torch.isnan(ipt), torch.full_like(ipt, 0), ipt)
                self.exp_avg_ipt[key] = self.beta1 * self.exp_avg_ipt[key] + (1 - self.beta1) * ipt
                self.exp_avg_unc[key] = (self.beta2 * self.exp_avg_unc[key]
                                         + (1 - self.beta2) * (ipt - self.exp_avg_ipt[key]).abs())

    def allocate(self, volumes: torch.Tensor, scores: torch.Tensor, budget: float) -> torch.Tensor:
        """``param_alloc``: the budget shared by score (float32, as the official tensors), capped per matrix, the
        remainder handed out again by score among the matrices below their cap."""
        alloc = torch.min(volumes, (budget * scores).squeeze().int())
        delta = budget - torch.sum(alloc)
        while delta > 0:
            remain = volumes - alloc
            idx = torch.nonzero(remain).squeeze()
            before = alloc.clone()
            alloc[idx] += torch.min((delta * scores[idx] / torch.sum(scores[idx])).squeeze(), remain[idx])
            delta = budget - torch.sum(alloc)
            if torch.equal(alloc, before):  # (float32 rounding can stall the official loop forever: stop instead)
                break
        return alloc.int()

    @torch.no_grad()
    def update(self, step: int) -> None:
        """``update`` at the start of allocator step (epoch) ``step``: mask to the scheduled budget when due."""
        budget, mask = self.schedule(step)
        if not mask:
            return
        scores = []
        for name, _ in self.deltas:
            score = 0
            for key in (f"{name}.In_Qs", f"{name}.Out_Qs"):
                if key in self.exp_avg_ipt:
                    score = score + (self.exp_avg_ipt[key] * self.exp_avg_unc[key]).mean()
            scores.append(score)
        s = torch.tensor([float(v) for v in scores], dtype=torch.float32)
        s = torch.full_like(s, 1 / s.shape[0]) if torch.sum(s) == 0 else s / torch.sum(s)
        alloc = self.allocate(torch.tensor(self.max_alloc, dtype=torch.float32), s, budget).tolist()
        for (_, d), volume in zip(self.deltas, alloc):
            d.sparsity = min(max(1 - float(volume / (d.d_in * d.d_out)), 0), 1)

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"exp_avg_ipt/{k}": v.clone() for k, v in self.exp_avg_ipt.items()}
        out.update({f"exp_avg_unc/{k}": v.clone() for k, v in self.exp_avg_unc.items()})
        return out  # (the sparsities are buffers of the model: in the trained state)

    def load(self, state: dict[str, torch.Tensor], where: str) -> None:
        want = {f"{kind}/{name}.{f}" for kind in ("exp_avg_ipt", "exp_avg_unc") for name, _ in self.deltas
                for f in ("In_Qs", "Out_Qs")}
        if set(state) != want:
            raise StoreError(f"{where}: the checkpoint has no SNELLA allocator state for this model (written by older "
                             "peftbench?); delete it to train the run from epoch 0")
        self.exp_avg_ipt = {k[len("exp_avg_ipt/"):]: v.clone() for k, v in state.items() if k.startswith("exp_avg_ipt/")}
        self.exp_avg_unc = {k[len("exp_avg_unc/"):]: v.clone() for k, v in state.items() if k.startswith("exp_avg_unc/")}


class SnellaViT(SnellViT):
    """SNELL's model with SNELLA's matrices; with the allocator (variant snella) its per-step hooks run it."""

    def __init__(self, backbone: nn.Module, num_classes: int, allocator: Allocator | None):
        super().__init__(backbone, num_classes)
        self.allocator = allocator

    def no_weight_decay(self) -> set[str]:
        # the official groups (lib/utils.py set_weight_decay): no decay on 1-d tensors (α, γ, β) nor the CLS token
        return super().no_weight_decay() | {n for n, p in self.named_parameters() if p.ndim == 1 and p.requires_grad}

    def has_step_hooks(self) -> bool:
        return self.allocator is not None

    def start_epoch(self, epoch: int, epochs: int) -> None:
        if self.allocator is not None:
            self.allocator.total_step = epochs  # (train_alloc.py: Allocator(..., args.epochs))
            self.allocator.update(epoch)

    def after_step(self, step: int) -> None:
        if self.allocator is not None:
            self.allocator.update_ipt()

    def step_state(self) -> dict[str, torch.Tensor]:
        return self.allocator.state() if self.allocator is not None else {}

    def load_step_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        if self.allocator is not None:
            self.allocator.load(state, where)

    def sparsities(self) -> list[float]:
        """s_m of every matrix, in the official module order."""
        return [m.sparsity for m in self.modules() if isinstance(m, MixKernelDelta)]


def _column(column: str, fallback, reason: str) -> PerTask:
    return PerTask(SETTINGS, fallback, column=column, source=SOURCE, fallback_reason=reason)


# the unified protocols: SNELL's recipe (AdamW, batch 64, 100 epochs, 10 warm-up; the demo lr: SNELL's)
SNELLA_RECIPE = noah_fixed_recipe(demo_lr=0.01)


@register_method
class Snella(Method):
    name = "snella"
    description = ("SNELLA: SNELL with a learned kernel mix and per-matrix sparsities reallocated by importance every "
                   "epoch (docs/methods/snella.md)")
    version = 1
    recipe = SNELLA_RECIPE
    options = {
        "rank": Option(32, "rank r of the factors, split into two kernels of r/2 (official VTAB: 32)", min=2),
        "variant": Option("auto", "snella: the allocator; mixk: the dense kernel mix, no sparsity (auto: the official "
                                  "per-task script's)", type=str, choices=("snella", "mixk"),
                          per_task=_column("variant", FALLBACK_VARIANT, "task without an official SNELLA-32 script")),
        "target_sparsity": Option("auto", "the share of every update zeroed at the end, on average (auto: the "
                                          "official per-task target_ratio)", type=float, min=0.0, max=0.999999,
                                  per_task=_column("target_sparsity", FALLBACK_TARGET,
                                                   "task without an official SNELLA-32 script: the scripts' median")),
        "init_sparsity": Option("auto", "the share zeroed at the start (auto: the official init_thres)", type=float,
                                min=0.0, max=0.999999,
                                per_task=_column("init_sparsity", FALLBACK_INIT,
                                                 "task without an official SNELLA-32 script")),
        "dropout": Option(0.1, "dropout on the branch inputs (official 0.1; none on proj's)", min=0.0, max=1.0),
        "branch_drop_path": Option(0.1, "stochastic depth on each branch's output (official 0.1)", min=0.0, max=1.0),
        "beta1": Option(0.85, "EMA of the sensitivity (official 0.85)", min=0.0, max=1.0),
        "beta2": Option(0.85, "EMA of the uncertainty (official 0.85)", min=0.0, max=1.0),
    }

    def build(self, backbone, num_classes, opts):
        rank, dense = int(opts["rank"]), opts["variant"] == "mixk"
        s0 = 0.0 if dense else float(opts["init_sparsity"])
        wrapped = []
        for block in backbone.blocks:
            for path, parts, drops in TARGETS:
                wrapped.append(wrap_module(block, path, lambda base: SnellaLinear(
                    base, rank, s0, parts, float(opts["dropout"]) if drops else 0.0, float(opts["branch_drop_path"]),
                    dense=dense)))
        named = [(f"m{j}", d) for j, d in enumerate(d for layer in wrapped for d in layer.deltas)]
        allocator = None if dense else Allocator(named, float(opts["target_sparsity"]), beta1=float(opts["beta1"]),
                                                 beta2=float(opts["beta2"]))
        model = SnellaViT(backbone, num_classes, allocator)
        backbone.cls_token.requires_grad = True
        model.train_inserted([m for layer in wrapped for m in (*layer.deltas, layer.dropout, *layer.drop_paths)])
        return model

