"""CVPT (docs/methods/cvpt.md): the forward against a direct float64 computation of the official CvptBlock with its
CrossAttention holding copies of the block's pretrained query, key, value and out weights (Lingyun0419/CVPT@2fc9877
CVPT.py:232-285, 517-536), the prompts' initialisation bound, the counts and the released per-task prompt numbers."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import TINY_BACKBONE, ensure_registered
from petl_reference import build, inputs, randomise, reference_features, tiny_kwargs, weights

from peftbench.backbones import create_backbone
from peftbench.methods import get_method
from peftbench.tasks import get_task

ensure_registered()


def tiny():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_backbone(TINY_BACKBONE, pretrained=False).double()


def official_cross(p: dict, i: int, x: torch.Tensor, prompts: torch.Tensor, heads: int) -> torch.Tensor:
    """CrossAttention.forward with q/k/v/proj copied from block i's attention (separate Linear layers)."""
    d = x.shape[-1]
    w, b = p[f"blocks.{i}.attn.qkv.weight"], p[f"blocks.{i}.attn.qkv.bias"]
    wq, wk, wv = w[:d], w[d:2 * d], w[2 * d:]
    bq, bk, bv = b[:d], b[d:2 * d], b[2 * d:]
    B, N1, C = x.shape
    N2 = prompts.shape[1]
    q = (x @ wq.T + bq).view(B, N1, heads, C // heads).permute(0, 2, 1, 3)
    k = (prompts @ wk.T + bk).view(B, N2, heads, C // heads).permute(0, 2, 3, 1)
    v = (prompts @ wv.T + bv).view(B, N2, heads, C // heads).permute(0, 2, 1, 3)
    att = ((q @ k) * (C // heads) ** -0.5).softmax(dim=-1)
    o = (att @ v).transpose(1, 2).reshape(B, N1, C)
    return o @ p[f"blocks.{i}.attn.proj.weight"].T + p[f"blocks.{i}.attn.proj.bias"]


@pytest.mark.parametrize("insert", [3, 5])
def test_the_forward_is_the_official_block_in_float64(insert):
    model = build("cvpt", tiny(), prompt_tokens=4, insert=insert).double()
    randomise(model, std=0.3)
    model.eval()
    p = weights(tiny())
    kw = tiny_kwargs(tiny())
    prompts = model.prompts.detach()
    x = inputs()

    def cross(i, t):
        return official_cross(p, i, t, prompts[i].unsqueeze(0).expand(t.shape[0], -1, -1), kw["heads"])

    if insert == 3:  # x + Attn(LN1 x), then + CrossAttn(that, P)
        hooks = {("attn_branch", i): (lambda t, h, f, i=i: f + cross(i, t + f)) for i in range(kw["depth"])}
    else:  # after the MLP's residual add
        hooks = {("mlp_branch", i): (lambda t, h, f, i=i: f + cross(i, t + f)) for i in range(kw["depth"])}
    with torch.no_grad():
        got = model.features(x)
        want = reference_features(p, x, hooks, **kw)
    assert (got - want).abs().max().item() < 1e-12


def test_prompts_are_xavier_on_the_depth_tokens_width_tensor_and_alone_train():
    torch.manual_seed(0)
    model = build("cvpt", create_backbone("vit_base_patch16_224", pretrained=False), prompt_tokens=10)
    bound = math.sqrt(6.0 / ((10 + 12) * 768))
    assert model.prompts.shape == (12, 10, 768) and model.prompts.abs().max() <= bound
    assert model.prompts.abs().max() > 0.9 * bound
    trained = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trained == {"prompts", "head.weight", "head.bias"}
    assert model.parameter_counts()["trainable_without_head"] == 12 * 10 * 768


def test_the_released_prompt_numbers_per_task():
    m = get_method("cvpt")
    for task, tokens in (("cifar100", 10), ("caltech101", 200), ("patch_camelyon", 1), ("stanford_cars", 100)):
        opts, sources = m.resolve_options(m.parse_options({}), get_task(task))
        assert opts["prompt_tokens"] == tokens and "configs/" in sources["prompt_tokens"], task
    opts, _ = m.resolve_options(m.parse_options({}), get_task("demo_digits"))
    assert opts["prompt_tokens"] == 10
