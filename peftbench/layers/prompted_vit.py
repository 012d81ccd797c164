"""Building blocks for methods that change what flows through a timm ViT, without forking it.

:class:`PromptedViT` runs the backbone's own modules (patch embedding, position embedding, blocks,
final norm, pooling) and inserts prompt tokens right after the prefix (CLS) tokens before chosen
blocks. VPT and E^2VPT build on it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .prompt_folding import FoldedPromptViT, fold_deep_prompts, foldable
from .timm_parts import vit_stem
from .tuned_vit import TunedViT


def prompt_init_bound(backbone: nn.Module) -> float:
    """VPT's uniform init bound sqrt(6 / (3·p·p + D)) (0.0625 for ViT-B/16; docs/methods/vpt.md)."""
    ph, pw = backbone.patch_embed.patch_size
    return math.sqrt(6.0 / float(3 * ph * pw + backbone.embed_dim))


class PromptedViT(TunedViT):
    """A frozen timm ViT with ``num_prompts`` visual prompt tokens after the CLS token.

    * ``deep=False`` (VPT-shallow): prompts enter before block 1 and propagate.
    * ``deep=True`` (VPT-deep, E^2VPT): before every block i > 1 the prompt outputs of block i−1 are
      discarded and replaced by layer i's own prompts (docs/methods/vpt.md).

    Prompts get no position embedding; dropout (train mode only) is applied to the prompts of every
    layer; :meth:`transform_prompts` is a hook for subclasses (E^2VPT's pruning masks).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, num_prompts: int, deep: bool, dropout: float):
        super().__init__(backbone, num_classes)
        self.num_prompts = int(num_prompts)
        self.deep = bool(deep)
        depth, dim = len(backbone.blocks), backbone.embed_dim
        bound = prompt_init_bound(backbone)
        self.prompt_embeddings = nn.Parameter(torch.empty(1, self.num_prompts, dim))
        nn.init.uniform_(self.prompt_embeddings, -bound, bound)
        if self.deep and depth > 1:
            self.deep_prompt_embeddings = nn.Parameter(torch.empty(depth - 1, self.num_prompts, dim))
            nn.init.uniform_(self.deep_prompt_embeddings, -bound, bound)
        else:
            self.deep_prompt_embeddings = None
        self.prompt_dropout = nn.Dropout(dropout)
        self.train_modules.append(self.prompt_dropout)

    def layer_prompts(self, layer: int) -> torch.Tensor | None:
        """(P, D) prompts inserted before block ``layer`` (0-based), or None to keep the sequence."""
        if self.num_prompts == 0:
            return None
        if layer == 0:
            return self.prompt_embeddings[0]
        if self.deep_prompt_embeddings is not None:
            return self.deep_prompt_embeddings[layer - 1]
        return None

    def transform_prompts(self, prompts: torch.Tensor) -> torch.Tensor:
        """(B, P, D) prompts after dropout → what enters the block (subclasses: masks, Fourier transforms)."""
        return prompts

    @torch.no_grad()
    def eval_prompts(self, layer: int) -> torch.Tensor | None:
        """(P, D): the prompts entering block ``layer`` in eval mode (no dropout, transform applied)."""
        p = self.layer_prompts(layer)
        return None if p is None else self.transform_prompts(p.detach().unsqueeze(0))[0]

    def foldable(self) -> bool:
        """Deep prompts before every block whose outputs nothing reads (CLS pooling): they fold into keys/values."""
        depth = len(self.backbone.blocks)
        return (self.num_prompts > 0 and (self.deep_prompt_embeddings is not None or depth == 1)
                and foldable(self))

    def folded(self, keep: list[int] | None = None) -> FoldedPromptViT:
        """The eval-mode model with its prompts folded into fixed keys/values of every attention (rows in
        ``keep`` stay tokens): docs/methods/vpt.md §10."""
        rows = [self.eval_prompts(i) for i in range(len(self.backbone.blocks))]
        return fold_deep_prompts(rows, self.backbone, self.head, keep)

    def inference_variants(self) -> dict[str, nn.Module]:
        """``folded``: every deep prompt token replaced by its fixed key/value pair (same logits, 197 tokens)."""
        variants = super().inference_variants()
        if self.foldable():
            variants["folded"] = self.folded()
        return variants

    def features(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.backbone
        x = vit_stem(vit, x)
        n = vit.num_prefix_tokens
        batch = x.shape[0]
        for i, block in enumerate(vit.blocks):
            p = self.layer_prompts(i)
            if p is not None:
                p = self.transform_prompts(self.prompt_dropout(p.unsqueeze(0).expand(batch, -1, -1)))
                rest = x[:, n:] if i == 0 else x[:, n + self.num_prompts:]
                x = torch.cat([x[:, :n], p.to(x.dtype), rest], dim=1)
            x = block(x)
        x = vit.norm(x)
        return vit.forward_head(x, pre_logits=True)
