"""E^2VPT's key-value prompts inside a timm ``Attention`` (docs/methods/e2vpt.md §2)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

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
        if getattr(a, "fused_attn", True):
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=a.attn_drop.p if a.training else 0.0, is_causal=is_causal)
        else:  # timm's explicit path (its Attention.fused_attn = False): softmax(q k^T / sqrt(d)) v
            attn = (q * a.scale) @ k.transpose(-2, -1)
            if is_causal:
                causal = torch.ones(N, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - N)
                attn = attn.masked_fill(~causal, float("-inf"))
            if attn_mask is not None:
                attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
            x = a.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, a.num_heads * a.head_dim)
        x = a.norm(x)
        if gate is not None:
            x = x * gate
        x = a.proj(x)
        x = a.proj_drop(x)
        return x
