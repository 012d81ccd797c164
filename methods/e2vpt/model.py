"""E^2VPT (Han et al., ICCV 2023), without pruning: docs/methods/e2vpt.md (the official code's ``P_VK`` transfer type).

Two kinds of learnable prompts on a frozen timm ViT, plus a trained linear head:

* **visual prompts**: P tokens after CLS, replaced before every block (VPT-deep style, docs/methods/e2vpt.md §1.1),
  dropout 0.1 (train mode only). :class:`peftbench.layers.prompted_vit.PromptedViT` with ``deep=True``.
* **key-value prompts**: per attention layer a tensor (num_heads, L, head_dim) prepended to the keys
  and the values *after* their projections (so the prompts bypass W_k, W_v and their biases; queries
  are unchanged), docs/methods/e2vpt.md §2. One tensor shared by K and V by default (``share_kv=True``, as in every
  released command), or two. :class:`KVPromptAttention` replaces each ``block.attn`` and calls the
  wrapped timm ``Attention``'s own submodules in the order of timm 1.0.31's ``Attention.forward``
  (gate, qkv, q_norm/k_norm, attention, norm, gate, proj, proj_drop) with
  ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on GPU).

``prompt_tokens`` / ``kv_tokens`` = ``auto`` take the per-task values of the released ``command.txt``
(docs/methods/e2vpt.md §6, data file ``methods/e2vpt/prompt_lengths.csv``); tasks not listed get P=10, L=5. The
run record's ``option_sources`` says where each value came from. P=0 and L=0 give exactly the frozen
backbone (+ head).

Parameters (ViT-B/16, C classes): 9,216·P + 9,216·L + 769·C (shared K/V), 9,216·P + 18,432·L + 769·C
(separate K and V), docs/methods/e2vpt.md §5.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from peftbench.layers.prompted_swin import PromptedSwin, is_swin
from peftbench.layers.prompted_vit import PromptedViT
from peftbench.methods import PROMPT_RECIPE, VPT_LR_GRID, Method, Option, OptionError, PerTask, register_method

from .kv_attention import KV_INITS, KVPromptAttention, init_kv_prompt
from .pruning import SEGMENTS, check_pattern, dense_mask, pattern_tensors, segment_index, zero_entries_per_layer

PROMPT_LENGTHS_FILE = Path(__file__).with_name("prompt_lengths.csv")
FALLBACK_PROMPT_TOKENS = 10
FALLBACK_KV_TOKENS = 5


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


class E2vptPruneModel(E2vptModel):
    """:class:`E2vptModel` with the token and segment masks of the pruning pipeline.

    * ``pattern=None``: soft masks, trainable iff ``train_masks`` (stages A, B, C).
    * ``pattern`` given: masks frozen (they stay at 1.0) and multiplied by the fixed 0/1 keep pattern
      (stages E, F): the kept entries are exactly 1.0.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, prompt_tokens: int, kv_tokens: int,
                 share_kv: bool = True, dropout: float = 0.1, kv_init: str = "kaiming",
                 segment_layout: str = "interleaved", train_masks: bool = True, pattern: dict | None = None):
        super().__init__(backbone, num_classes, prompt_tokens, kv_tokens, share_kv, dropout, kv_init)
        P, D = self.num_prompts, backbone.embed_dim
        self.segments = SEGMENTS
        self.segment_layout = segment_layout
        self.register_buffer("segment_index", segment_index(D, SEGMENTS, segment_layout), persistent=False)
        self.prompt_token_mask = nn.Parameter(torch.ones(P))
        self.prompt_segment_mask = nn.Parameter(torch.ones(P, SEGMENTS))
        self.pattern = pattern
        if pattern is not None:
            check_pattern(pattern, P)
            keep_tok, keep_seg = pattern_tensors(pattern, P)
            self.register_buffer("keep_tokens", keep_tok, persistent=False)
            self.register_buffer("keep_segments", keep_seg, persistent=False)
            train_masks = False
        else:
            self.keep_tokens = self.keep_segments = None
        self.prompt_token_mask.requires_grad = bool(train_masks)
        self.prompt_segment_mask.requires_grad = bool(train_masks)

    def prompt_mask(self) -> torch.Tensor:
        """(P, D) multiplier of the visual prompts (every layer)."""
        tok, seg = self.prompt_token_mask, self.prompt_segment_mask
        if self.keep_tokens is not None:
            tok, seg = tok * self.keep_tokens, seg * self.keep_segments
        return dense_mask(tok, seg, self.segment_index)

    def transform_prompts(self, prompts: torch.Tensor) -> torch.Tensor:
        return prompts * self.prompt_mask().to(prompts.dtype)

    def pruned_tokens(self) -> list[int]:
        return sorted({int(k) for k in self.pattern["pruned_tokens"]}) if self.pattern is not None else []

    def inference_variants(self) -> dict[str, nn.Module]:
        """+ ``compacted`` (a fixed pruning pattern): the pruned prompt tokens removed from the sequence, the
        kept ones with their pruned segments folded in (docs/methods/e2vpt.md §11)."""
        variants = super().inference_variants()
        if self.pattern is not None and self.foldable():
            pruned = set(self.pruned_tokens())
            variants["compacted"] = self.folded(keep=[k for k in range(self.num_prompts) if k not in pruned])
        return variants

    def prompt_layers(self) -> int:
        if self.num_prompts == 0:
            return 0
        return len(self.backbone.blocks) if self.deep_prompt_embeddings is not None else 1

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        P, D = self.num_prompts, self.backbone.embed_dim
        zeros = self.prompt_layers() * zero_entries_per_layer(self.pattern, P, D, self.segments)
        counts["tuned"] = counts["trainable"] - zeros  # docs/methods/e2vpt.md §5 (soft masking)
        counts["pruned_prompt_entries"] = zeros
        counts["kept_prompt_entries"] = self.prompt_layers() * P * D - zeros
        counts["mask_values"] = P * (1 + self.segments)
        return counts


