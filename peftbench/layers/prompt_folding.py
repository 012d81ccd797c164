"""Deep prompts as fixed keys and values: cheaper inference models with the same logits.

In a deep-prompted ViT (VPT-deep, VFPT, E^2VPT) the prompts entering block i are constants (learned
tensors, no image in them) and their outputs of block i are discarded (replaced before block i+1;
after the last block only the CLS token is read). Within block i the rest of the sequence sees a
prompt token t only through the key and the value it contributes to the attention,

    k_t = k_norm(W_k · norm1(t) + b_k),   v_t = W_v · norm1(t) + b_v,

both constants. So a prompt token can be removed from the sequence and replaced by its fixed (k_t, v_t)
pair prepended to every attention's keys and values: exactly the same logits, with the token's query,
attention row, projection and MLP no longer computed. ``n`` identical prompt rows (e.g. the zeroed
tokens of a pruned E^2VPT model) give ``n`` identical (k, v) pairs, whose softmax weight is that of one
pair with log(n) added to its logit: they fold into one entry with an additive bias log(n).

* :func:`attend_with_prefix` — attention of a timm ``Attention`` with extra keys/values (and biases);
* :class:`PrefixAttention` — a timm ``Attention`` with fixed prefix keys/values (buffers);
* :func:`prompt_key_values` — the (k, v) a block's attention makes of prompt vectors;
* :class:`FoldedPromptViT` — a frozen ViT with fixed prompt tokens (possibly none) and prefix attention;
* :func:`fold_deep_prompts` — a deep-prompted model → a :class:`FoldedPromptViT` (docs/methods/vfpt.md §6,
  docs/methods/e2vpt.md §11).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .timm_parts import vit_stem
from .tuned_vit import TunedViT


def attend_with_prefix(a: nn.Module, x: torch.Tensor, pk: torch.Tensor | None, pv: torch.Tensor | None,
                       bias: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                       is_causal: bool = False) -> torch.Tensor:
    """timm ``Attention`` ``a`` on ``x`` with ``pk``, ``pv`` (heads, M, head_dim) prepended to its keys and
    values after their projections (and after ``k_norm``); ``bias`` (M,): added to the logits of the
    prefix entries (None: 0). Calls ``a``'s own submodules in the order of timm 1.0's ``Attention.forward``."""
    B, N, _ = x.shape
    gate = a.gate(x).sigmoid() if getattr(a, "gate", None) is not None else None
    qkv = a.qkv(x).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    if pk is not None and pk.shape[1] > 0:
        if is_causal:
            raise ValueError("prefix keys/values and a causal mask do not go together")
        M = pk.shape[1]
        k = torch.cat([pk.to(k.dtype).unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([pv.to(v.dtype).unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
        if attn_mask is not None:  # every query may attend to the prefix
            attn_mask = attn_mask.expand(*attn_mask.shape[:-1], N)
            pad_shape = (*attn_mask.shape[:-1], M)
            if attn_mask.dtype == torch.bool and bias is None:
                pad = torch.ones(pad_shape, dtype=torch.bool, device=attn_mask.device)
            else:
                if attn_mask.dtype == torch.bool:  # a boolean mask becomes 0 / -inf to take the bias
                    attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                        ~attn_mask, float("-inf"))
                pad = torch.zeros(pad_shape, dtype=attn_mask.dtype, device=attn_mask.device)
                if bias is not None:
                    pad = pad + bias.to(attn_mask.dtype)
            attn_mask = torch.cat([pad, attn_mask], dim=-1)
        elif bias is not None:
            attn_mask = torch.cat([bias.to(q.dtype), torch.zeros(N, dtype=q.dtype, device=q.device)])
            attn_mask = attn_mask.view(1, 1, 1, M + N)
    if getattr(a, "fused_attn", True):
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=a.attn_drop.p if a.training else 0.0, is_causal=is_causal)
    else:  # timm's explicit path (its Attention.fused_attn = False): softmax(q k^T / sqrt(d) + mask) v
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


class PrefixAttention(nn.Module):
    """A timm ``Attention`` (``self.attn``, frozen) with fixed prefix keys/values: buffers ``prefix_k``,
    ``prefix_v`` (heads, M, head_dim) and ``prefix_bias`` (M,), the logit offsets (log multiplicities)."""

    def __init__(self, attn: nn.Module, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.attn = attn
        self.register_buffer("prefix_k", keys.detach().clone())
        self.register_buffer("prefix_v", values.detach().clone())
        if bias is not None and bool((bias != 0).any()):
            self.register_buffer("prefix_bias", bias.detach().clone())
        else:
            self.prefix_bias = None

    @property
    def prefix_len(self) -> int:
        return int(self.prefix_k.shape[1])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        return attend_with_prefix(self.attn, x, self.prefix_k, self.prefix_v, self.prefix_bias, attn_mask, is_causal)


def timm_attention(module: nn.Module) -> nn.Module:
    """The timm ``Attention`` inside a prompt wrapper (``.attn`` of E^2VPT's KV-prompt attention), or itself."""
    inner = getattr(module, "attn", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "qkv") else module


@torch.no_grad()
def prompt_key_values(block: nn.Module, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v), each (heads, P, head_dim): what prompt vectors ``prompts`` (P, D) entering ``block`` contribute
    to its attention: k = k_norm(W_k norm1(t) + b_k), v = W_v norm1(t) + b_v."""
    a = timm_attention(block.attn)
    P = prompts.shape[0]
    h = block.norm1(prompts.unsqueeze(0))
    qkv = a.qkv(h).reshape(1, P, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    _, k, v = qkv.unbind(0)
    return a.k_norm(k)[0], v[0]


class FoldedPromptViT(TunedViT):
    """A frozen ViT with fixed prompt tokens (``prompts[i]``: (P', D) entering block i, deep replacement;
    P' may be 0) and :class:`PrefixAttention` where prompts were folded into keys/values. Inference only."""

    def __init__(self, backbone: nn.Module, head: nn.Module, prompts: Sequence[torch.Tensor]):
        super().__init__(backbone, 0, head=head)
        lengths = {int(p.shape[0]) for p in prompts}
        if len(lengths) != 1 or len(prompts) != len(backbone.blocks):
            raise ValueError("one prompt matrix per block, all of the same length")
        self.num_prompts = lengths.pop()
        for i, p in enumerate(prompts):
            self.register_buffer(f"prompts_{i}", p.detach().clone())
        for p in self.parameters():
            p.requires_grad = False

    def layer_prompts(self, layer: int) -> torch.Tensor:
        return getattr(self, f"prompts_{layer}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.backbone
        x = vit_stem(vit, x)
        n, batch, P = vit.num_prefix_tokens, x.shape[0], self.num_prompts
        for i, block in enumerate(vit.blocks):
            if P:
                p = self.layer_prompts(i).to(x.dtype).unsqueeze(0).expand(batch, -1, -1)
                rest = x[:, n:] if i == 0 else x[:, n + P:]
                x = torch.cat([x[:, :n], p, rest], dim=1)
            x = block(x)
        x = vit.norm(x)
        return vit.forward_head(x, pre_logits=True)


def foldable(model: nn.Module) -> bool:
    """Whether prompt outputs are never read: deep prompts before every block and CLS-token pooling."""
    vit = model.backbone
    return getattr(vit, "global_pool", "token") == "token" and getattr(vit, "attn_pool", None) is None


@torch.no_grad()
def fold_deep_prompts(prompt_rows: Sequence[torch.Tensor], backbone: nn.Module, head: nn.Module,
                      keep: Sequence[int] | None = None) -> FoldedPromptViT:
    """A :class:`FoldedPromptViT` with the logits of the deep-prompted model whose eval-mode prompts entering
    block i are ``prompt_rows[i]`` (P, D), on ``backbone`` (its attention modules may carry their own
    key/value prompts: a wrapper with ``prompts() -> (P_k, P_v) | None`` around a timm ``Attention``).

    Rows in ``keep`` stay prompt tokens; every other row is folded into fixed keys/values, identical rows
    into one entry with logit offset log(count). ``keep=None``: every row is folded (no prompt token left)."""
    depth = len(backbone.blocks)
    if len(prompt_rows) != depth:
        raise ValueError(f"deep prompts: one matrix per block ({depth}), got {len(prompt_rows)}")
    vit = copy.deepcopy(backbone)
    tokens = []
    for i, (block, rows) in enumerate(zip(vit.blocks, prompt_rows)):
        rows = rows.detach()
        P = rows.shape[0]
        kept = sorted(set(keep)) if keep is not None else []
        folded = [j for j in range(P) if j not in set(kept)]
        tokens.append(rows[kept] if kept else rows[:0])
        ks, vs, bs = [], [], []
        own = block.attn.prompts() if hasattr(block.attn, "prompts") else None
        if own is not None:
            ks.append(own[0].detach())
            vs.append(own[1].detach())
            bs.append(torch.zeros(own[0].shape[1], dtype=rows.dtype, device=rows.device))
        if folded:
            unique, counts = torch.unique(rows[folded], dim=0, return_counts=True)
            k, v = prompt_key_values(block, unique)
            ks.append(k)
            vs.append(v)
            bs.append(torch.log(counts.to(rows.dtype)))
        inner = timm_attention(block.attn)
        block.attn = PrefixAttention(inner, torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(bs)) if ks else inner
    model = FoldedPromptViT(vit, copy.deepcopy(head), tokens)
    return model.eval()
