"""VAPT (Le et al., "Revisit Visual Prompt Tuning: The Expressiveness of Prompt Experts", ICLR 2026; docs/methods/
vapt.md), from the official code (Minhchuyentoancbn/VAPT@ff3e65b ``src/models/vit_prompt/vit.py``:
``PromptedTransformerAdaptive``, ``PromptDownSample``, ``ChannelWiseConv2d``, ``PromptMLP``; defaults from
``src/configs/config.py``).

VPT-deep whose prompts after the first block are made from the image: before block i ≥ 1, the patch tokens entering it
go through a LayerNorm of block i, a k × k depthwise convolution with one kernel shared by every channel, channel
dropout (0.1), a linear map from the H'W' positions to the N prompt tokens (zero-initialised: the prompts start at 0),
and a residual MLP shared by every block (D → h → D, ReLU, no biases, dropout 0.1 after the ReLU); the result replaces
the N prompt tokens. Block 0's prompts are learned tokens as in VPT (uniform ±sqrt(6 / (3·p² + D)), prompt dropout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.layers.prompted_vit import prompt_init_bound
from peftbench.layers.timm_parts import vit_stem
from peftbench.methods import PROMPT_RECIPE, Method, Option, TunedViT, register_method


class PromptFromPatches(nn.Module):
    """``PromptDownSample`` (vit.py:535-576): (B, D, H, W) → (B, N, D) before the shared MLP."""

    def __init__(self, grid: tuple[int, int], tokens: int, kernel: int):
        super().__init__()
        h, w = grid
        if kernel > min(h, w):
            raise ValueError(f"vapt: kernel {kernel} is larger than the {h} x {w} patch grid")
        self.kernel = nn.Parameter(torch.randn(1, 1, kernel, kernel))  # ChannelWiseConv2d: one kernel, every channel
        self.linear = nn.Linear((h - kernel + 1) * (w - kernel + 1), tokens)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.dropout = nn.Dropout2d(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        k = self.kernel.shape[-1]
        x = F.conv2d(x, self.kernel.expand(c, 1, k, k), groups=c)
        return self.linear(self.dropout(x).reshape(b, c, -1)).transpose(1, 2)


class PromptMLP(nn.Module):
    """``PromptMLP`` (vit.py:444-497): x + W2 Dropout(ReLU(W1 x)), no biases."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.dropout(F.relu(self.fc1(x))))


class VAPTModel(TunedViT):
    def __init__(self, backbone: nn.Module, num_classes: int, tokens: int, hidden: int, kernel: int, dropout: float,
                 mlp_dropout: float):
        super().__init__(backbone, num_classes)
        depth, dim = len(backbone.blocks), backbone.embed_dim
        if tokens < 1:
            raise ValueError(f"vapt: tokens must be at least 1, got {tokens}")
        self.tokens = tokens
        self.grid = tuple(backbone.patch_embed.grid_size)
        bound = prompt_init_bound(backbone)
        self.prompt_embeddings = nn.Parameter(torch.empty(1, tokens, dim).uniform_(-bound, bound))
        self.prompt_dropout = nn.Dropout(dropout)
        self.prompt_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth - 1))
        self.prompt_makers = nn.ModuleList(PromptFromPatches(self.grid, tokens, kernel) for _ in range(depth - 1))
        self.prompt_mlp = PromptMLP(dim, hidden, mlp_dropout)
        self.train_modules += [self.prompt_dropout, self.prompt_mlp, *self.prompt_makers]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.backbone
        x = vit_stem(vit, x)
        n, t = vit.num_prefix_tokens, self.tokens
        b = x.shape[0]
        x = torch.cat([x[:, :n], self.prompt_dropout(self.prompt_embeddings.expand(b, -1, -1)).to(x.dtype), x[:, n:]],
                      dim=1)
        for i, block in enumerate(vit.blocks):
            if i > 0:
                patches = self.prompt_norms[i - 1](x[:, n + t:])  # (the LayerNorm is per token: CLS left out first)
                grid = patches.transpose(1, 2).reshape(b, -1, *self.grid)
                prompts = self.prompt_mlp(self.prompt_makers[i - 1](grid))
                x = torch.cat([x[:, :n], prompts, x[:, n + t:]], dim=1)
            x = block(x)
        x = vit.norm(x)
        return vit.forward_head(x, pre_logits=True)


@register_method
class Vapt(Method):
    name = "vapt"
    description = ("VAPT: VPT-deep whose prompts after block 0 are made from the patch tokens by a shared-kernel "
                   "convolution and a shared MLP (docs/methods/vapt.md)")
    recipe = PROMPT_RECIPE  # VAPT trains with VPT's code and search (tune_vtab.py, configs/base-prompt.yaml)
    fusable = True
    options = {
        "tokens": Option(10, "prompt tokens N (README's VTAB example: 10; config default 5)", min=1),
        "hidden": Option(8, "hidden width h of the shared MLP (HIDDEN_DIM)", min=1),
        "kernel": Option(2, "k of the shared k x k depthwise kernel (KERNEL)", min=1),
        "dropout": Option(0.1, "dropout on block 0's prompts (README's VTAB example: 0.1; config default 0)",
                          min=0.0, max=1.0),
        "mlp_dropout": Option(0.1, "dropout after the MLP's ReLU (DROPOUT_MLP)", min=0.0, max=1.0),
    }

    def build(self, backbone, num_classes, opts):
        return VAPTModel(backbone, num_classes, int(opts["tokens"]), int(opts["hidden"]), int(opts["kernel"]),
                         float(opts["dropout"]), float(opts["mlp_dropout"]))
