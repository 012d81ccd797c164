"""Visual prompts (VPT) and key-value prompts (E^2VPT) on a frozen timm Swin Transformer, as the official code does
them (docs/methods/vpt.md §11, docs/methods/e2vpt.md §12; KMnP/vpt@4410440 src/models/vit_prompt/swin_transformer.py,
ChengHan111/E2VPT@7a66e75 src/models/vit_prompt/swin_transformer_prompt_VK.py).

The backbone's own modules (patch embedding, every block's norms, qkv / proj, relative-position table, shift mask,
MLP, the stages' patch merging, the final norm) are called in the official order; only what the prompts change is
written here:

* P prompt tokens of the stage's width precede the H·W patch tokens in every stage (Swin has no CLS token);
  ``deep``: stage 0's block 0 gets the input prompts, its block i ≥ 1 ``deep_prompt_embeddings.0[i − 1]``, every
  block i of a later stage ``deep_prompt_embeddings.s[i]`` (so the prompts out of a patch merging are discarded);
  shallow: the input prompts flow through every block and merge;
* in a block, ``norm1`` over all tokens; the patch tokens are rolled and partitioned into windows; **every window
  gets all P prompts of its image prepended**; window attention with the relative-position bias and the shift mask
  on window-window pairs only (prompt rows and columns get 0: prompts see and are seen by every token of every
  window); the window tokens are put back (un-rolled), the prompt outputs **averaged over the windows**; then the
  residual, ``norm2`` + MLP over all tokens;
* E^2VPT adds L key-value prompts (heads, L, head_dim) per block, shared by keys and values, before the prompt and
  window keys (``LAYER_BEHIND=True``) in every window, never queries, with 0 bias and no mask;
* patch merging: each prompt vector repeated four times along the channels (``cat(p, p, p, p)``), through the
  stage's shared merge LayerNorm and reduction;
* the feature: the final norm over all tokens, then the mean over all of them, prompts included.

Two official behaviours are decided here and declared in the docs: prompts are paired with their own image's windows
(the official code pairs window i with the prompts of image i mod B, so its logits depend on the other images of a
batch; equal at batch 1), and the deep prompts of a stage get one dropout mask per forward shared by the batch (as
officially; the input prompts get one per image).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .tuned_vit import TunedViT


def is_swin(backbone: nn.Module) -> bool:
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(backbone, SwinTransformer)


def stage_widths(backbone: nn.Module) -> list[int]:
    return [int(stage.blocks[0].norm1.normalized_shape[0]) for stage in backbone.layers]


def swin_prompt_bound(backbone: nn.Module) -> float:
    """VPT's uniform init bound with the patch size and the **stage-0** width, for every stage (vp/swin:91-92):
    sqrt(6 / (3·patch² + C)), 0.18464 for Swin-B."""
    ph, pw = backbone.patch_embed.patch_size
    return math.sqrt(6.0 / float(3 * ph * pw + stage_widths(backbone)[0]))


def _windows(z: torch.Tensor, ws: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) → (B·nW, ws², C), image-major (window i = b·nW + w), timm's window_partition order."""
    from timm.models.swin_transformer import window_partition

    return window_partition(z, ws).reshape(-1, ws[0] * ws[1], z.shape[-1])


