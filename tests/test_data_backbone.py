"""The paper backbone's ways in: the hub (offline without a cache: a clear error naming --checkpoint), an
original Google ViT .npz, .safetensors and .pth state dicts, and files that do not fit (keys named)."""
import pytest
import torch
from fixtures_data import export_vit_npz
from safetensors.torch import save_file

from peftbench.backbones import create_backbone
from peftbench.errors import BackboneError
from peftbench.tasks import get_suite

NAME = "demo-vit-random"  # the demo ViT architecture (img 32, patch 4, width 96, 6 blocks), no weights of its own


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = create_backbone(NAME, pretrained=False).eval()
    with torch.no_grad():  # make every tensor distinctive (random init leaves LayerNorms at 1/0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    return model, x, y


def check_same(path, reference):
    model, x, y = reference
    loaded = create_backbone(NAME, checkpoint=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_suites_default_to_the_paper_backbone():
    assert get_suite("vtab").backbone == get_suite("fgvc").backbone == "vit_base_patch16_224.orig_in21k"


def test_offline_without_cache_names_both_ways(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    # the same code path as vit_base_patch16_224.orig_in21k, with a model that builds in a moment
    with pytest.raises(BackboneError) as exc:
        create_backbone("vit_tiny_patch16_224.augreg_in21k")
    msg = str(exc.value)
    assert "--checkpoint" in msg and "network access" in msg and ".npz" in msg


def test_original_jax_npz_reproduces_the_model_exactly(reference, tmp_path):
    path = export_vit_npz(reference[0], tmp_path / "ViT-B_16.npz")  # with head/ and pre_logits/ like in21k
    check_same(path, reference)


def test_safetensors_and_pth(reference, tmp_path):
    model = reference[0]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    check_same(tmp_path / "w.safetensors", reference)
    # a training checkpoint: wrapped, DataParallel prefix, a classifier head: all handled
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()} | {"module.head.weight": torch.zeros(5, 96)}}
    torch.save(wrapped, tmp_path / "w.pth")
    check_same(tmp_path / "w.pth", reference)


def test_checkpoints_that_do_not_fit_name_the_keys(reference, tmp_path):
    import timm

    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=96,
                              depth=4, num_heads=3, num_classes=0)
    export_vit_npz(other, tmp_path / "short.npz")
    with pytest.raises(BackboneError, match=r"missing keys \[Transformer/encoderblock_4/LayerNorm_0/scale"):
        create_backbone(NAME, checkpoint=str(tmp_path / "short.npz"))
    narrow = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=48,
                               depth=6, num_heads=3, num_classes=0)
    export_vit_npz(narrow, tmp_path / "narrow.npz")
    with pytest.raises(BackboneError, match=r"shape mismatch \[embedding/kernel \(4, 4, 3, 48\)"):
        create_backbone(NAME, checkpoint=str(tmp_path / "narrow.npz"))
    state = {k: v.contiguous() for k, v in narrow.state_dict().items()}
    save_file(state, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(BackboneError, match=r"shape mismatch \[blocks\.0\.attn\.proj\.bias \(48,\) vs \(96,\)"):
        create_backbone(NAME, checkpoint=str(tmp_path / "narrow.safetensors"))
    import numpy as np

    np.savez(tmp_path / "junk.npz", a=np.zeros(3))
    with pytest.raises(BackboneError, match="not a ViT .npz"):
        create_backbone(NAME, checkpoint=str(tmp_path / "junk.npz"))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"x": object()}, tmp_path / "evil.pth")
    with pytest.raises(BackboneError, match="weights_only"):
        create_backbone(NAME, checkpoint=str(tmp_path / "evil.pth"))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(BackboneError, match="no such file"):
        create_backbone(NAME, checkpoint=str(tmp_path / "absent.npz"))
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(BackboneError, match="unknown format"):
        create_backbone(NAME, checkpoint=str(tmp_path / "w.onnx"))
