"""E^2VPT (no pruning): key-value prompted attention, frozen backbone, gradients, parameter counts."""
import copy
import math
import re

import pytest
import torch

from peftbench.methods import get_method, per_task_row
from peftbench.methods.e2vpt.kv_attention import KVPromptAttention
from peftbench.methods.e2vpt.model import PROMPT_LENGTHS_FILE
from peftbench.tasks import get_task


def _randomise(module: torch.nn.Module, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def _reference_attention(attn, x, pk, pv):
    """softmax(Q [P_k; K]^T / sqrt(d)) [P_v; V], written out from the timm layer's weights."""
    B, N, C = x.shape
    H, d = attn.num_heads, attn.head_dim
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias  # (B, N, 3·H·d), timm order: q | k | v, head-major
    q, k, v = qkv.split(H * d, dim=-1)
    q, k, v = (t.reshape(B, N, H, d).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
    k = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
    v = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, H, N, L+N)
    out = scores.softmax(dim=-1) @ v  # (B, H, N, d)
    out = out.transpose(1, 2).reshape(B, N, H * d)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("share_kv", [True, False])
def test_kv_prompted_attention_equals_explicit_softmax(tiny_backbone, share_kv):
    attn = tiny_backbone.blocks[1].attn
    _randomise(attn)
    wrapped = KVPromptAttention(attn, kv_tokens=4, share_kv=share_kv).double().eval()
    with torch.no_grad():  # prompts of a realistic size, K and V different when separate
        for p in wrapped.parameters():
            if p.ndim == 3:
                p.mul_(3.0)
    x = torch.randn(2, 7, attn.qkv.in_features, dtype=torch.float64)
    pk, pv = wrapped.prompts()
    assert pk.shape == (attn.num_heads, 4, attn.head_dim)
    assert (pk is pv) == share_kv
    with torch.no_grad():
        got = wrapped(x)
        want = _reference_attention(attn, x, pk, pv)
        without = _reference_attention(attn, x, pk[:, :0], pv[:, :0])
    assert got.shape == x.shape
    assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()
    assert (got - without).abs().max() > 1e-3  # the prompts do change the output


def test_kv_prompt_init_is_kaiming_uniform_fan_in(tiny_backbone):
    attn = tiny_backbone.blocks[0].attn
    wrapped = KVPromptAttention(attn, kv_tokens=5)
    bound = math.sqrt(6.0 / (5 * attn.head_dim))  # gain sqrt(2) · sqrt(3 / fan_in), fan_in = L·head_dim
    p = wrapped.kv_prompt.detach()
    assert p.abs().max() <= bound
    assert p.abs().max() > 0.9 * bound  # uniform over the whole range, not a narrower init


def test_no_prompts_gives_exactly_the_frozen_backbone(tiny_backbone):
    _randomise(tiny_backbone, std=0.05)
    reference = copy.deepcopy(tiny_backbone).eval()
    torch.manual_seed(0)
    model = get_method("e2vpt").build(tiny_backbone, 5, {"prompt_tokens": 0, "kv_tokens": 0})
    model.eval()
    assert all(isinstance(b.attn, KVPromptAttention) for b in model.backbone.blocks)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model.head(reference.forward_head(reference.forward_features(x), pre_logits=True))
        got = model(x)
    assert torch.equal(got, want)
    counts = model.parameter_counts()
    assert counts["trainable"] == counts["head"] == 48 * 5 + 5


def _trainable_ok(name: str) -> bool:
    return name.startswith("head.") or bool(re.search(r"prompt", name))


@pytest.mark.parametrize("share_kv", [True, False])
def test_only_prompts_and_head_get_gradients(tiny_backbone, share_kv):
    model = get_method("e2vpt").build(tiny_backbone, 4, {"prompt_tokens": 3, "kv_tokens": 2, "share_kv": share_kv})
    model.train()
    # frozen modules stay in eval mode; only the head and the prompt dropout train
    for name, m in model.named_modules():
        trains = any(m is t for t in model.train_modules)
        assert m.training == trains or m is model, name
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    want = {n for n, p in model.named_parameters() if _trainable_ok(n)}
    assert got == want
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    kv = {n for n in want if n.endswith(("kv_prompt", "k_prompt", "v_prompt"))}
    assert len(kv) == 3 * (1 if share_kv else 2)
    assert {"prompt_embeddings", "deep_prompt_embeddings", "head.weight", "head.bias"} <= want
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.abs().sum() > 0, n


def test_e2vpt_parameter_count_formula(tiny_backbone):
    # tiny: depth 3, width 48, 3 heads x 16
    model = get_method("e2vpt").build(tiny_backbone, 7, {"prompt_tokens": 4, "kv_tokens": 2, "share_kv": False})
    c = model.parameter_counts()
    assert c["trainable"] == 3 * 4 * 48 + 2 * 3 * 3 * 2 * 16 + 49 * 7
    assert c["tuned"] == c["trainable"]


def test_released_prompt_lengths_are_per_task_data():
    method = get_method("e2vpt")
    opts = method.parse_options({})
    for task, (P, L) in {"caltech101": (32, 5), "cifar100": (5, 5), "oxford_flowers102": (1, 1),
                         "patch_camelyon": (10, 10), "dsprites_orientation": (5, 5), "pets": (10, 5),
                         "cub": (5, 5), "stanford_cars": (5, 5), "smallnorb_elevation": (10, 5)}.items():
        resolved, sources = method.resolve_options(opts, get_task(task))
        assert (resolved["prompt_tokens"], resolved["kv_tokens"]) == (P, L), task
        assert "methods/e2vpt/prompt_lengths.csv" in sources["prompt_tokens"]
    resolved, sources = method.resolve_options(opts, get_task("demo_digits"))
    assert (resolved["prompt_tokens"], resolved["kv_tokens"]) == (10, 5)
    assert sources["kv_tokens"].startswith("default 5")
    resolved, sources = method.resolve_options(method.parse_options({"prompt_tokens": "7"}), get_task("dtd"))
    assert resolved["prompt_tokens"] == 7 and "prompt_tokens" not in sources
    # every VTAB and FGVC task is listed
    for suite_task in ("svhn", "sun397", "eurosat", "resisc45", "diabetic_retinopathy", "clevr_count",
                       "clevr_distance", "dmlab", "kitti_distance", "dsprites_location", "smallnorb_azimuth",
                       "dtd", "nabirds", "oxford_flowers", "stanford_dogs"):
        assert per_task_row(PROMPT_LENGTHS_FILE, get_task(suite_task)).get("prompt_tokens"), suite_task


def _cli_counts(capsys, *args) -> dict:
    from peftbench.cli import main

    assert main(["params", *args]) == 0
    out = capsys.readouterr().out
    counts = {}
    for key in ("trainable", "tuned", "pruned_prompt_entries", "kept_prompt_entries"):
        m = re.search(rf"^{key}\s+([\d,]+)", out, re.M)
        if m:
            counts[key] = int(m.group(1).replace(",", ""))
    return counts


def test_cli_params_vit_b16(capsys):
    base = ["--num-classes", "100", "--set", "prompt_tokens=10", "--set", "kv_tokens=5"]
    c = _cli_counts(capsys, "--method", "e2vpt", *base)
    assert c["trainable"] == c["tuned"] == 215_140  # docs/methods/e2vpt.md §5
    c = _cli_counts(capsys, "--method", "e2vpt", *base, "--set", "share_kv=false")
    assert c["trainable"] == 9_216 * 10 + 18_432 * 5 + 769 * 100
    c = _cli_counts(capsys, "--method", "e2vpt-prune", *base, "--set", "prune_tokens=3", "--set", "prune_segments=4")
    assert c["tuned"] == 171_364  # docs/methods/e2vpt.md §5 worked example
    assert c["trainable"] == 215_140  # the masks are frozen after pruning
    assert c["pruned_prompt_entries"] == 43_776 and c["kept_prompt_entries"] == 48_384
