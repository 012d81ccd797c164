"""HST (Lin et al., "Hierarchical Side-Tuning for Vision Transformers"; docs/methods/hst.md), from the official code
(AFeng-x/HST@ee89571 ``models/vit_hsn.py``: ``ViT_HSN``; ``models/vit_custom_modules.py``: ``Head``,
``OverlapPatchEmbed``, ``M_Block``, ``M_C_Attention``, ``Mlp_LE``).

A frozen ViT and a small hierarchical side network (4 stages of widths 32, 48, 64, 72 on ViT-B) that reads it:

* before every ViT block a learned meta token is prepended (and taken out after the block: its output is that block's
  "meta" summary); the block's patch-token output is kept as a feature map;
* the side network starts from the image (a conv stem; later stages a stride-2 overlapping patch embedding) and runs,
  per ViT block of its stage, one side block: cross-attention from the side tokens to [the block's meta token, the mean
  of its patch tokens] (both through the stage's ``T_Bridge`` Linear, the meta token then a LayerNorm), the block's
  patch features resized to the side grid (bilinear) and bridged, added, then an MLP;
* the side network's last stage is averaged over its tokens, batch-normalised without affine parameters and
  classified.

Trained (``ViT_HSN.freeze_vit``): the side network, the meta tokens, the bridges, every LayerNorm of the ViT's blocks,
and the head. The ViT's final LayerNorm and CLS output are not used.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.layers.timm_parts import vit_stem
from peftbench.methods import Method, Option, Recipe, TunedViT, register_method

DIMS, HEADS = (32, 48, 64, 72), (2, 4, 8, 12)  # vit_hsn.py:150 (m_embed_dims, m_c_num_heads)


def _conv_init(m: nn.Conv2d) -> None:
    """The side modules' own conv init (vit_custom_modules.py: normal(0, sqrt(2 / (k·k·out / groups))), bias 0)."""
    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
    nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def _linear_init(m: nn.Module) -> None:
    """timm's init_weights_vit_timm, which ViT_HSN.init_weights applies to every Linear: trunc-normal 0.02, bias 0."""
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            nn.init.trunc_normal_(mod.weight, std=0.02)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


