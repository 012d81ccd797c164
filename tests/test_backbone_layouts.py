"""Release checkpoints in their official key layouts (MAE, MoCo-v3 linear and pre-training, timm), converted
onto timm models without running any pickle: tiny random models saved in each layout, loaded through the
preset's converter, give the features the papers' code computes (a direct reference computation)."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from peftbench.backbones import BACKBONES, Preset, create_backbone, register_backbone
from peftbench.cli import main
from peftbench.errors import BackboneError

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


def _presets():
    if "test-mae" not in BACKBONES:
        register_backbone("test-mae", Preset("vit_tiny_patch16_224", dict(TINY, global_pool="avg", fc_norm=True), None,
                                             "tiny MAE-style ViT (tests)", layout="mae"))
        register_backbone("test-mocov3", Preset("vit_tiny_patch16_224", dict(TINY), None, "tiny MoCo-v3 ViT (tests)",
                                                layout="mocov3"))


@pytest.fixture(scope="module")
def source():
    """The 'official' model: a tiny ViT with a classifier, random weights."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY).eval()


def _blocks_out(src, x):
    return src.blocks(src.norm_pre(src._pos_embed(src.patch_embed(x))))


def _features(model, x):
    model.eval()
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def test_mae_release_layout(source, tmp_path):
    """mae_pretrain_vit_base.pth: {'model': encoder}; the final norm dropped, a fresh fc_norm (1, 0) over the
    mean of the tokens after the CLS (VPT's and MAE's fine-tuning code)."""
    _presets()
    enc = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    full = {**enc, "mask_token": torch.zeros(1, 1, 48), "decoder_embed.weight": torch.randn(16, 48)}  # a _full file
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": full}, path)
    model = create_backbone("test-mae", str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = _blocks_out(source, x)
        expected = F.layer_norm(tokens[:, 1:].mean(1), (48,), eps=1e-6)  # fc_norm weight 1, bias 0
    assert torch.allclose(_features(model, x), expected, atol=1e-6)
    assert torch.equal(model.fc_norm.weight, torch.ones(48)) and torch.equal(model.fc_norm.bias, torch.zeros(48))


@pytest.mark.parametrize("kind", ["linear", "pretraining"])
def test_mocov3_release_layouts(source, tmp_path, kind):
    """linear-vit-b-300ep.pth.tar (module. + timm names, a 1000-class head) and vit-b-300ep.pth.tar
    (module.base_encoder.* with a projector head, momentum encoder, predictor): MoCo's own rule; the feature
    is the CLS token after the final norm."""
    _presets()
    state = source.state_dict()
    opt = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    if kind == "linear":
        sd = {f"module.{k}": v for k, v in state.items()}
    else:
        enc = {k: v for k, v in state.items() if not k.startswith("head.")}
        sd = {**{f"module.base_encoder.{k}": v for k, v in enc.items()},
              "module.base_encoder.head.0.weight": torch.randn(64, 48),
              **{f"module.momentum_encoder.{k}": v + 1 for k, v in enc.items()},
              "module.predictor.0.weight": torch.randn(64, 64)}
    path = tmp_path / f"{kind}-vit-b-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": sd, "best_acc1": torch.tensor(76.7),
                "optimizer": opt.state_dict()}, path)
    model = create_backbone("test-mocov3", str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source.norm(_blocks_out(source, x))[:, 0]
    assert torch.allclose(_features(model, x), expected, atol=1e-6)


def test_a_file_that_does_not_fit_names_its_keys(source, tmp_path):
    _presets()
    enc = {k: v for k, v in source.state_dict().items() if not k.startswith(("head.", "blocks.1.mlp.fc2"))}
    path = tmp_path / "broken.pth"
    torch.save({"model": enc}, path)
    with pytest.raises(BackboneError, match=r"mae layout\) does not fit the backbone: missing keys \[blocks.1.mlp.fc2"):
        create_backbone("test-mae", str(path))


class _Planted:
    def __reduce__(self):
        import os

        return (os.system, ("touch planted-by-a-pickle",))


def test_no_pickled_code_runs(tmp_path, monkeypatch):
    _presets()
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": _Planted()}}, path)
    with pytest.raises(BackboneError, match="weights_only=True refuses pickled code"):
        create_backbone("test-mae", str(path))
    assert not (tmp_path / "planted-by-a-pickle").exists()


def test_convert_once_to_safetensors(source, tmp_path, capsys):
    _presets()
    enc = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    path = tmp_path / "mae.pth"
    torch.save({"model": enc}, path)
    out = tmp_path / "mae.safetensors"
    assert main(["backbone", "convert", "--backbone", "test-mae", "--checkpoint", str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dropped norm.weight: MAE's final norm" in text
    a, b = create_backbone("test-mae", str(path)), create_backbone("test-mae", str(out))
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(_features(a, x), _features(b, x))  # the converted file is the same backbone


def test_the_paper_presets_need_their_release_file():
    with pytest.raises(BackboneError, match="needs its release file: --checkpoint PATH \\(mae_pretrain_vit_base.pth"):
        create_backbone("vit-b16-mae")
    model = create_backbone("vit-b16-mae", pretrained=False)  # counting needs no weights
    assert model.global_pool == "avg" and isinstance(model.norm, torch.nn.Identity)


def test_normalisation_comes_from_the_preset():
    """CLIP's own mean/std for the CLIP presets; ImageNet's (the papers' code) for the others; a run's
    hyper-parameters still win."""
    from peftbench.backbones import normalisation
    from peftbench.store import RunSpec
    from peftbench.train.build import normalizer_for

    clip, imagenet = (0.48145466, 0.4578275, 0.40821073), (0.485, 0.456, 0.406)

    def spec(backbone, **hp):
        return RunSpec(method="linear", task="toy", suite="testsuite", protocol="fixed", stage="final",
                       train_split="a", eval_split="b", hparams={"lr": 1, "wd": 0, "epochs": 1, "batch_size": 1, **hp},
                       seed=1, backbone=backbone)

    assert normalisation("clip-vit-b16-openai")[0] == clip and normalisation("vit-b16-mae") is None  # ImageNet's
    assert normalisation("vit_base_patch16_224.augreg_in21k") is None  # a timm name: the papers' constants
    from peftbench.train.build import mean_std

    assert mean_std(spec("vit_base_patch16_224.augreg_in21k"))[0] == imagenet

    x = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    got = normalizer_for(spec("clip-vit-b16-openai"), "cpu")(x).flatten()
    assert torch.allclose(got, (1 - torch.tensor(clip)) / torch.tensor((0.26862954, 0.26130258, 0.27577711)))
    got = normalizer_for(spec("clip-vit-b16-openai", mean=[0.5] * 3, std=[0.5] * 3), "cpu")(x).flatten()
    assert torch.allclose(got, torch.ones(3))


def test_every_preset_is_listed_with_its_family_resolution_normalisation_and_pooling(capsys):
    from peftbench.backbones import BACKBONES

    assert main(["list", "backbones"]) == 0
    out = capsys.readouterr().out
    for name in BACKBONES.names():
        line = next(x for x in out.splitlines() if x.startswith(name + " "))
        assert "px" in line and "norm=" in line and "pool=" in line and "weights=" in line
    assert "norm=clip" in next(x for x in out.splitlines() if x.startswith("clip-vit-b16-openai"))


@pytest.mark.parametrize("argv, needle", [
    (["params", "--method", "hydra", "--backbone", "swin_base_patch4_window7_224", "--num-classes", "10"],
     "method 'hydra' does not tune backbones of the swin family of 'swin_base_patch4_window7_224' (it tunes: vit)"),
    (["params", "--method", "vpt-deep", "--backbone", "convnext_tiny", "--num-classes", "10"],
     "method 'vpt-deep' does not tune backbones of the convnext family"),
    (["run", "--methods", "vpt-deep", "--suite", "vtab", "--backbone", "convnext_tiny", "--dry-run"],
     "method 'vpt-deep' does not tune backbones of the convnext family"),
])
def test_another_backbone_family_is_one_line_before_compute(capsys, argv, needle):
    """A Swin or ConvNeXt name used to end in timm's raw 'Invalid pool type: token' traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.strip().count("\n") == 0


def test_every_method_declares_its_backbone_families():
    from peftbench.backbones import backbone_family
    from peftbench.methods import METHODS

    assert all(m.families and all(isinstance(f, str) for f in m.families) for _, m in METHODS.items())
    assert backbone_family("vit_base_patch16_224.orig_in21k") == "vit" == backbone_family("deit_small_patch16_224")
    assert backbone_family("vit-b16-mae") == "vit" and backbone_family("swin_tiny_patch4_window7_224") == "swin"
    assert backbone_family("convnext_tiny") == "convnext"


def test_every_checkpoint_layout_has_a_test_here():
    """A layout registered without a known-answer test fails here (add its test, then its name): mae and mocov3
    above, timm in tests/test_data_backbone.py::test_safetensors_and_pth."""
    from peftbench.backbones import CHECKPOINT_LAYOUTS

    assert sorted(CHECKPOINT_LAYOUTS.names()) == ["mae", "mocov3", "swin", "timm"]


def test_swin_release_layout(tmp_path):
    """swin_base_patch4_window7_224_22k.pth: Microsoft's names (patch merging at the end of each stage, its
    buffers, a 21k head) loaded onto timm's Swin give the same features as the source model."""
    from peftbench.backbones import load_checkpoint

    kw = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)
    torch.manual_seed(0)
    src = timm.create_model("swin_tiny_patch4_window7_224", num_classes=11, **kw).eval()
    official = {}
    for k, v in src.state_dict().items():  # timm's names -> the release's (the inverse of timm's filter)
        parts = k.split(".")
        if k.startswith("layers.") and parts[2] == "downsample":
            k = ".".join(["layers", str(int(parts[1]) - 1)] + parts[2:])
        official[k.replace("head.fc.", "head.")] = v
    for i, stage in enumerate(src.layers):
        for j, blk in enumerate(stage.blocks):
            official[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = blk.attn.relative_position_index
    path = tmp_path / "swin_release.pth"
    torch.save({"model": official}, path)
    model = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, **kw).eval()
    dropped = load_checkpoint(model, path, "swin")
    assert "head.weight" in dropped and any(k.endswith("relative_position_index") for k in dropped)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), src.forward_head(src.forward_features(x), pre_logits=True))
