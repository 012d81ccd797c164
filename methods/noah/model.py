"""NOAH's model: per block, visual prompts, LoRA on the fused qkv and an adapter after the MLP, each of its own size,
or a supernet of them (ZhangYuanhan-AI/NOAH@e9c55f3 model/supernet_vision_transformer_timm.py,
model/module/adapter_super.py; docs/methods/noah.md).

A subnet is three lists of per-block sizes (0: the module is absent there): ``prompts`` p_i, ``lora`` r_i, ``adapter``
a_i. Block i computes, on a frozen timm ViT block:

* prompts (``Block.forward``, :215-224): when p_i > 0, the last p_{i-1} tokens are dropped (i > 0; none before block
  0) and p_i prompt tokens are appended, each after dropout; when p_i = 0 the sequence passes as it is (so the
  prompts of an earlier block stay). NOAH also appends input-level prompts with their own position embedding before
  block 0, but block 0 always removes them again (its ``sample_last_prompt_tuning_dim`` is p_0): they never reach
  the output, and peftbench does not build them (their count is in :func:`noah_count`, which the search limits);
* LoRA (``Attention.forward``, :174-181): qkv(x) + B_r A_r dropout(x), scale 1 (no α/r);
* the adapter (:226, adapter_super.py:50-63) after stochastic depth: x + adapter(drop_path(mlp(norm2(x)))), adapter(h)
  = h + W_up dropout(QuickGELU(W_down h + b_d)) + b_u.

Initialisation as NOAH's code leaves it: the prompt tensors xavier-uniform on their supernet shape (1, P_super, D)
(bound sqrt(6 / ((P_super + 1) D))), then ``init_weights`` redraws every Linear, LoRA's A and B and the adapters
included: trunc-normal std 0.02, biases 0 (:462,520-531,664-688).

The supernet holds the largest size of every module and runs a sub-configuration by slicing the first rows/columns
(``set_sample_config``: prompt tokens [:p], A[:r], B[:, :r], W_down[:a], b_d[:a], W_up[:, :a]); in training mode it
samples a new configuration before every forward (``supernet_engine_prompt.py:12-46,85-90``).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.layers.adapters import QuickGELU
from peftbench.layers.merge import wrap_module
from peftbench.layers.timm_parts import vit_stem
from peftbench.methods import TunedViT

KINDS = ("prompts", "lora", "adapter")


@dataclass(frozen=True)
class Subnet:
    """Per-block sizes of each module (``KINDS``)."""

    prompts: tuple[int, ...]
    lora: tuple[int, ...]
    adapter: tuple[int, ...]

    def as_dict(self) -> dict[str, list[int]]:
        return {k: list(getattr(self, k)) for k in KINDS}

    def options(self) -> dict[str, str]:
        """As the method's options (``prompt_dims``, ``lora_dims``, ``adapter_dims``)."""
        return {f"{'prompt' if k == 'prompts' else k}_dims": ",".join(map(str, getattr(self, k))) for k in KINDS}

    @classmethod
    def uniform(cls, depth: int, size: int) -> "Subnet":
        return cls(*((size,) * depth for _ in KINDS))


def block_count(net: Subnet, dim: int) -> int:
    """The blocks' trained entries of ``net``: prompt tokens, LoRA A and B on qkv (4·r·D), adapter weights and biases
    (the up-projection's bias is full width)."""
    return (sum(p * dim for p in net.prompts) + sum(r * 4 * dim for r in net.lora)
            + sum(2 * a * dim + a + dim for a in net.adapter if a > 0))


def noah_count(net: Subnet, dim: int, super_prompts: int) -> int:
    """What NOAH's search limits (``VisionTransformer.get_sampled_params_numel``, :581-595, without the head): every
    block's prompt tokens, LoRA A and B, adapter weights and biases (the up-projection's bias is full width), plus
    the input-level prompts p_0 and their position embedding of the supernet's width P_super (counted, though they
    never reach the output)."""
    n = block_count(net, dim)
    if net.prompts and net.prompts[0] > 0:
        n += net.prompts[0] * dim + super_prompts * dim
    return n


def sample_subnet(rng: random.Random, choices: dict, depth: int) -> Subnet:
    """``sample_configs`` (supernet_engine_prompt.py:17-25), draw for draw: the depths of the prompts, LoRA, the
    adapters and the (unused, always 0) prefixes, then each module's sizes for its first d blocks (0 after)."""
    depths = [rng.choice(choices["depths"]) for _ in KINDS] + [rng.choice((0,))]  # (the prefix depth: one draw)
    return Subnet(*(tuple(rng.choice(choices["dims"]) for _ in range(d)) + (0,) * (depth - d) for d in depths[:3]))


class NoahLoRA(nn.Module):
    """``base(x) + B[:, :r] A[:r] dropout(x)`` around a frozen Linear (the fused qkv)."""

    def __init__(self, base: nn.Linear, rank: int, dropout: float):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.empty(base.out_features, rank))
        nn.init.trunc_normal_(self.lora_a, std=0.02)  # NOAH's init_weights redraws LoRA_a and LoRA_b alike
        nn.init.trunc_normal_(self.lora_b, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.rank = rank  # the size in use (supernet: sampled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.rank == 0:
            return out
        r = self.rank
        return out + F.linear(F.linear(self.dropout(x), self.lora_a[:r]), self.lora_b[:, :r])


class NoahAdapter(nn.Module):
    """``h + W_up[:, :a] dropout(QuickGELU(W_down[:a] h + b_d[:a])) + b_u``."""

    def __init__(self, dim: int, width: int, dropout: float):
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.up = nn.Linear(width, dim)
        for lin in (self.down, self.up):  # init_weights' redraw of adapter_super's xavier / N(0, 1e-6)
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)
        self.width = width  # the size in use (supernet: sampled)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.width == 0:
            return h
        a = self.width
        out = self.dropout(self.act(F.linear(h, self.down.weight[:a], self.down.bias[:a])))
        return h + F.linear(out, self.up.weight[:, :a], self.up.bias)


