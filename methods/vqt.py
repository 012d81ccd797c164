"""VQT (Tu, Mai, Chao, "Visual Query Tuning: Towards Effective Usage of Intermediate Representations for Parameter
and Memory Efficient Transfer Learning", CVPR 2023; docs/methods/vqt.md), from the official code
(andytu28/VQT@9bca87e src/models/vit_backbones/h2t_vit.py). PETL_Vision's ``vqt`` collects the wrong tokens (its
queries get no gradient) and was not used.

Every block l gets T learned query tokens P_l that read the block's input X_{l-1} but are never read by it: they
are extra *queries* of the block's attention, whose keys and values come from the original tokens only; the
original tokens, hence the backbone's features, are unchanged. With P̃ = Dropout(P_l) (per sample):

    U_l = P̃ + Proj( MHA( Q = LN1(P̃) W_q + b_q, K = LN1(X_{l-1}) W_k + b_k, V = LN1(X_{l-1}) W_v + b_v ) )
    Z_l = U_l + MLP( LN2(U_l) )                          (the block's own modules; not propagated to block l + 1)
    f   = [ n(c), n(vec Z_1), ..., n(vec Z_L) ]          (c the final-norm CLS, n(v) = v / max(‖v‖, 1e-12))

and a linear head on f (width D·(1 + L·T)). The backbone runs without gradients: only the query paths are
back-propagated (the method's memory saving; the same logits and gradients as the official concatenated forward).
Parameters: L·T·D queries (9,216·T on ViT-B/16) + the head (D·(1 + 12T) + 1)·C.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.layers.timm_parts import vit_stem
from peftbench.layers.tuned_vit import make_head
from peftbench.methods import PROMPT_RECIPE, Method, Option, TunedViT, register_method


def query_outputs(block: nn.Module, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Z = U + MLP(LN2(U)), U = p + Proj(MHA(queries from LN1(p), keys and values from LN1(x))): the block's own
    modules (timm's Block / Attention), the queries attending to the original tokens only."""
    attn = block.attn
    b, t, d = p.shape
    n = x.shape[1]
    h, hd = attn.num_heads, attn.head_dim
    w_q, w_k, w_v = attn.qkv.weight.chunk(3, dim=0)
    b_q, b_k, b_v = attn.qkv.bias.chunk(3) if attn.qkv.bias is not None else (None, None, None)
    hp, hx = block.norm1(p), block.norm1(x)
    q = attn.q_norm(F.linear(hp, w_q, b_q).reshape(b, t, h, hd).transpose(1, 2))
    k = attn.k_norm(F.linear(hx, w_k, b_k).reshape(b, n, h, hd).transpose(1, 2))
    v = F.linear(hx, w_v, b_v).reshape(b, n, h, hd).transpose(1, 2)
    a = torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1) @ v
    u = p + block.ls1(attn.proj(attn.norm(a.transpose(1, 2).reshape(b, t, h * hd))))
    return u + block.ls2(block.mlp(block.norm2(u)))


class VQTViT(TunedViT):
    """The frozen ViT, the per-layer query tokens (``queries``: L × T × D) and a head on the concatenated feature."""

    def __init__(self, backbone: nn.Module, num_classes: int, tokens: int, dropout: float):
        depth, width = len(backbone.blocks), backbone.embed_dim
        super().__init__(backbone, num_classes, head=make_head(width * (1 + depth * tokens), num_classes))
        patch = backbone.patch_embed.patch_size[0]
        bound = math.sqrt(6.0 / (3 * patch * patch + width))  # VPT's prompt init (h2t_vit.py:264-269): 0.0625
        self.queries = nn.Parameter(torch.empty(depth, tokens, width).uniform_(-bound, bound))
        self.query_dropout = nn.Dropout(dropout)
        self.train_modules.append(self.query_dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        with torch.no_grad():  # the frozen backbone: no graph (its inputs to each block are all the queries need)
            z = vit_stem(bb, x)
            inputs = []
            for block in bb.blocks:
                inputs.append(z)
                z = block(z)
            c = bb.forward_head(bb.norm(z), pre_logits=True)
        parts = [F.normalize(c, dim=-1)]
        for i, (block, xi) in enumerate(zip(bb.blocks, inputs)):
            p = self.query_dropout(self.queries[i].unsqueeze(0).expand(x.shape[0], -1, -1))
            zq = query_outputs(block, p, xi)
            parts.append(F.normalize(zq.flatten(1), dim=-1))  # the layer's T tokens normalised together
        return torch.cat(parts, dim=-1)


@register_method
class Vqt(Method):
    name = "vqt"
    description = ("VQT: per-layer query tokens read each block's input (never read by it); the head sees their "
                   "outputs beside the CLS (docs/methods/vqt.md)")
    version = 1
    # the official VTAB search: SGD (VPT's code), lr {1, 0.5, 0.25, 0.1, 0.05} x wd {0.01, 1e-3, 1e-4, 0}: VPT's grid
    # shape, as the prompt methods (docs/methods/vqt.md §6)
    # demo lr: the best mean val200 top-1 over the 5 demo tasks (results/demo-hparam-search.csv)
    recipe = PROMPT_RECIPE.for_protocol("demo", lr=1.0)
    options = {
        "tokens": Option(10, "T query tokens per layer (the official scripts use 1, 10 or 20 per task)", min=1),
        "dropout": Option(0.1, "dropout on the query tokens (per sample, token and channel)", min=0.0, max=1.0),
    }

    def build(self, backbone, num_classes, opts):
        return VQTViT(backbone, num_classes, int(opts["tokens"]), float(opts["dropout"]))
