"""VPT and E^2VPT on a Swin Transformer equal a direct float64 computation of the official maths
(../shared spec: KMnP/vpt@4410440 src/models/vit_prompt/swin_transformer.py, ChengHan111/E2VPT@7a66e75
src/models/vit_prompt/swin_transformer_prompt_VK.py; docs/methods/vpt.md §11, docs/methods/e2vpt.md §9).

The reference below is written from the official code's steps, loop by loop (each image, each window), with the
frozen weights read off the timm modules: LayerNorm, qkv, relative-position bias and shift mask (zero for prompt
and key-value rows/columns), the prompt outputs averaged over windows, the 4x prompt repeat through the merge, the
mean over all final tokens. ``pairing="official"`` reproduces the official window/prompt pairing (window i of the
batch gets the prompts of image i mod B); peftbench pairs each image with its own windows, which equals the
official code at batch 1 (and is what the docs declare).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_data_root

from peftbench.backbones import create_backbone
from peftbench.errors import SettingsError
from peftbench.methods import get_method

SWIN = "demo-swin-tiny"


def _ln(mod, x):
    return F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)


def _mlp(mlp, x):
    return F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)


def _attend(blk, seq, kv, P, w_index):
    """One window's attention: seq (P + A, C); kv (heads, L, hd) or None; bias/mask on window pairs only."""
    at = blk.attn
    heads = at.num_heads
    N, C = seq.shape
    hd = C // heads
    qkv = F.linear(seq, at.qkv.weight, at.qkv.bias).view(N, 3, heads, hd).permute(1, 2, 0, 3)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (heads, N, hd)
    L = 0 if kv is None else kv.shape[1]
    if kv is not None:
        k, v = torch.cat([kv, k], 1), torch.cat([kv, v], 1)
    logits = (q * hd ** -0.5) @ k.transpose(-1, -2)  # (heads, N, L + N)
    A = N - P
    table = at.relative_position_bias_table[at.relative_position_index.view(-1)].view(A, A, heads).permute(2, 0, 1)
    extra = torch.zeros_like(logits)
    extra[:, P:, L + P:] = table
    if blk.attn_mask is not None:
        extra[:, P:, L + P:] += blk.attn_mask[w_index]
    a = (logits + extra).softmax(-1)
    out = (a @ v).transpose(0, 1).reshape(N, C)
    return F.linear(out, at.proj.weight, at.proj.bias)


