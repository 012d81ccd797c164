"""MoSA: Mixture of Sparse Adapters (Zhang et al., "MoSA: Mixture of Sparse Adapters for Visual Efficient Tuning",
arXiv 2312.02923; official code Theia-4869/MoSA@286cc0fd, its VTAB flags: docs/methods/mosa.md and
docs/methods/notes/mosa.md).

In every block, parallel to the MLP and reading the post-attention stream h through its own LayerNorm (the AdaptFormer
place, vit_mosa.py:236-262):

    out = h + MLP(LN2(h)) + s · (W_B ⊙ M_B) Dropout(GELU(W_d LN_a(h) + b_d)) + s · b_B

One shared down-projection (``SHARE down``); E = 4 up experts whose weights are disjoint random quarters of one
D × r matrix W (the masks M_i partition it, drawn once before training: pruner.py:48-66, train.py:159-168), each with
its own dense bias b_i. While training, every block draws its expert B at every forward (``random.randint``, no
router); evaluation uses the mean expert, W / E and mean(b) (the official ``merge``). Every training step runs the batch
twice and adds the symmetric KL of the two outputs (each side's target detached) to the first one's cross entropy
(trainer.py:97-128, losses.py:70-79): :meth:`MoSAViT.step_loss`.

W is one dense tensor: the gradient of each step reaches only the drawn expert's quarter (autograd masks it), which is
what the official gradient masks do. Parameters (head excluded): L·(2D + Dr + r + Dr + E·D): ViT-B/16, r = 16, E = 4:
350,400 (the official "pruned" count; 322,752 once merged).
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.methods import Method, Option, TunedViT, noah_fixed_recipe, register_method

from .adaptformer import ParallelAdapterBlock


def partition(rows: int, cols: int, experts: int) -> torch.Tensor:
    """(rows, cols) expert index of every entry: the random score's rank decides (pruner.py:48-66, ``divide`` with
    mode "all": expert i keeps the entries whose rank lies in (⌊i n / E⌋, ⌊(i + 1) n / E⌋]); drawn from torch's RNG."""
    score = torch.rand(rows * cols)
    n = score.numel()
    rank = torch.empty(n, dtype=torch.long)
    rank[torch.argsort(score)] = torch.arange(n)
    bounds = torch.tensor([math.floor(i * n / experts) for i in range(1, experts)])
    return torch.bucketize(rank, bounds, right=True).reshape(rows, cols)


