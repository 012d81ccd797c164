"""E^2VPT (Han et al., ICCV 2023), without pruning: spec §2 (the official code's ``P_VK`` transfer type).

Two kinds of learnable prompts on a frozen timm ViT, plus a trained linear head:

* **visual prompts**: P tokens after CLS, replaced before every block (VPT-deep style, spec §2.1),
  dropout 0.1 (train mode only). :class:`peftbench.vit.PromptedViT` with ``deep=True``.
* **key-value prompts**: per attention layer a tensor (num_heads, L, head_dim) prepended to the keys
  and the values *after* their projections (so the prompts bypass W_k, W_v and their biases; queries
  are unchanged), spec §2.2. One tensor shared by K and V by default (``share_kv=True``, as in every
  released command), or two. :class:`KVPromptAttention` replaces each ``block.attn`` and calls the
  wrapped timm ``Attention``'s own submodules in the order of timm 1.0.31's ``Attention.forward``
  (gate, qkv, q_norm/k_norm, attention, norm, gate, proj, proj_drop) with
  ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on GPU).

``prompt_tokens`` / ``kv_tokens`` = ``auto`` take the per-task values of the released ``command.txt``
(spec §2.5, data file ``tasks/data/e2vpt_prompt_lengths.csv``); tasks not listed get P=10, L=5. The
run record's ``option_sources`` says where each value came from. P=0 and L=0 give exactly the frozen
backbone (+ head).

Parameters (ViT-B/16, C classes): 9,216·P + 9,216·L + 769·C (shared K/V), 9,216·P + 18,432·L + 769·C
(separate K and V), spec §5.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.method import PROMPT_RECIPE, VPT_LR_GRID, Method, Option, OptionError, register_method
from peftbench.tasks import per_task_value
from peftbench.vit import PromptedViT

PROMPT_LENGTHS_FILE = "e2vpt_prompt_lengths.csv"
FALLBACK_PROMPT_TOKENS = 10
FALLBACK_KV_TOKENS = 5
KV_INITS = ("kaiming", "uniform", "trunc_normal")  # official ORIGIN_INIT 2 / 0 / 1


def init_kv_prompt(tensor: torch.Tensor, kind: str, patch_size: tuple[int, int]) -> None:
    """Initialise a (heads, L, head_dim) KV prompt like the official code (spec §2.2).

    * ``kaiming`` (ORIGIN_INIT=2, every released command): ``kaiming_uniform_(a=0, mode='fan_in',
      nonlinearity='leaky_relu')`` on the 3-d tensor → fan_in = L·head_dim, bound sqrt(6 / (L·head_dim)).
    * ``uniform`` (ORIGIN_INIT=0): uniform(±sqrt(6 / (3·patch·patch + 16))) (0.0875 for patch 16).
    * ``trunc_normal`` (ORIGIN_INIT=1): truncated normal, std 0.02.
    """
    if tensor.numel() == 0:
        return
    if kind == "kaiming":
        nn.init.kaiming_uniform_(tensor, a=0, mode="fan_in", nonlinearity="leaky_relu")
    elif kind == "uniform":
        val = math.sqrt(6.0 / float(3 * patch_size[0] * patch_size[1] + 16))
        nn.init.uniform_(tensor, -val, val)
    elif kind == "trunc_normal":
        nn.init.trunc_normal_(tensor, std=0.02)
    else:
        raise ValueError(f"unknown kv_init {kind!r} (known: {', '.join(KV_INITS)})")


class KVPromptAttention(nn.Module):
    """A timm ``Attention`` with learnable key-value prompts (spec §2.2).

    The wrapped module (``self.attn``) keeps its frozen weights and is called submodule by submodule:
    q, k, v come from its ``qkv`` projection (then ``q_norm`` / ``k_norm``), the prompts are prepended
    to K and V along the token axis (``LAYER_BEHIND=True``), attention is
    ``softmax(Q [P_k; K]^T / sqrt(head_dim)) [P_v; V]`` and the N outputs go through its ``norm``,
    ``gate``, ``proj`` and ``proj_drop``. Parameter names contain ``prompt`` (``kv_prompt`` shared;
    ``k_prompt`` / ``v_prompt`` separate).
    """

    def __init__(self, attn: nn.Module, kv_tokens: int, share_kv: bool = True, init: str = "kaiming",
                 patch_size: tuple[int, int] = (16, 16)):
        super().__init__()
        for name in ("qkv", "proj", "num_heads", "head_dim"):
            if not hasattr(attn, name):
                raise TypeError(f"KVPromptAttention wraps a timm Attention (with .{name}); got {type(attn).__name__}")
        self.attn = attn
        self.kv_tokens = int(kv_tokens)
        self.share_kv = bool(share_kv)
        heads, head_dim = attn.num_heads, attn.head_dim
        shape = (heads, self.kv_tokens, head_dim)
        self.kv_prompt = self.k_prompt = self.v_prompt = None
        if self.kv_tokens > 0:
            if self.share_kv:
                self.kv_prompt = nn.Parameter(torch.zeros(shape))
                init_kv_prompt(self.kv_prompt.data, init, patch_size)
            else:
                # official order: V first, then K
                self.v_prompt = nn.Parameter(torch.zeros(shape))
                self.k_prompt = nn.Parameter(torch.zeros(shape))
                init_kv_prompt(self.v_prompt.data, init, patch_size)
                init_kv_prompt(self.k_prompt.data, init, patch_size)

    def prompts(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(P_k, P_v), each (heads, L, head_dim), or None without KV prompts."""
        if self.kv_tokens == 0:
            return None
        if self.share_kv:
            return self.kv_prompt, self.kv_prompt
        return self.k_prompt, self.v_prompt

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        a = self.attn
        B, N, _ = x.shape
        gate = a.gate(x).sigmoid() if getattr(a, "gate", None) is not None else None
        qkv = a.qkv(x).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        prompts = self.prompts()
        if prompts is not None:
            if is_causal:
                raise ValueError("key-value prompts and a causal mask do not go together")
            pk, pv = prompts
            k = torch.cat([pk.to(k.dtype).unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([pv.to(v.dtype).unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
            if attn_mask is not None:  # every query may attend to the prompts
                attn_mask = attn_mask.expand(*attn_mask.shape[:-1], N)
                pad_shape = (*attn_mask.shape[:-1], self.kv_tokens)
                pad = (torch.ones(pad_shape, dtype=torch.bool, device=attn_mask.device) if attn_mask.dtype == torch.bool
                       else torch.zeros(pad_shape, dtype=attn_mask.dtype, device=attn_mask.device))
                attn_mask = torch.cat([pad, attn_mask], dim=-1)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=a.attn_drop.p if a.training else 0.0, is_causal=is_causal)
        x = x.transpose(1, 2).reshape(B, N, a.num_heads * a.head_dim)
        x = a.norm(x)
        if gate is not None:
            x = x * gate
        x = a.proj(x)
        x = a.proj_drop(x)
        return x


class E2vptModel(PromptedViT):
    """Frozen timm ViT + deep visual prompts + key-value prompts in every attention layer + head."""

    def __init__(self, backbone: nn.Module, num_classes: int, prompt_tokens: int, kv_tokens: int,
                 share_kv: bool = True, dropout: float = 0.1, kv_init: str = "kaiming"):
        super().__init__(backbone, num_classes, int(prompt_tokens), deep=True, dropout=float(dropout))
        self.kv_tokens = int(kv_tokens)
        self.share_kv = bool(share_kv)
        patch = tuple(backbone.patch_embed.patch_size)
        for block in backbone.blocks:
            block.attn = KVPromptAttention(block.attn, self.kv_tokens, self.share_kv, kv_init, patch)

    def kv_attentions(self) -> list[KVPromptAttention]:
        return [b.attn for b in self.backbone.blocks]


def _as_count(name: str, value) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise OptionError(f"option {name!r}: expected a non-negative integer or 'auto', got {value!r}") from None
    if n < 0 or n != float(value):
        raise OptionError(f"option {name!r}: expected a non-negative integer, got {value!r}")
    return n


def resolve_prompt_lengths(opts: dict, task) -> tuple[dict, dict]:
    """``auto`` prompt lengths → the released per-task values (spec §2.5) or the fallback."""
    opts = dict(opts)
    sources = {}
    for key, fallback in (("prompt_tokens", FALLBACK_PROMPT_TOKENS), ("kv_tokens", FALLBACK_KV_TOKENS)):
        if opts.get(key) == "auto":
            value, source = per_task_value(PROMPT_LENGTHS_FILE, key, task, fallback)
            opts[key] = int(value)
            sources[key] = source
        else:
            opts[key] = _as_count(key, opts[key])
    return opts, sources


def _length(opts: dict, key: str, fallback: int) -> int:
    value = opts.get(key, "auto")
    return fallback if value == "auto" else _as_count(key, value)


FGVC_BATCH_SIZE = 128  # the released FGVC commands (VTAB: 64, the recipe's), spec §2.4
FGVC_LR_GRID = tuple(lr for lr in VPT_LR_GRID if lr != 0.05)  # FGVC: the VTAB grid without 0.05, spec §2.4


def fgvc_context(ctx):
    """Under the ``vpt`` protocol, FGVC tasks get the E^2VPT FGVC batch size (128) and lr grid (no 0.05),
    unless ``--batch-size`` / ``--lr`` say otherwise; the run records' option_sources say so."""
    if ctx.task.suite != "fgvc" or ctx.protocol.name != "vpt":
        return ctx
    overrides, sources = dict(ctx.overrides), dict(ctx.option_sources)
    if overrides.get("batch_size") is None:
        overrides["batch_size"] = FGVC_BATCH_SIZE
        sources["batch_size"] = f"{FGVC_BATCH_SIZE}: E^2VPT FGVC commands (spec §2.4)"
    if not overrides.get("lr_grid"):
        overrides["lr_grid"] = FGVC_LR_GRID
        sources["lr_grid"] = "E^2VPT FGVC grid: the VTAB lr grid without 0.05 (spec §2.4)"
    return dataclasses.replace(ctx, overrides=overrides, option_sources=sources)


E2VPT_OPTIONS = {
    "prompt_tokens": Option("auto", "visual prompt tokens P per layer (auto: command.txt per-task value, spec "
                                    "§2.5; else 10)"),
    "kv_tokens": Option("auto", "key-value prompt tokens L per attention layer (auto: command.txt per-task "
                                "value, spec §2.5; else 5)"),
    "share_kv": Option(True, "one KV prompt tensor for keys and values (official SHARE_PARAM_KV=True); false: "
                             "separate K and V tensors (2x parameters)"),
    "dropout": Option(0.1, "dropout on the visual prompts (train mode only)"),
    "kv_init": Option("kaiming", "KV prompt init: kaiming (ORIGIN_INIT=2, released commands), uniform "
                                 "(ORIGIN_INIT=0), trunc_normal (ORIGIN_INIT=1)", choices=KV_INITS),
}


@register_method
class E2vpt(Method):
    name = "e2vpt"
    aliases = ("e2vpt-origin",)
    description = "E^2VPT without pruning: deep visual prompts + key-value prompts, backbone frozen (spec §2)"
    options = dict(E2VPT_OPTIONS)
    recipe = PROMPT_RECIPE  # SGD momentum 0.9, batch 64, 100 epochs, warm-up 10, lr x wd grid (spec §2.4)

    def resolve_options(self, opts, task):
        return resolve_prompt_lengths(opts, task)

    def pipeline(self, ctx, protocol):
        return protocol.pipeline(fgvc_context(ctx))

    def build(self, backbone, num_classes, opts):
        return E2vptModel(
            backbone, num_classes,
            prompt_tokens=_length(opts, "prompt_tokens", FALLBACK_PROMPT_TOKENS),
            kv_tokens=_length(opts, "kv_tokens", FALLBACK_KV_TOKENS),
            share_kv=bool(opts.get("share_kv", True)), dropout=float(opts.get("dropout", 0.1)),
            kv_init=str(opts.get("kv_init", "kaiming")))
