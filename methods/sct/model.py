"""SCT's model and saliency (showlab/SCT@384cecb models/vision_transformer_sct.py, train_model_sct.py;
docs/methods/sct.md).

In every block, between the attention's residual add and the MLP sub-layer, the K selected channels S of the
residual stream a (every token, CLS included) go through one K×K linear map with bias, added back:

    a[..., S] ← a[..., S] + a[..., S] Wᵀ + b        (W trunc-normal std 0.02, b = 0; no scale, no dropout)

so both the MLP's input and the skip connection see it. The channels of block l are the K largest of the saliency
score of the *pretrained* ViT on the training split, read at the input of ``blocks[l].norm2`` (patch tokens only):

    s_l[j] = mean over the classes c present of sqrt( Σ_{images of class c} Σ_{patch tokens} h_l[·, ·, j]² )
"""
from __future__ import annotations

import torch
from torch import nn

from peftbench.methods import TunedViT


class SCTBlock(nn.Module):
    """A frozen timm ViT block (``.block``) with SCT's channel module after its attention residual add.

    ``drop_path1`` / ``drop_path2`` are the block's own modules, referenced here so that a recipe's stochastic depth
    (peftbench.layers.timm_parts.add_drop_path, which sets them by name) reaches the wrapped forward."""

    def __init__(self, block: nn.Module, channels: int):
        super().__init__()
        width = block.norm2.normalized_shape[0]
        if not 1 <= channels <= width:
            raise ValueError(f"sct: channels {channels} must be within the block's width 1..{width}")
        self.block = block
        self.drop_path1, self.drop_path2 = block.drop_path1, block.drop_path2
        self.linear = nn.Linear(channels, channels)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)  # timm's init_weights_vit_timm redraw (std 0.02, bias 0)
        nn.init.zeros_(self.linear.bias)
        # the selected channels (ascending): the saliency job's artifact replaces these placeholders (init_state)
        self.register_buffer("index", torch.arange(channels))
        self.enabled = True  # False: the pretrained block (the saliency pass)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        x = x + self.drop_path1(b.ls1(b.attn(b.norm1(x))))
        if self.enabled:
            x = x.index_add(-1, self.index, self.linear(x.index_select(-1, self.index)))
        return x + self.drop_path2(b.ls2(b.mlp(b.norm2(x))))


class SCTModel(TunedViT):
    """The frozen ViT with an :class:`SCTBlock` in place of every block, and the head."""

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int):
        super().__init__(backbone, num_classes)
        for i, block in enumerate(backbone.blocks):
            backbone.blocks[i] = SCTBlock(block, channels)
        self.channels = int(channels)

    def sct_blocks(self) -> list[SCTBlock]:
        return list(self.backbone.blocks)

    def index_buffer_names(self) -> list[str]:
        """The model's buffer of each block's selected channels (the saliency artifact's keys)."""
        return [f"backbone.blocks.{i}.index" for i in range(len(self.backbone.blocks))]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors and the selection they act on (a saved model is complete)."""
        state = super().trainable_state()
        buffers = dict(self.named_buffers())
        state.update({n: buffers[n].detach() for n in self.index_buffer_names()})
        return state


@torch.no_grad()
def saliency(model: SCTModel, batches, prepare) -> tuple[torch.Tensor, list[int]]:
    """(L, D) scores of every channel of every block from the pretrained ViT (the SCT modules off, eval mode) on
    ``batches`` of (uint8 images, labels); and the classes present. Sums of squares in float64."""
    blocks = model.sct_blocks()
    npt = model.backbone.num_prefix_tokens
    sums: dict[int, torch.Tensor] = {}  # class -> (L, D) Σ h² over its images and patch tokens
    seen: list[torch.Tensor] = []

    def hook(i):
        def read(module, args):
            seen.append((i, args[0][:, npt:].double().pow(2).sum(dim=1)))  # (B, D) per image
        return read

    handles = [blk.block.norm2.register_forward_pre_hook(hook(i)) for i, blk in enumerate(blocks)]
    was = [blk.enabled for blk in blocks]
    for blk in blocks:
        blk.enabled = False
    model.eval()
    try:
        for x, y in batches:
            seen.clear()
            model.features(prepare(x))
            per_block = torch.stack([v for _, v in sorted(seen, key=lambda t: t[0])])  # (L, B, D)
            for c in torch.unique(y).tolist():
                part = per_block[:, (y == c).to(per_block.device)].sum(dim=1).cpu()
                sums[c] = sums[c] + part if c in sums else part
    finally:
        for h in handles:
            h.remove()
        for blk, flag in zip(blocks, was):
            blk.enabled = flag
    classes = sorted(sums)
    scores = torch.stack([sums[c].sqrt() for c in classes]).mean(dim=0)  # mean over classes of the per-class norms
    return scores, classes


def top_channels(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(L, k) ascending channel indices of the k largest scores of every block; a tie at the boundary goes to the
    lower channel (the official strict threshold drops every tied channel and then fails on the shape)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)  # stable: equal scores keep index order
    return order[:, :k].sort(dim=-1).values