class Stem(nn.Module):
    """``Head``: conv 3×3 stride 2 (no bias), BatchNorm, ReLU, conv 2×2 stride 2, then LayerNorm over the tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, dim, 3, 2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(dim)
        _conv_init(self.conv1)
        _conv_init(self.conv2)

    def forward(self, x):
        x = self.conv2(F.relu(self.bn(self.conv1(x))))
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class Downsample(nn.Module):
    """``OverlapPatchEmbed(patch_size=3, stride=2)``: conv 3×3 stride 2 padding 1, LayerNorm over the tokens."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(cout)
        _conv_init(self.proj)

    def forward(self, x):
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class SideBlock(nn.Module):
    """``M_Block``: x + CrossAttn(LN1 x, kv) ; + the bridged ViT features ; + MLP(LN2 x) (drop path on both branches)."""

    def __init__(self, dim: int, heads: int, drop_path: float):
        super().__init__()
        from timm.layers import DropPath

        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.heads = heads
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def attn(self, x, kv):
        b, n, c = x.shape
        h = self.heads
        q = self.q(x).reshape(b, n, h, c // h).transpose(1, 2)
        k = self.k(kv).reshape(b, -1, h, c // h).transpose(1, 2)
        v = self.v(kv).reshape(b, -1, h, c // h).transpose(1, 2)
        att = ((q @ k.transpose(-2, -1)) * (c // h) ** -0.5).softmax(dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, c))

    def forward(self, x, kv, vit):
        x = x + self.drop_path(self.attn(self.norm1(x), kv))
        x = x + vit
        return x + self.drop_path(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class HSTModel(TunedViT):
    def __init__(self, backbone: nn.Module, num_classes: int, dims: tuple[int, ...], heads: tuple[int, ...],
                 meta_tokens: int, drop_path: float):
        depth, width = len(backbone.blocks), backbone.embed_dim
        stages = len(dims)
        if depth % stages:
            raise ValueError(f"hst: {depth} blocks do not split into {stages} stages (--set hst.stages=...)")
        super().__init__(backbone, num_classes, head=nn.Linear(dims[-1], num_classes))
        per = depth // stages
        self.per_stage, self.dims, self.meta_tokens = per, dims, meta_tokens
        bound = math.sqrt(6.0 / ((meta_tokens + 1) * width))  # xavier-uniform on (1, G, D)
        self.meta = nn.Parameter(torch.empty(depth, meta_tokens, width).uniform_(-bound, bound))
        self.bridges = nn.ModuleList(nn.Linear(width, d) for d in dims)  # T_Bridge_1..4
        self.meta_norms = nn.ModuleList(nn.LayerNorm(dims[i // per]) for i in range(depth))  # m_proj_norm1..12
        self.embeds = nn.ModuleList([Stem(dims[0])] + [Downsample(dims[i - 1], dims[i]) for i in range(1, stages)])
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]  # dpr_new: linspace(0, rate, depth)
        self.side = nn.ModuleList(nn.ModuleList(SideBlock(dims[s], heads[s], rates[s * per + j]) for j in range(per))
                                  for s in range(stages))
        self.stage_norms = nn.ModuleList(nn.LayerNorm(d, eps=1e-6) for d in dims)
        self.fc_norm = nn.BatchNorm1d(dims[-1], affine=False, eps=1e-6)
        _linear_init(self.bridges)
        _linear_init(self.side)
        _linear_init(self.head)
        tuned = [self.bridges, self.meta_norms, self.embeds, self.side, self.stage_norms, self.fc_norm]
        self.train_inserted(tuned)
        for blk in backbone.blocks:  # freeze_vit: 'block' and 'norm' in the name
            for norm in (blk.norm1, blk.norm2):
                norm.requires_grad_(True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.backbone
        image = x
        b = x.shape[0]
        g, n = self.meta_tokens, vit.num_prefix_tokens
        gh, gw = vit.patch_embed.grid_size
        t = vit_stem(vit, x)
        metas, feats = [], []
        for i, block in enumerate(vit.blocks):
            t = block(torch.cat([self.meta[i].unsqueeze(0).expand(b, -1, -1).to(t.dtype), t], dim=1))
            metas.append(t[:, :g])
            feats.append(t[:, g + n:].transpose(1, 2).reshape(b, -1, gh, gw))
            t = t[:, g:]
        s = image
        for st, (embed, blocks, norm, bridge) in enumerate(zip(self.embeds, self.side, self.stage_norms, self.bridges)):
            s, h, w = embed(s)
            for j, blk in enumerate(blocks):
                i = st * self.per_stage + j
                meta = self.meta_norms[i](bridge(metas[i]))
                feat = bridge(F.interpolate(feats[i], size=(h, w), mode="bilinear", align_corners=False)
                              .flatten(2).transpose(1, 2))
                s = blk(s, torch.cat([meta, feat.mean(dim=1, keepdim=True)], dim=1), feat)
            s = norm(s)
            if st < len(self.embeds) - 1:
                s = s.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return self.fc_norm(s.mean(dim=1))


@register_method
class Hst(Method):
    name = "hst"
    description = ("HST: a hierarchical side network reading the frozen ViT's per-block meta tokens and patch features, "
                   "the ViT's LayerNorms trained (docs/methods/hst.md)")
    # train_scripts/vit/vtab/<task>/train_s4.sh: AdamW, 100 epochs, 10 warm-up, batch 32 x 2 GPUs, per-task lr; the
    # unified protocols train it as the NOAH-lineage AdamW methods (demo lr 0.04, not searched for hst)
    recipe = Recipe(optimizer="adamw", batch_size=64, epochs=100, warmup_epochs=10, lr_grid=(0.004, 0.02, 0.04),
                    wd_grid=(0.0001,)).for_protocol("demo", lr=0.04, wd=0.0001, batch_size=64)
    options = {
        "stages": Option("auto", "side stages (auto: 4 when the depth divides by 4, else 3, 2 or 1; ViT-B: 4)",
                         type=int, min=1, max=4, keywords=("auto",)),
        "meta_tokens": Option(1, "meta tokens per block (metaG_num)", min=1),
        "drop_path": Option(0.0, "stochastic depth of the side blocks (the per-task scripts: 0 to 0.2)", min=0.0,
                            max=1.0),
    }

    def build(self, backbone, num_classes, opts):
        depth = len(backbone.blocks)
        stages = opts["stages"]
        if stages == "auto":
            stages = next(s for s in (4, 3, 2, 1) if depth % s == 0)
        stages = int(stages)
        return HSTModel(backbone, num_classes, DIMS[:stages], HEADS[:stages], int(opts["meta_tokens"]),
                        float(opts["drop_path"]))
