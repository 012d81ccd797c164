"""linear / full / vpt-shallow / vpt-deep: exactly the spec's parameters train, maths equal a direct
reference computation, frozen modules stay in eval mode."""
import math

import pytest
import torch
import torch.nn.functional as F

from peftbench.methods import HEAD_BIAS_INIT, get_method

C = 5


def build(name, backbone, **opts):
    m = get_method(name)
    o = m.parse_options({k: str(v) for k, v in opts.items()})
    o, _ = m.resolve_options(o, None)
    return m.build(backbone, C, o)


def grads_after_step(model):
    model.train()
    x = torch.randn(4, 3, 32, 32)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


def test_linear_trains_only_head(tiny_backbone):
    model = build("linear", tiny_backbone)
    assert grads_after_step(model) == {"head.weight", "head.bias"}
    assert get_method("linear").frozen_features


def test_full_trains_everything_with_dropout_on(tiny_backbone):
    model = build("full", tiny_backbone)
    names = grads_after_step(model)
    assert names == {n for n, _ in model.named_parameters()}
    assert model.backbone.blocks[0].mlp.drop1.training and model.backbone.blocks[0].mlp.drop1.p == 0.1


@pytest.mark.parametrize("name,deep", [("vpt-deep", True), ("vpt-shallow", False)])
def test_vpt_trains_prompts_and_head_only(tiny_backbone, name, deep):
    model = build(name, tiny_backbone, prompt_tokens=4)
    expected = {"prompt_embeddings", "head.weight", "head.bias"} | ({"deep_prompt_embeddings"} if deep else set())
    assert grads_after_step(model) == expected
    # the frozen backbone stays in eval mode while the model trains; the prompt dropout does not
    assert not any(m.training for m in model.backbone.modules())
    assert model.prompt_dropout.training and model.head.training
    depth = len(model.backbone.blocks)
    assert model.prompt_embeddings.shape == (1, 4, 48)
    if deep:
        assert model.deep_prompt_embeddings.shape == (depth - 1, 4, 48)
    bound = math.sqrt(6 / (3 * 8 * 8 + 48))
    assert model.prompt_embeddings.abs().max() <= bound


def test_head_init_is_the_official_one(tiny_backbone):
    model = build("linear", tiny_backbone)
    assert torch.allclose(model.head.bias, torch.full((C,), HEAD_BIAS_INIT))
    assert HEAD_BIAS_INIT == pytest.approx(-4.59512, abs=1e-5)
    assert model.no_weight_decay() == {"head.bias"}


def reference_prompted_features(vit, prompts_per_layer, deep):
    """Spell out VPT: [CLS, prompts, patches] before block 1; deep: replace prompt slots before each block."""
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    patches = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    cls = vit.cls_token.expand(2, -1, -1)
    tokens = torch.cat([cls, patches], 1) + vit.pos_embed
    p = prompts_per_layer[0].shape[0]
    h = torch.cat([tokens[:, :1], prompts_per_layer[0].expand(2, -1, -1), tokens[:, 1:]], 1)
    for i, blk in enumerate(vit.blocks):
        if deep and i > 0:
            h = torch.cat([h[:, :1], prompts_per_layer[i].expand(2, -1, -1), h[:, 1 + p:]], 1)
        h = blk(h)
    return x, vit.norm(h)[:, 0]


@pytest.mark.parametrize("name,deep", [("vpt-deep", True), ("vpt-shallow", False)])
def test_vpt_forward_equals_reference(tiny_backbone, name, deep):
    model = build(name, tiny_backbone, prompt_tokens=3).double().eval()
    layers = [model.prompt_embeddings[0]] + (list(model.deep_prompt_embeddings) if deep else [])
    with torch.no_grad():
        x, ref = reference_prompted_features(model.backbone, layers, deep)
        out = model.features(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_zero_prompts_equal_the_backbone(tiny_backbone):
    model = build("vpt-deep", tiny_backbone, prompt_tokens=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.backbone.forward_head(model.backbone.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model.features(x), ref, rtol=0, atol=0)
