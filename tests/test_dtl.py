"""DTL and DTL+ (docs/methods/dtl.md, heekhero/DTL@bf6c51e models/vision_transformer.py): the logits and the
gradients equal a direct float64 computation of the official maths on the plain-torch ViT (cumulative branch sum,
Swish β on it, added back after blocks M..L, DTL+'s shared depthwise conv with PyTorch's 'same' padding, the
pretrained final norm of the mean patch token); the inits, what trains, which blocks record a graph, the counts."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from petl_reference import blocks_in_graph, build, inputs, layer_norm, linear, randomise, reference_features, tiny_kwargs, weights

from peftbench.cli.params import count
from peftbench.tasks import get_task


def reference_logits(ref, model, x, first_add, beta, kernel):
    """Written from the spec: z_0 the embedded tokens; per block c += B_i A_i z_i, z_{i+1} = Blk_i(z_i) (+ g(c) from
    block M on); logits = head(LN(mean of the patch tokens of z_L))."""
    w = weights(ref)
    z0 = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=ref.patch_embed.patch_size[0])
    z0 = z0.flatten(2).transpose(1, 2)
    state = {"z": torch.cat([w["cls_token"].expand(x.shape[0], -1, -1), z0], dim=1) + w["pos_embed"], "c": 0.0}
    grid = ref.patch_embed.grid_size

    def g(c):
        h = c * torch.sigmoid(beta * c)
        if not kernel:
            return h
        pre, post = (kernel - 1) // 2, kernel - 1 - (kernel - 1) // 2  # 'same': an even kernel pads more after
        p = h[:, 1:].reshape(h.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)
        p = F.conv2d(F.pad(p, (pre, post, pre, post)), model.fusion.weight, groups=p.shape[1])
        return torch.cat([h[:, :1], p.permute(0, 2, 3, 1).reshape(h.shape[0], -1, h.shape[-1])], dim=1)

    def block(i):
        def hook(t):
            state["c"] = state["c"] + linear(linear(state["z"], model.down[i]), model.up[i])  # reads the block's input
            out = t + g(state["c"]) if i + 1 >= first_add else t
            state["z"] = out
            return out
        return hook

    depth = len(ref.blocks)
    reference_features(w, x, {("block", i): block(i) for i in range(depth)}, **tiny_kwargs(ref))
    z = state["z"]
    f = layer_norm(z[:, 1:].mean(dim=1), w["norm.weight"], w["norm.bias"])
    return linear(f, model.head.weight, model.head.bias)


@pytest.mark.parametrize("name,kernel,first_add", [("dtl", 0, 2), ("dtl-plus", 3, 2), ("dtl-plus", 4, 1),
                                                   ("dtl-plus", 5, 3)])
def test_logits_and_gradients_equal_the_official_maths(tiny_backbone, name, kernel, first_add):
    ref = copy.deepcopy(tiny_backbone).double().eval()
    opts = {"first_add": first_add, "beta": 3.0, **({"kernel": kernel} if kernel else {})}
    model = build(name, tiny_backbone, **opts).double()
    randomise(model, std=0.3)
    model.eval()
    x = inputs()
    got = model(x)
    expect = reference_logits(ref, model, x, first_add, 3.0, kernel)
    assert torch.allclose(got, expect, rtol=0, atol=1e-12), (got - expect).abs().max()
    trained = [p for p in model.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(got.square().sum(), trained)
    g2 = torch.autograd.grad(expect.square().sum(), trained)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_init_what_trains_and_the_start(tiny_backbone):
    torch.manual_seed(0)
    model = build("dtl-plus", tiny_backbone, kernel=3)
    width, depth = tiny_backbone.embed_dim, len(tiny_backbone.blocks)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"down.{i}" for i in range(depth)} | {f"up.{i}" for i in range(depth)} | \
        {"fusion.weight", "head.weight", "head.bias"}
    assert all(a.shape == (2, width) and a.abs().max() <= 1 / math.sqrt(width) for a in model.down)
    assert all(not b.any() for b in model.up) and model.fusion.weight.abs().max() <= 1 / 3
    assert model.fusion.bias is None
    x = inputs().float()
    with torch.no_grad():  # B = 0: the backbone's tokens, pooled as DTL pools them
        tokens = tiny_backbone.forward_features(x)  # (after the final norm: per token, not what DTL feeds the head)
        z = tiny_backbone.blocks(tiny_backbone.norm_pre(tiny_backbone._pos_embed(tiny_backbone.patch_embed(x))))
        want = model.head(tiny_backbone.norm(z[:, 1:].mean(1)))
        assert torch.allclose(model.eval()(x), want, atol=1e-6)
        assert not torch.allclose(want, model.head(tokens[:, 1:].mean(1)), atol=1e-4)  # the norm after the mean


def test_only_the_blocks_after_the_first_add_back_record_a_graph(tiny_backbone):
    model = build("dtl", tiny_backbone, first_add=2)
    randomise(model)
    seen = blocks_in_graph(model)
    # M = 2: the first add-back follows block 1 (0-based); blocks 0 and 1 record nothing, block 2 reads the added
    # stream and is in the graph (the official M = 7 of 12: blocks 0..6 free, 7..11 back-propagated)
    assert seen == [False, False, True]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_counts_equal_the_formula():
    assert count("dtl", 100)["trainable_without_head"] == 12 * 2 * 768 * 2 == 36_864
    for k in (3, 4, 5):
        assert count("dtl-plus", 100, sets=[f"kernel={k}"])["trainable_without_head"] == 36_864 + 768 * k * k
    assert count("dtl", 100, sets=["rank=8"])["trainable_without_head"] == 12 * 2 * 768 * 8


def test_per_task_kernels_and_the_depth_rule():
    from peftbench.methods import get_method
    from peftbench.methods.dtl import first_add_block

    assert [first_add_block(d) for d in (12, 6, 3, 24)] == [7, 4, 2, 14]
    m = get_method("dtl-plus")
    # heekhero/DTL@bf6c51e train_scripts/vit/vtab/{cifar_100,patch_camelyon,dtd}/train_dtl+.sh:10
    for task, k in {"cifar100": 3, "patch_camelyon": 4, "dtd": 5}.items():
        opts, sources = m.resolve_options(m.parse_options({}), get_task(task))
        assert opts["kernel"] == k and "heekhero/DTL" in sources["kernel"]
    opts, _ = m.resolve_options(m.parse_options({}), get_task("cub200"))
    assert opts["kernel"] == 3


def test_the_written_out_padding_is_pytorchs_same(tiny_backbone):
    """The official Conv2d(padding="same"): for an even kernel PyTorch pads 1 before and 2 after; peftbench pads
    explicitly (no warning) and must give the same tokens."""
    import warnings

    model = build("dtl-plus", tiny_backbone, kernel=4).double()
    c = torch.randn(2, 1 + 16, tiny_backbone.embed_dim, dtype=torch.float64)
    h = c * torch.sigmoid(model.beta * c)
    grid = h[:, 1:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = F.conv2d(grid, model.fusion.weight, padding="same", groups=grid.shape[1])
    want = torch.cat([h[:, :1], same.permute(0, 2, 3, 1).reshape(2, 16, -1)], dim=1)
    assert torch.equal(model._added(c), want)
