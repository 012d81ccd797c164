"""VAPT (docs/methods/vapt.md): the forward against a direct float64 computation of the official
PromptedTransformerAdaptive.forward_deep_prompt (Minhchuyentoancbn/VAPT@ff3e65b src/models/vit_prompt/vit.py:285-409,
with PromptDownSample, ChannelWiseConv2d and PromptMLP written out as that file computes them), the initialisation and
the counts."""
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


def block_ref(p, i, t, heads):
    q_ = f"blocks.{i}."
    b, n, d = t.shape
    h = layer_norm(t, p[q_ + "norm1.weight"], p[q_ + "norm1.bias"])
    q, k, v = linear(h, p[q_ + "attn.qkv.weight"], p[q_ + "attn.qkv.bias"]).reshape(b, n, 3, heads, d // heads) \
        .permute(2, 0, 3, 1, 4)
    o = (torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
    t = t + linear(o, p[q_ + "attn.proj.weight"], p[q_ + "attn.proj.bias"])
    h2 = layer_norm(t, p[q_ + "norm2.weight"], p[q_ + "norm2.bias"])
    return t + linear(gelu(linear(h2, p[q_ + "mlp.fc1.weight"], p[q_ + "mlp.fc1.bias"])),
                      p[q_ + "mlp.fc2.weight"], p[q_ + "mlp.fc2.bias"])


def vapt_reference(p, m, x, *, depth, heads, patch):
    """forward_deep_prompt in eval mode: the prompts after CLS; before block i >= 1, x_states = cat(CLS, patches),
    deep_prompt_norm[i-1], [:, 1:], (B, D, size, size), conv with the kernel expanded to every channel (groups = D),
    the linear over positions, then PromptMLP: out + W2 relu(W1 out)."""
    t = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=patch)
    size = t.shape[-1]
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([p["cls_token"].expand(x.shape[0], -1, -1), t], dim=1) + p["pos_embed"]
    n_tok = m.tokens
    t = torch.cat([t[:, :1], m.prompt_embeddings.detach().expand(x.shape[0], -1, -1), t[:, 1:]], dim=1)
    for i in range(depth):
        if i > 0:
            norm, maker = m.prompt_norms[i - 1], m.prompt_makers[i - 1]
            states = torch.cat([t[:, :1], t[:, 1 + n_tok:]], dim=1)
            states = layer_norm_eps(states, norm.weight.detach(), norm.bias.detach(), norm.eps)[:, 1:]
            B, _, D = states.shape
            grid = states.permute(0, 2, 1).reshape(B, D, size, size)
            kern = maker.kernel.detach()
            conv = F.conv2d(grid, kern.expand(D, 1, kern.shape[-1], kern.shape[-1]), groups=D)
            down = (conv.reshape(B, D, -1) @ maker.linear.weight.detach().T + maker.linear.bias.detach()).permute(0, 2, 1)
            w1, w2 = m.prompt_mlp.fc1.weight.detach(), m.prompt_mlp.fc2.weight.detach()
            prompts = down + torch.relu(down @ w1.T) @ w2.T
            t = torch.cat([t[:, :1], prompts, t[:, 1 + n_tok:]], dim=1)
        t = block_ref(p, i, t, heads)
    return layer_norm(t, p["norm.weight"], p["norm.bias"])[:, 0]


def layer_norm_eps(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def test_the_forward_is_the_official_adaptive_prompts_in_float64():
    model = build("vapt", tiny(), tokens=3, hidden=4, kernel=2).double()
    randomise(model, std=0.3)  # (the zero-initialised position map and the kernel away from their start)
    model.eval()
    x = inputs()
    with torch.no_grad():
        got = model.features(x)
        want = vapt_reference(weights(tiny()), model, x, **tiny_kwargs(tiny()))
    assert (got - want).abs().max().item() < 1e-12


def test_initialisation_and_counts_on_vit_b():
    torch.manual_seed(0)
    model = build("vapt", create_backbone("vit_base_patch16_224", pretrained=False))
    bound = math.sqrt(6.0 / (3 * 16 * 16 + 768))
    assert model.prompt_embeddings.shape == (1, 10, 768) and model.prompt_embeddings.abs().max() <= bound
    assert all(float(mk.linear.weight.abs().max()) == 0 for mk in model.prompt_makers)  # prompts start at 0 after block 0
    per_block = 2 * 768 + 2 * 2 + 13 * 13 * 10 + 10  # LayerNorm, the 2 x 2 kernel, positions -> tokens
    expected = 10 * 768 + 11 * per_block + 2 * 768 * 8
    assert model.parameter_counts()["trainable_without_head"] == expected == 55_608
    backbone_params = {n for n, q in model.backbone.named_parameters() if q.requires_grad}
    assert not backbone_params
