"""E^2VPT's key-value prompts inside a timm ``Attention`` (docs/methods/e2vpt.md §2)."""
from __future__ import annotations

import math

import torch
from torch import nn

from peftbench.layers.prompt_folding import attend_with_prefix

KV_INITS = ("kaiming", "uniform", "trunc_normal")  # official ORIGIN_INIT 2 / 0 / 1


def init_kv_prompt(tensor: torch.Tensor, kind: str, patch_size: tuple[int, int]) -> None:
    """Initialise a (heads, L, head_dim) KV prompt like the official code (docs/methods/e2vpt.md §2).

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
    """A timm ``Attention`` with learnable key-value prompts (docs/methods/e2vpt.md §2).

    The wrapped module (``self.attn``) keeps its frozen weights and is called submodule by submodule:
    q, k, v come from its ``qkv`` projection (then ``q_norm`` / ``k_norm``), the prompts are prepended
    to K and V along the token axis (``LAYER_BEHIND=True``), attention is
    ``softmax(Q [P_k; K]^T / sqrt(head_dim)) [P_v; V]`` and the N outputs go through its ``norm``,
    ``gate``, ``proj`` and ``proj_drop`` (:func:`peftbench.layers.prompt_folding.attend_with_prefix`, shared with
    the folded inference models). Parameter names contain ``prompt`` (``kv_prompt`` shared;
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
        prompts = self.prompts()
        pk, pv = prompts if prompts is not None else (None, None)
        if prompts is not None and is_causal:
            raise ValueError("key-value prompts and a causal mask do not go together")
        return attend_with_prefix(self.attn, x, pk, pv, attn_mask=attn_mask, is_causal=is_causal)