def _as_count(name: str, value) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise OptionError(f"option {name!r}: expected a non-negative integer or 'auto', got {value!r}") from None
    if n < 0 or n != float(value):
        raise OptionError(f"option {name!r}: expected a non-negative integer, got {value!r}")
    return n


def check_prompt_lengths(opts: dict) -> dict:
    """The prompt lengths as counts (after the per-task ``auto`` values are resolved)."""
    return {**opts, **{key: _as_count(key, opts[key]) for key in ("prompt_tokens", "kv_tokens")}}


FGVC_BATCH_SIZE = 128  # the released FGVC commands (VTAB: 64, the recipe's)
FGVC_LR_GRID = tuple(lr for lr in VPT_LR_GRID if lr != 0.05)  # FGVC: the VTAB grid without 0.05
# under the vpt protocol, FGVC tasks get the E^2VPT FGVC batch size and lr grid (unless --batch-size / --lr
# say otherwise); the run records' option_sources say so
E2VPT_RECIPE = PROMPT_RECIPE.for_suite(
    "fgvc", "E^2VPT FGVC commands: batch 128, the VTAB lr grid without 0.05 (docs/methods/e2vpt.md §4)",
    batch_size=FGVC_BATCH_SIZE, lr_grid=FGVC_LR_GRID)


E2VPT_OPTIONS = {
    "prompt_tokens": Option("auto", "visual prompt tokens P per layer (auto: command.txt per-task value, "
                                    "docs/methods/e2vpt.md §6; else 10)", type=int, min=0,
                            per_task=PerTask(PROMPT_LENGTHS_FILE, FALLBACK_PROMPT_TOKENS, column="prompt_tokens")),
    "kv_tokens": Option("auto", "key-value prompt tokens L per attention layer (auto: command.txt per-task "
                                "value, docs/methods/e2vpt.md §6; else 5)", type=int, min=0,
                        per_task=PerTask(PROMPT_LENGTHS_FILE, FALLBACK_KV_TOKENS, column="kv_tokens")),
    "share_kv": Option(True, "one KV prompt tensor for keys and values (official SHARE_PARAM_KV=True); false: "
                             "separate K and V tensors (2x parameters)"),
    "dropout": Option(0.1, "dropout on the visual prompts (train mode only)", min=0.0, max=1.0),
    "kv_init": Option("kaiming", "KV prompt init: kaiming (ORIGIN_INIT=2, released commands), uniform "
                                 "(ORIGIN_INIT=0), trunc_normal (ORIGIN_INIT=1)", choices=KV_INITS),
}


@register_method
class E2vpt(Method):
    name = "e2vpt"
    aliases = ("e2vpt-origin",)
    description = "E^2VPT without pruning: deep visual prompts + key-value prompts, backbone frozen (docs/methods/e2vpt.md)"
    options = dict(E2VPT_OPTIONS)
    recipe = E2VPT_RECIPE  # SGD momentum 0.9, batch 64, 100 epochs, warm-up 10, lr x wd grid; FGVC batch 128
    fusable = True  # e2vpt-prune inherits it: its search stage fuses; later stages differ in options
    # Swin: VPT's Swin prompts + (heads, L, head_dim) key-value prompts in every window attention
    # (swin_transformer_prompt_VK.py; docs/methods/e2vpt.md §12)
    families = ("vit", "swin")

    def resolve_options(self, opts, task):
        opts, sources = super().resolve_options(opts, task)
        return check_prompt_lengths(opts), sources

    def build(self, backbone, num_classes, opts):
        if is_swin(backbone):
            if not opts.get("share_kv", True):
                raise OptionError("e2vpt on Swin: share_kv=false does not exist in the official Swin code "
                                  "(SHARE_PARAM_KV False raises, swin_transformer_prompt_VK.py:574-575)")
            kind = str(opts.get("kv_init", "kaiming"))
            patch = tuple(backbone.patch_embed.patch_size)
            return PromptedSwin(backbone, num_classes, _as_count("prompt_tokens", opts["prompt_tokens"]), deep=True,
                                dropout=float(opts.get("dropout", 0.1)),
                                kv_tokens=_as_count("kv_tokens", opts["kv_tokens"]),
                                kv_init=lambda t: init_kv_prompt(t, kind, patch))
        return E2vptModel(
            backbone, num_classes,
            prompt_tokens=_as_count("prompt_tokens", opts["prompt_tokens"]),
            kv_tokens=_as_count("kv_tokens", opts["kv_tokens"]),
            share_kv=bool(opts.get("share_kv", True)), dropout=float(opts.get("dropout", 0.1)),
            kv_init=str(opts.get("kv_init", "kaiming")))
