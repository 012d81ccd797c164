"""Deep prompts folded into fixed keys/values (layers/prompt_folding.py), and E^2VPT's compacted pruned model:
the same logits as the prompted model (float64, 1e-10), fewer tokens, fewer FLOPs."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch

from peftbench.bench.speed import _flops, _tokens
from peftbench.layers.prompt_folding import FoldedPromptViT, PrefixAttention, attend_with_prefix, prompt_key_values
from peftbench.methods import get_method


def _backbone(pool="token"):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=3, num_heads=3, num_classes=0, global_pool=pool)


def _model(name, opts, backbone=None, seed=0):
    m = get_method(name)
    o, _ = m.resolve_options(m.parse_options({}), None)
    o.update(opts)
    torch.manual_seed(seed)
    model = m.build(backbone or _backbone(), 5, o).double()
    with torch.no_grad():  # every trained tensor off its init, the masks stay 0/1
        for n, p in model.named_parameters():
            if p.requires_grad or "prompt" in n and "mask" not in n:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _reference_attention(a, x, pk, pv, bias):
    """softmax([q k_prefix^T + bias, q K^T] / ...) [V_prefix; V], spelled out per head (float64)."""
    B, N, D = x.shape
    H, hd = a.num_heads, a.head_dim
    W, b = a.qkv.weight, a.qkv.bias
    q = (x @ W[:D].T + b[:D]).view(B, N, H, hd).transpose(1, 2)
    k = (x @ W[D:2 * D].T + b[D:2 * D]).view(B, N, H, hd).transpose(1, 2)
    v = (x @ W[2 * D:].T + b[2 * D:]).view(B, N, H, hd).transpose(1, 2)
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], 2)
    vals = torch.cat([pv.expand(B, -1, -1, -1), v], 2)
    logits = q @ keys.transpose(-1, -2) / math.sqrt(hd)
    logits[..., :pk.shape[1]] += bias
    out = torch.softmax(logits, -1) @ vals
    return a.proj(out.transpose(1, 2).reshape(B, N, D))


def test_prefix_attention_equals_explicit_softmax_with_log_count_bias():
    torch.manual_seed(0)
    a = _backbone().blocks[0].attn.double().eval()
    x = torch.randn(2, 7, 48, dtype=torch.float64)
    pk, pv = torch.randn(3, 4, 16, dtype=torch.float64), torch.randn(3, 4, 16, dtype=torch.float64)
    bias = torch.tensor([0.0, math.log(3), 0.0, math.log(2)], dtype=torch.float64)
    got = PrefixAttention(a, pk, pv, bias)(x)
    assert torch.allclose(got, _reference_attention(a, x, pk, pv, bias), atol=1e-12, rtol=0)
    # an entry with offset log(n) weighs as n copies of itself
    dup_k = torch.cat([pk[:, :1], pk[:, 1:2], pk[:, 1:2], pk[:, 1:2], pk[:, 2:3], pk[:, 3:4], pk[:, 3:4]], 1)
    dup_v = torch.cat([pv[:, :1], pv[:, 1:2], pv[:, 1:2], pv[:, 1:2], pv[:, 2:3], pv[:, 3:4], pv[:, 3:4]], 1)
    assert torch.allclose(got, attend_with_prefix(a, x, dup_k, dup_v), atol=1e-12, rtol=0)
    # a boolean mask and the bias together
    mask = torch.ones(1, 1, 7, 7, dtype=torch.bool)
    mask[..., 5:] = False
    ref = attend_with_prefix(a, x, pk, pv, bias, attn_mask=torch.zeros(1, 1, 7, 7, dtype=torch.float64).masked_fill(
        ~mask, float("-inf")))
    assert torch.allclose(attend_with_prefix(a, x, pk, pv, bias, attn_mask=mask), ref, atol=1e-12, rtol=0)


def test_prompt_key_values_are_what_a_prompt_token_contributes():
    block = _backbone().blocks[1].double().eval()
    t = torch.randn(2, 48, dtype=torch.float64)
    k, v = prompt_key_values(block, t)
    h = torch.nn.functional.layer_norm(t, (48,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    W, b = block.attn.qkv.weight, block.attn.qkv.bias
    assert torch.allclose(k, (h @ W[48:96].T + b[48:96]).view(2, 3, 16).transpose(0, 1), atol=1e-12)
    assert torch.allclose(v, (h @ W[96:].T + b[96:]).view(2, 3, 16).transpose(0, 1), atol=1e-12)


PRUNE = {"prompt_tokens": 5, "kv_tokens": 2, "mask": {"pruned_tokens": [1, 3], "pruned_segments": [[0, 2]] * 5}}
CASES = [
    ("vpt-deep", {"prompt_tokens": 4}, {"folded": 0}),
    ("e2vpt", {"prompt_tokens": 4, "kv_tokens": 2}, {"folded": 0}),
    ("e2vpt-prune", PRUNE, {"folded": 0, "compacted": 3}),
]


@pytest.mark.parametrize("name,opts,variants", CASES)
def test_folded_and_compacted_models_have_the_same_logits_fewer_tokens_and_flops(name, opts, variants):
    model = _model(name, opts)
    got = model.inference_variants()
    assert set(got) == set(variants)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    P = model.num_prompts
    tokens = _tokens(model, x[:1])
    flops = _flops(lambda: model(x))
    assert tokens == 1 + 16 + P
    for vname, prompts in variants.items():
        v = got[vname]
        assert isinstance(v, FoldedPromptViT) and not any(p.requires_grad for p in v.parameters())
        with torch.no_grad():
            assert torch.allclose(v(x), want, atol=1e-10, rtol=0), (vname, (v(x) - want).abs().max())
        assert v.num_prompts == prompts and _tokens(v, x[:1]) == 1 + 16 + prompts < tokens
        assert _flops(lambda: v(x)) < flops
    # the folded model really holds the trained prompts: an untouched model's folding differs
    other = _model(name, opts, seed=1)
    with torch.no_grad():
        assert (other.inference_variants()["folded"](x) - want).abs().max() > 1e-4


def test_pruned_tokens_still_count_so_the_compacted_model_keeps_their_key_value_pair():
    """A pruned E^2VPT token is a zero vector in the sequence: its key/value (from norm1's bias) still takes
    attention weight. Dropping the tokens outright changes the logits; the compacted model keeps one
    (k, v) entry per layer with offset log(n_pruned) and is exact."""
    model = _model("e2vpt-prune", PRUNE)
    comp = model.inference_variants()["compacted"]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        naive = copy.deepcopy(comp)
        for block in naive.backbone.blocks:  # keep the KV prompts (first 2 entries), drop the pruned tokens' entry
            a = block.attn
            assert a.prefix_len == 2 + 1 and torch.allclose(a.prefix_bias[2:], torch.tensor([math.log(2)]).double())
            a.prefix_k, a.prefix_v, a.prefix_bias = a.prefix_k[:, :2], a.prefix_v[:, :2], None
        assert (naive(x) - want).abs().max() > 1e-4
        assert torch.allclose(comp(x), want, atol=1e-10, rtol=0)


def test_no_folding_where_prompt_outputs_are_read():
    # VPT-shallow: the prompts propagate through the blocks (image-dependent after block 1)
    assert "folded" not in _model("vpt-shallow", {"prompt_tokens": 3}).inference_variants()
    # average pooling reads the prompt outputs of the last block
    assert "folded" not in _model("vpt-deep", {"prompt_tokens": 3}, backbone=_backbone("avg")).inference_variants()
    # the soft-masked e2vpt-prune model (before pruning) folds, but has no compacted variant
    assert set(_model("e2vpt-prune", {"prompt_tokens": 3, "kv_tokens": 1}).inference_variants()) == {"folded"}


def test_bench_rows_for_unpruned_masked_and_compacted_e2vpt():
    from helpers import TINY_BACKBONE, ensure_registered

    from peftbench.bench.speed import BenchSettings, run_bench

    ensure_registered()
    s = BenchSettings(methods=["linear", "vpt-deep", "e2vpt", "e2vpt-prune"], backbone=TINY_BACKBONE, batch_size=2,
                      warmup=0, steps=1, sets=("prompt_tokens=10", "kv_tokens=5"))
    rows = {(r["method"], r["variant"]): r for r in run_bench(s, log=lambda m: None)}
    assert set(rows) == {("linear", ""), ("linear", "merged"), ("vpt-deep", ""), ("vpt-deep", "folded"),
                         ("e2vpt", ""), ("e2vpt", "folded"), ("e2vpt-prune", ""), ("e2vpt-prune", "folded"),
                         ("e2vpt-prune", "compacted")}
    # the bench's e2vpt-prune is pruned (Method.bench_options: 5 of 10 tokens, 8 of 16 segments)
    masked, comp = rows["e2vpt-prune", ""], rows["e2vpt-prune", "compacted"]
    assert masked["tokens"] == rows["e2vpt", ""]["tokens"] == 1 + 16 + 10 and comp["tokens"] == 1 + 16 + 5
    assert rows["e2vpt-prune", "folded"]["tokens"] == rows["linear", "merged"]["tokens"] == 17
    assert masked["gflops_forward_per_image"] == rows["e2vpt", ""]["gflops_forward_per_image"]
    assert comp["gflops_forward_per_image"] < masked["gflops_forward_per_image"]
    assert rows["linear", "merged"]["gflops_forward_per_image"] < rows["e2vpt-prune", "folded"][
        "gflops_forward_per_image"] < comp["gflops_forward_per_image"]
    assert all(r["eval_vs_plain"] != "" for r in rows.values())