class PromptedSwin(TunedViT):
    """A frozen timm Swin Transformer with P visual prompts per stage (and, with ``kv_tokens``, E^2VPT's key-value
    prompts in every window attention) + a linear head on the pooled feature."""

    def __init__(self, backbone: nn.Module, num_classes: int, num_prompts: int, deep: bool, dropout: float,
                 kv_tokens: int = 0, kv_init=None):
        super().__init__(backbone, num_classes)
        if not is_swin(backbone):
            raise TypeError(f"PromptedSwin wraps a timm SwinTransformer, got {type(backbone).__name__}")
        for stage in backbone.layers:
            for blk in stage.blocks:
                if blk.input_resolution[0] % blk.window_size[0] or blk.input_resolution[1] % blk.window_size[1]:
                    raise ValueError(f"prompts on Swin need stage resolutions divisible by the window "
                                     f"({blk.input_resolution} vs window {blk.window_size})")
        self.num_prompts, self.deep, self.kv_tokens = int(num_prompts), bool(deep), int(kv_tokens)
        widths, depths = stage_widths(backbone), [len(s.blocks) for s in backbone.layers]
        bound = swin_prompt_bound(backbone)
        self.prompt_embeddings = nn.Parameter(torch.empty(1, self.num_prompts, widths[0]))
        nn.init.uniform_(self.prompt_embeddings, -bound, bound)
        self.deep_prompt_embeddings = nn.ParameterList()
        if self.deep:
            for s, (c, d) in enumerate(zip(widths, depths)):
                t = nn.Parameter(torch.empty(d - 1 if s == 0 else d, self.num_prompts, c))
                nn.init.uniform_(t, -bound, bound)
                self.deep_prompt_embeddings.append(t)
        # E^2VPT: one (heads, L, head_dim) tensor per block, shared by keys and values (the only Swin option,
        # swin_transformer_prompt_VK.py:574-575); ``kv_init(tensor)`` draws it (default: ORIGIN_INIT 2, every released
        # command: kaiming_uniform_, fan_in = L·head_dim)
        self.kv_prompts = nn.ParameterList()
        for stage in backbone.layers if self.kv_tokens else ():
            for blk in stage.blocks:
                heads, c = blk.attn.num_heads, int(blk.norm1.normalized_shape[0])
                t = nn.Parameter(torch.empty(heads, self.kv_tokens, c // heads))
                if kv_init is None:
                    nn.init.kaiming_uniform_(t, a=0, mode="fan_in", nonlinearity="leaky_relu")
                else:
                    kv_init(t.data)
                self.kv_prompts.append(t)
        self.prompt_dropout = nn.Dropout(dropout)
        self.train_modules.append(self.prompt_dropout)

    # -----------------------------------------------------------------------------------------
    def _attention(self, blk: nn.Module, seq: torch.Tensor, kv: torch.Tensor | None, n_windows: int) -> torch.Tensor:
        """Window attention over ``seq`` = (B·nW, P + A, C) with zero bias / no mask on prompt rows and columns and
        ``kv`` (heads, L, hd) before the keys and values."""
        attn, P = blk.attn, self.num_prompts
        B_, N, C = seq.shape
        heads = attn.num_heads
        qkv = attn.qkv(seq).reshape(B_, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        L = 0
        if kv is not None:
            L = kv.shape[1]
            kvx = kv.to(k.dtype).unsqueeze(0).expand(B_, -1, -1, -1)
            k, v = torch.cat([kvx, k], dim=2), torch.cat([kvx, v], dim=2)
        logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B_, heads, N, L + N)
        bias = F.pad(attn._get_rel_pos_bias(), (P + L, 0, P, 0))  # (1, heads, N, L + N): zeros for prompts/kv
        logits = logits + bias.to(logits.dtype)
        mask = blk.attn_mask
        if mask is not None:
            mask = F.pad(mask, (P + L, 0, P, 0)).to(logits.dtype)  # (nW, N, L + N)
            logits = logits.view(-1, n_windows, heads, N, L + N) + mask.view(1, n_windows, 1, N, L + N)
            logits = logits.view(B_, heads, N, L + N)
        a = attn.attn_drop(logits.softmax(dim=-1))
        out = (a @ v).transpose(1, 2).reshape(B_, N, C)
        return attn.proj_drop(attn.proj(out))

    def _block(self, blk: nn.Module, p: torch.Tensor, z: torch.Tensor, kv: torch.Tensor | None):
        B, H, W, C = z.shape
        P = p.shape[1]
        ws, shift = tuple(blk.window_size), tuple(blk.shift_size)
        hz, hp = blk.norm1(z), blk.norm1(p)
        if any(shift):
            hz = torch.roll(hz, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        win = _windows(hz, ws)
        nW = win.shape[0] // B
        seq = torch.cat([hp.repeat_interleave(nW, dim=0), win], dim=1)  # window b·nW + w gets image b's prompts
        out = self._attention(blk, seq, kv, nW)
        p_out = out[:, :P].reshape(B, nW, P, C).mean(dim=1)
        from timm.models.swin_transformer import window_reverse

        z_out = window_reverse(out[:, P:].reshape(-1, ws[0], ws[1], C), ws, H, W)
        if any(shift):
            z_out = torch.roll(z_out, shifts=shift, dims=(1, 2))
        t = torch.cat([p, z.reshape(B, H * W, C)], dim=1)
        t = t + blk.drop_path1(torch.cat([p_out, z_out.reshape(B, H * W, C)], dim=1))
        t = t + blk.drop_path2(blk.mlp(blk.norm2(t)))
        return t[:, :P], t[:, P:].reshape(B, H, W, C)

    @staticmethod
    def _merge(down: nn.Module, p: torch.Tensor, z: torch.Tensor):
        """The stage's patch merging, with each prompt vector repeated four times along the channels through the
        same norm and reduction (vp/swin:303-309,337-342)."""
        if isinstance(down, nn.Identity):
            return p, z
        return down.reduction(down.norm(torch.cat([p, p, p, p], dim=-1))), down(z)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        sw = self.backbone
        z = sw.patch_embed(x)  # (B, H, W, C)
        if getattr(sw, "absolute_pos_embed", None) is not None:
            z = z + sw.absolute_pos_embed
        z = getattr(sw, "pos_drop", nn.Identity())(z)
        B = z.shape[0]
        p = self.prompt_dropout(self.prompt_embeddings.expand(B, -1, -1)).to(z.dtype)  # one mask per image
        kv_i = 0
        for s, stage in enumerate(sw.layers):
            p, z = self._merge(stage.downsample, p, z)
            # the stage's deep prompts: one dropout mask for the whole stage tensor, shared by the batch
            deep = self.prompt_dropout(self.deep_prompt_embeddings[s]) if self.deep else None
            for i, blk in enumerate(stage.blocks):
                if deep is not None and (s, i) != (0, 0):
                    p = deep[i - 1 if s == 0 else i].unsqueeze(0).expand(B, -1, -1).to(z.dtype)
                kv = self.kv_prompts[kv_i] if self.kv_tokens else None
                kv_i += 1
                p, z = self._block(blk, p, z, kv)
        t = sw.norm(torch.cat([p, z.reshape(B, -1, z.shape[-1])], dim=1))
        return t.mean(dim=1)