class AdapterAfterDropPath(nn.Module):
    """Replaces a block's ``drop_path2``: ``adapter(drop_path(h))`` (NOAH's placement). ``drop_path`` is where
    peftbench's stochastic depth puts its DropPath (:func:`peftbench.layers.timm_parts.add_drop_path`)."""

    def __init__(self, drop_path: nn.Module, adapter: NoahAdapter):
        super().__init__()
        self.drop_path = drop_path
        self.adapter = adapter

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.drop_path(h))


class NoahViT(TunedViT):
    """A frozen timm ViT with NOAH's modules of sizes ``net`` (the largest sizes, for a supernet)."""

    def __init__(self, backbone: nn.Module, num_classes: int, net: Subnet, *, super_prompts: int, dropout: dict,
                 choices: dict | None = None, seed: int = 0):
        super().__init__(backbone, num_classes)
        depth, dim = len(backbone.blocks), backbone.embed_dim
        for kind in KINDS:
            if len(getattr(net, kind)) != depth:
                raise ValueError(f"noah: {len(getattr(net, kind))} {kind} sizes for a backbone of {depth} blocks")
        self.dim, self.super_prompts = dim, int(super_prompts)
        bound = math.sqrt(6.0 / ((self.super_prompts + 1) * dim))  # xavier-uniform on (1, P_super, D)
        self.prompts = nn.ParameterList()
        self.prompt_index: list[int | None] = []
        for p in net.prompts:
            if p > 0:
                self.prompt_index.append(len(self.prompts))
                self.prompts.append(nn.Parameter(torch.empty(p, dim).uniform_(-bound, bound)))
            else:
                self.prompt_index.append(None)
        self.prompt_dropout = nn.Dropout(float(dropout["prompts"]))
        self.loras: list[NoahLoRA | None] = []
        self.adapters: list[NoahAdapter | None] = []
        inserted: list[nn.Module] = [self.prompt_dropout]
        for i, block in enumerate(backbone.blocks):
            lora = adapter = None
            if net.lora[i] > 0:
                lora = wrap_module(block, "attn.qkv", lambda base: NoahLoRA(base, net.lora[i], float(dropout["lora"])))
                inserted.append(lora.dropout)  # (its A and B train; the wrapped qkv stays frozen and in eval mode)
            if net.adapter[i] > 0:
                adapter = NoahAdapter(dim, net.adapter[i], float(dropout["adapter"]))
                wrap_module(block, "drop_path2", lambda dp: AdapterAfterDropPath(dp, adapter))
                inserted.append(adapter)
            self.loras.append(lora)
            self.adapters.append(adapter)
        self.largest = net
        self.active = net
        for p in self.prompts:
            p.requires_grad = True
        self.train_inserted(inserted)
        # a supernet: the search space it samples from in training mode (None: a fixed subnet)
        self.choices = choices
        self._rng = random.Random(seed)

    # -- the configuration in use ------------------------------------------------------------
    def set_subnet(self, net: Subnet) -> None:
        """Run the sub-configuration ``net`` (each size at most the built one)."""
        for kind in KINDS:
            for i, (want, have) in enumerate(zip(getattr(net, kind), getattr(self.largest, kind))):
                if want > have:
                    raise ValueError(f"noah: {kind} size {want} at block {i} exceeds the built {have}")
        for i in range(len(net.lora)):
            if self.loras[i] is not None:
                self.loras[i].rank = net.lora[i]
            if self.adapters[i] is not None:
                self.adapters[i].width = net.adapter[i]
        self.active = net

    def sample(self) -> Subnet:
        """A random configuration of the search space (``sample_configs``: per module a depth d from its choices,
        then a size from its choices for each of the first d blocks, 0 after)."""
        assert self.choices is not None
        return sample_subnet(self._rng, self.choices, len(self.largest.prompts))

    # -- forward ------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.choices is not None:
            self.set_subnet(self.sample())
        vit = self.backbone
        x = vit_stem(vit, x)
        batch = x.shape[0]
        sizes = self.active.prompts
        for i, block in enumerate(vit.blocks):
            p = sizes[i]
            if p > 0:
                index = self.prompt_index[i]
                assert index is not None
                tokens = self.prompt_dropout(self.prompts[index][:p].unsqueeze(0).expand(batch, -1, -1))
                last = sizes[i - 1] if i > 0 else 0
                x = torch.cat([x[:, :x.shape[1] - last], tokens.to(x.dtype)], dim=1)
            x = block(x)
        x = vit.norm(x)
        return vit.forward_head(x, pre_logits=True)

    def parameter_counts(self) -> dict[str, int]:
        """The counts of the configuration in use (a supernet's sampled slices; a subnet's own tensors)."""
        counts = super().parameter_counts()
        if self.choices is not None or self.active != self.largest:
            head = counts["head"]
            counts["tuned"] = block_count(self.active, self.dim) + head
        return counts