def reference(model, x, pairing="image"):
    sw = model.backbone
    P = model.num_prompts
    z = sw.patch_embed(x)  # (B, H, W, C): the backbone's own stem (no prompts yet)
    B = z.shape[0]
    p = model.prompt_embeddings.expand(B, -1, -1)
    blk_i = 0
    for s, stage in enumerate(sw.layers):
        if not isinstance(stage.downsample, torch.nn.Identity):
            d = stage.downsample
            z4 = torch.cat([z[:, 0::2, 0::2], z[:, 1::2, 0::2], z[:, 0::2, 1::2], z[:, 1::2, 1::2]], -1)
            z = F.linear(_ln(d.norm, z4), d.reduction.weight)
            p = F.linear(_ln(d.norm, torch.cat([p, p, p, p], -1)), d.reduction.weight)
        for i, blk in enumerate(stage.blocks):
            if model.deep and (s, i) != (0, 0):
                p = model.deep_prompt_embeddings[s][i - 1 if s == 0 else i].expand(B, -1, -1)
            kv = model.kv_prompts[blk_i] if model.kv_tokens else None
            blk_i += 1
            Bz, H, W, C = z.shape
            ws, sh = blk.window_size[0], blk.shift_size[0]
            hz, hp = _ln(blk.norm1, z), _ln(blk.norm1, p)
            hz = torch.roll(hz, (-sh, -sh), (1, 2)) if sh else hz
            nh, nw = H // ws, W // ws
            nW = nh * nw
            outs = []  # index i = b·nW + w (the official window order)
            for i_glob in range(B * nW):
                b, w = divmod(i_glob, nW)
                src = b if pairing == "image" else i_glob % B
                win = hz[b, (w // nw) * ws:(w // nw + 1) * ws, (w % nw) * ws:(w % nw + 1) * ws].reshape(ws * ws, C)
                outs.append(_attend(blk, torch.cat([hp[src], win]), kv, P, w))
            if pairing == "image":
                p_out = torch.stack([torch.stack([outs[b * nW + w][:P] for w in range(nW)]).mean(0) for b in range(B)])
            else:  # attn_windows[:, :P].view(-1, B, P, C).mean(0): groups of B consecutive windows
                p_out = torch.stack([torch.stack([outs[w * B + b][:P] for w in range(nW)]).mean(0) for b in range(B)])
            z_out = torch.zeros_like(z)
            for i_glob, o in enumerate(outs):
                b, w = divmod(i_glob, nW)
                z_out[b, (w // nw) * ws:(w // nw + 1) * ws, (w % nw) * ws:(w % nw + 1) * ws] = o[P:].view(ws, ws, C)
            z_out = torch.roll(z_out, (sh, sh), (1, 2)) if sh else z_out
            t = torch.cat([p, z.reshape(B, H * W, C)], 1) + torch.cat([p_out, z_out.reshape(B, H * W, C)], 1)
            t = t + _mlp(blk.mlp, _ln(blk.norm2, t))
            p, z = t[:, :P], t[:, P:].reshape(B, H, W, C)
    feat = _ln(sw.norm, torch.cat([p, z.reshape(B, -1, z.shape[-1])], 1)).mean(1)
    return F.linear(feat, model.head.weight, model.head.bias)


def _model(method, **opts):
    torch.manual_seed(0)
    backbone = create_backbone(SWIN, pretrained=False)
    m = get_method(method)
    o, _ = m.resolve_options(m.parse_options({k: str(v) for k, v in opts.items()}), None)
    model = m.build(backbone, 7, o).double().eval()
    with torch.no_grad():
        for prm in model.parameters():
            if prm.requires_grad:
                prm.add_(0.3 * torch.randn_like(prm))
    return model


CASES = [("vpt-deep", {"prompt_tokens": 3}), ("vpt-shallow", {"prompt_tokens": 3}),
         ("e2vpt", {"prompt_tokens": 3, "kv_tokens": 2})]


@pytest.mark.parametrize("method,opts", CASES)
def test_logits_equal_the_official_maths_in_float64(method, opts):
    model = _model(method, **opts)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)
        assert torch.allclose(ours, reference(model, x), rtol=0, atol=1e-12)
        # at batch 1 the official pairing is the same computation
        assert torch.allclose(model(x[:1]), reference(model, x[:1], pairing="official"), rtol=0, atol=1e-12)
        # ... at batch 3 it is not where prompt outputs of a multi-window stage are kept (the declared departure)
        official = reference(model, x, pairing="official")
        if method == "vpt-shallow":
            assert (official - ours).abs().max() > 1e-6
        else:  # deep: the kept prompt outputs come from the last stage's single window
            assert torch.allclose(official, ours, rtol=0, atol=1e-12)


def test_counts_equal_the_official_models_and_the_papers_formula():
    tiny = {m: _model(m, **o).parameter_counts()["trainable_without_head"] for m, o in CASES}
    # official models on the same tiny Swin (C=32, depths 2,2,2,2, P=3, L=2): 2,880 / 96 / 4,851 with E^2VPT's 17·P
    # mask entries, which e2vpt without pruning does not have (as on the ViT): 4,851 - 51
    assert tiny == {"vpt-deep": 2_880, "vpt-shallow": 96, "e2vpt": 4_800}
    with torch.device("meta"):
        for method, opts, want in (("vpt-deep", {"prompt_tokens": "10"}, 12_032 * 10),
                                   ("vpt-shallow", {"prompt_tokens": "10"}, 128 * 10),
                                   ("e2vpt", {"prompt_tokens": "10", "kv_tokens": "1"}, 12_032 * 11)):
            m = get_method(method)
            o, _ = m.resolve_options(m.parse_options(opts), None)
            c = m.build(create_backbone("swin-b-in22k", pretrained=False), 100, o).parameter_counts()
            assert c["trainable_without_head"] == want and c["head"] == 1024 * 100 + 100
            assert c["total"] - c["trainable"] == 86_743_224  # Swin-B without its head (timm 1.0.31)


@pytest.mark.parametrize("method,opts", CASES)
def test_only_prompts_and_head_get_gradients_and_the_swin_stays_in_eval(method, opts):
    model = _model(method, **opts).float()
    model.train()
    assert not any(m.training for m in model.backbone.modules())
    x = torch.rand(2, 3, 32, 32)
    model(x).sum().backward()
    for name, prm in model.named_parameters():
        if prm.requires_grad:
            assert prm.grad is not None and prm.grad.abs().sum() > 0, name
            assert "prompt" in name or name.startswith("head."), name
        else:
            assert prm.grad is None, name


def test_a_method_that_does_not_tune_swin_is_one_line_before_anything_is_built():
    from peftbench.cli.params import count

    with pytest.raises(SettingsError, match=r"^method 'hydra' does not tune backbones of the swin family of "
                                            r"'demo-swin-tiny' \(it tunes: vit\)$"):
        count("hydra", 10, SWIN, [])
    with pytest.raises(SettingsError, match="e2vpt-prune"):
        count("e2vpt-prune", 10, SWIN, [])


def test_prompt_init_bound_uses_the_stage0_width():
    model = _model("vpt-deep", prompt_tokens=3)
    from peftbench.layers.prompted_swin import swin_prompt_bound

    assert swin_prompt_bound(model.backbone) == pytest.approx(math.sqrt(6 / (3 * 2 * 2 + 32)))
    with torch.device("meta"):
        assert swin_prompt_bound(create_backbone("swin-b-in22k", pretrained=False)) == pytest.approx(0.18464, abs=1e-5)


def test_swin_methods_train_through_the_engine(tmp_path):
    import json

    from peftbench.cli import main

    root = make_data_root(tmp_path / "data")
    runs = tmp_path / "runs"
    code = main(["run", "--methods", "vpt-deep,e2vpt,linear", "--suite", "testsuite", "--tasks", "toy", "--data-root",
                 str(root), "--runs-dir", str(runs), "--backbone", SWIN, "--protocol", "fixed", "--seeds", "1",
                 "--epochs", "1", "--batch-size", "16", "--quiet", "--set", "vpt-deep.prompt_tokens=2",
                 "--set", "e2vpt.prompt_tokens=2", "--set", "e2vpt.kv_tokens=1"])
    assert code == 0
    recs = [json.loads(p.read_text()) for p in runs.rglob("*.json") if p.parent.name == "toy" and "." not in p.stem]
    assert sorted(r["spec"]["method"] for r in recs) == ["e2vpt", "linear", "vpt-deep"]
    assert all(r["status"] == "ok" and r["spec"]["backbone"] == SWIN for r in recs)


def test_the_swin_generalisations_count_as_documented():
    """BitFit and the peft tuners on Swin-B (docs/methods/README.md §1.1): LoRA on every qkv is 4·r·ΣC_s; BitFit the
    bias vectors (11·ΣC_s in the blocks + patch embedding + patch-merging norms + final norm), not the
    relative-position bias tables; VB-LoRA and C3A stay ViT-only."""
    from peftbench.cli.params import count

    widths = [128] * 2 + [256] * 2 + [512] * 18 + [1024] * 2  # Swin-B: C_s of each of its 24 blocks
    assert count("lora", 100, "swin-b-in22k", [])["trainable_without_head"] == 4 * 8 * sum(widths) == 385_024
    bitfit = count("bitfit", 100, "swin-b-in22k", [])
    assert bitfit["trainable_without_head"] == 11 * sum(widths) + 2 * 128 + 4 * (128 + 256 + 512) + 1024 == 137_216
    assert bitfit["head"] == 1025 * 100
    for name in ("vblora", "c3a"):
        with pytest.raises(SettingsError, match=f"method '{name}' does not tune backbones of the swin family"):
            count(name, 10, "swin-b-in22k", [])
