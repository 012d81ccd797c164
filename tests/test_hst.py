"""HST (docs/methods/hst.md): the forward against a direct float64 computation of the official ViT_HSN.forward_features
+ forward (AFeng-x/HST@ee89571 models/vit_hsn.py:395-465, vit_custom_modules.py: Head, OverlapPatchEmbed, M_Block,
M_C_Attention, Mlp_LE) written out from the model's tensors, what trains, and the counts."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from helpers import TINY_BACKBONE, ensure_registered
from petl_reference import build, gelu, inputs, layer_norm, linear, randomise, tiny_kwargs, weights

from peftbench.backbones import create_backbone

ensure_registered()


def tiny():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_backbone(TINY_BACKBONE, pretrained=False).double()


def ln(x, mod):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias


def vit_block(p, i, t, heads, trained_norms):
    q_ = f"blocks.{i}."
    b, n, d = t.shape
    n1, n2 = trained_norms[i]
    h = layer_norm(t, n1.weight, n1.bias)
    q, k, v = linear(h, p[q_ + "attn.qkv.weight"], p[q_ + "attn.qkv.bias"]).reshape(b, n, 3, heads, d // heads) \
        .permute(2, 0, 3, 1, 4)
    o = (torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
    t = t + linear(o, p[q_ + "attn.proj.weight"], p[q_ + "attn.proj.bias"])
    h2 = layer_norm(t, n2.weight, n2.bias)
    return t + linear(gelu(linear(h2, p[q_ + "mlp.fc1.weight"], p[q_ + "mlp.fc1.bias"])),
                      p[q_ + "mlp.fc2.weight"], p[q_ + "mlp.fc2.bias"])


def side_block(blk, x, kv, vit):
    """M_Block.forward in eval mode: M_C_Attention with separate q, k, v, then + x_vit, then Mlp_LE."""
    b, n, c = x.shape
    h = blk.heads
    y = ln(x, blk.norm1)
    q = linear(y, blk.q.weight, blk.q.bias).reshape(b, n, h, c // h).permute(0, 2, 1, 3)
    k = linear(kv, blk.k.weight, blk.k.bias).reshape(b, -1, h, c // h).permute(0, 2, 1, 3)
    v = linear(kv, blk.v.weight, blk.v.bias).reshape(b, -1, h, c // h).permute(0, 2, 1, 3)
    a = ((q @ k.transpose(-2, -1)) * (c // h) ** -0.5).softmax(dim=-1)
    x = x + linear((a @ v).transpose(1, 2).reshape(b, n, c), blk.proj.weight, blk.proj.bias)
    x = x + vit
    return x + linear(gelu(linear(ln(x, blk.norm2), blk.fc1.weight, blk.fc1.bias)), blk.fc2.weight, blk.fc2.bias)


def hst_reference(m, p, x, *, depth, heads, patch):
    b = x.shape[0]
    t = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=patch)
    gh, gw = t.shape[-2:]
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([p["cls_token"].expand(b, -1, -1), t], dim=1) + p["pos_embed"]
    norms = [(blk.norm1, blk.norm2) for blk in m.backbone.blocks]
    meta_g = m.meta_tokens
    metas, feats = [], []
    for i in range(depth):
        t = torch.cat([m.meta[i].unsqueeze(0).expand(b, -1, -1), t], dim=1)
        t = vit_block(p, i, t, heads, norms)
        metas.append(t[:, :meta_g])
        feats.append(t[:, meta_g + 1:].transpose(1, 2).reshape(b, -1, gh, gw))
        t = t[:, meta_g:]
    for i in range(depth):  # metaG_array: T_Bridge of the stage, then m_proj_norm
        st = i // m.per_stage
        metas[i] = ln(linear(metas[i], m.bridges[st].weight, m.bridges[st].bias), m.meta_norms[i])
    s = x
    for st in range(len(m.dims)):
        emb = m.embeds[st]
        if st == 0:  # Head: conv, BatchNorm (eval: running stats), ReLU, conv, LayerNorm
            y = F.conv2d(s, emb.conv1.weight, None, stride=2, padding=1)
            y = F.batch_norm(y, emb.bn.running_mean, emb.bn.running_var, emb.bn.weight, emb.bn.bias, False, 0.0, emb.bn.eps)
            y = F.conv2d(F.relu(y), emb.conv2.weight, emb.conv2.bias, stride=2)
        else:
            y = F.conv2d(s, emb.proj.weight, emb.proj.bias, stride=2, padding=1)
        h, w = y.shape[-2:]
        s = ln(y.flatten(2).transpose(1, 2), emb.norm)
        br = m.bridges[st]
        for j, blk in enumerate(m.side[st]):
            i = st * m.per_stage + j
            feat = linear(F.interpolate(feats[i], size=(h, w), mode="bilinear", align_corners=False).flatten(2)
                          .transpose(1, 2), br.weight, br.bias)
            s = side_block(blk, s, torch.cat([metas[i], feat.mean(dim=1, keepdim=True)], dim=1), feat)
        s = ln(s, m.stage_norms[st])
        if st < len(m.dims) - 1:
            s = s.reshape(b, h, w, -1).permute(0, 3, 1, 2)
    pooled = s.mean(dim=1)
    bn = m.fc_norm
    return (pooled - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)


def test_the_forward_is_the_official_side_network_in_float64():
    model = build("hst", tiny()).double()  # 3 blocks: 3 stages of one block each
    randomise(model, std=0.3)
    with torch.no_grad():  # running statistics away from their start
        for mod in model.modules():
            if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = inputs()
    with torch.no_grad():
        got = model.features(x)
        want = hst_reference(model, weights(tiny()), x, **tiny_kwargs(tiny()))
    assert len(model.dims) == 3 and (got - want).abs().max().item() < 1e-12


def side_count(dims):
    """Every side parameter of the 4-stage HST on ViT-B/16: stems, side blocks (12 d^2 + 13 d each), stage norms."""
    n = 3 * dims[0] * 9 + 2 * dims[0] + dims[0] * dims[0] * 4 + dims[0] + 2 * dims[0]  # Head: conv, BN, conv, LN
    for a, c in zip(dims, dims[1:]):
        n += 9 * a * c + c + 2 * c  # OverlapPatchEmbed: conv 3x3 with bias, LN
    n += sum(3 * (12 * d * d + 13 * d) + 2 * d for d in dims)  # 3 M_Blocks and m_norm per stage
    return n


def test_what_trains_and_the_count_on_vit_b():
    torch.manual_seed(0)
    model = build("hst", create_backbone("vit_base_patch16_224", pretrained=False), num_classes=100)
    dims = (32, 48, 64, 72)
    trained_backbone = {n for n, q in model.backbone.named_parameters() if q.requires_grad}
    assert trained_backbone == {f"blocks.{i}.norm{k}.{w}" for i in range(12) for k in (1, 2) for w in ("weight", "bias")}
    expected = (12 * 768  # meta tokens
                + 768 * sum(dims) + sum(dims)  # T_Bridge_1..4
                + sum(2 * dims[i // 3] for i in range(12))  # m_proj_norm1..12
                + 12 * 2 * 2 * 768  # the ViT blocks' LayerNorms
                + side_count(dims))
    assert model.parameter_counts()["trainable_without_head"] == expected
    assert model.head.in_features == 72 and model.parameter_counts()["head"] == 73 * 100