class MoSAAdapter(nn.Module):
    """LN_a → shared down → GELU → dropout → the drawn up expert (training) or the mean expert (eval), times s."""

    def __init__(self, dim: int, rank: int, experts: int, scale: float, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # adapter_norm (vit_mosa.py:34)
        self.down = nn.Linear(dim, rank)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # vit_mosa.py:177-180
        nn.init.zeros_(self.down.bias)
        self.up_weight = nn.Parameter(torch.zeros(dim, rank))  # every expert starts at zero (vit_mosa.py:212-218)
        self.up_bias = nn.Parameter(torch.zeros(experts, dim))
        self.register_buffer("partition", partition(dim, rank, experts))
        self.experts, self.scale, self.dropout = int(experts), float(scale), float(dropout)
        self.expert: int | None = None  # the drawn expert of this forward (training)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = F.dropout(F.gelu(self.down(self.norm(h))), p=self.dropout, training=self.training)
        if self.training:
            e = int(self.expert if self.expert is not None else 0)
            weight = self.up_weight * (self.partition == e).to(self.up_weight.dtype)
            bias = self.up_bias[e]
        else:  # the merged expert: the union of the quarters / E, the mean bias
            weight, bias = self.up_weight / self.experts, self.up_bias.mean(dim=0)
        return F.linear(a, weight, bias) * self.scale


class MoSAViT(TunedViT):
    """The frozen ViT with a :class:`ParallelAdapterBlock` holding a :class:`MoSAAdapter` per block, and the head."""

    def __init__(self, backbone: nn.Module, num_classes: int, rank: int, experts: int, scale: float, dropout: float,
                 reg_weight: float, seed: int = 0):
        super().__init__(backbone, num_classes)
        dim = backbone.embed_dim
        self.adapters = []
        for i, block in enumerate(backbone.blocks):
            adapter = MoSAAdapter(dim, rank, experts, scale, dropout)
            backbone.blocks[i] = ParallelAdapterBlock(block, adapter)
            self.adapters.append(adapter)
        self.reg_weight = float(reg_weight)
        self._rng = random.Random(seed)
        self._step: tuple[torch.Tensor, torch.Tensor] | None = None
        self.train_inserted(self.adapters)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # per block A (the down expert, unused with a shared down) then B (vit_mosa.py:234)
            for adapter in self.adapters:
                self._rng.randint(0, adapter.experts - 1)
                adapter.expert = self._rng.randint(0, adapter.experts - 1)
        return super().features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        self._step = (x, logits) if self.training else None
        return logits

    def step_loss(self, y: torch.Tensor) -> torch.Tensor | None:
        """REG · ½[KL(sg p₂ ‖ p₁) + KL(sg p₁ ‖ p₂)] of this step's output and a second forward of its batch."""
        if self._step is None or self.reg_weight == 0:
            return None
        x, first = self._step
        second = self.forward(x)
        self._step = None
        return self.reg_weight * symmetric_kl(first, second)

    def step_state(self) -> dict[str, torch.Tensor]:
        version, state, gauss = self._rng.getstate()
        return {"rng": torch.tensor([version, *state], dtype=torch.int64),
                "gauss": torch.tensor([math.nan if gauss is None else gauss], dtype=torch.float64)}

    def load_step_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        if "rng" not in state:
            raise ValueError(f"{where}: no MoSA expert-draw state (rng) in the checkpoint")
        values = [int(v) for v in state["rng"].tolist()]
        gauss = float(state["gauss"][0]) if "gauss" in state else math.nan
        self._rng.setstate((values[0], tuple(values[1:]), None if math.isnan(gauss) else gauss))


def symmetric_kl(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """losses.py:70-79 (``symmetric_KL_loss``: batchmean, each side's target detached, in float32 or wider)."""
    a = first if first.dtype == torch.float64 else first.float()
    b = second if second.dtype == torch.float64 else second.float()
    return 0.5 * (F.kl_div(F.log_softmax(a, dim=-1), F.softmax(b.detach(), dim=-1), reduction="batchmean")
                  + F.kl_div(F.log_softmax(b, dim=-1), F.softmax(a.detach(), dim=-1), reduction="batchmean"))


# The official recipe (one for all VTAB tasks: lr 5e-3, batch 128, 100 epochs) is not a --protocol paper card yet;
# the unified protocols train MoSA as the NOAH-lineage adapters. demo lr: AdaptFormer's (the same adapter at
# inference), not searched for this method (results/README.md says so)
MOSA_RECIPE = noah_fixed_recipe(demo_lr=0.16)


@register_method
class MoSA(Method):
    name = "mosa"
    description = ("MoSA: an AdaptFormer-place adapter whose up-projection is 4 random sparse experts drawn per "
                   "forward, with a consistency KL over two forwards; the mean expert at inference "
                   "(docs/methods/mosa.md)")
    version = 1
    recipe = MOSA_RECIPE
    options = {
        "rank": Option(16, "bottleneck r (scripts/mosa/vit/VTAB/vtab.sh:18: 16)", min=1),
        "experts": Option(4, "E up experts (vtab.sh:19: EXPERT_NUM 4)", min=1),
        "scale": Option(0.1, "fixed scale s (config.py:61: SCALAR 0.1)", min=0.0),
        "dropout": Option(0.1, "dropout after the GELU (config.py:62: 0.1)", min=0.0, max=1.0),
        "reg_weight": Option(1.0, "weight of the symmetric KL of the two forwards (vtab.sh:25: REG_WEIGHT 1.0)",
                             min=0.0),
    }

    def build(self, backbone, num_classes, opts):
        return MoSAViT(backbone, num_classes, int(opts["rank"]), int(opts["experts"]), float(opts["scale"]),
                       float(opts["dropout"]), float(opts["reg_weight"]), seed=torch.initial_seed())
