"""Backbones: timm ViTs by name and pretrained tag, or from a local checkpoint file.

``--backbone`` takes a timm name (``vit_base_patch16_224.orig_in21k``) or a peftbench preset
(``demo-vit``: the tiny ViT pretrained by ``scripts/pretrain_demo_backbone.py``, shipped with the
package; ``vit-b16-mae`` and ``vit-b16-mocov3``: the self-supervised ViT-B/16 of the VPT and E^2VPT tables,
from their release files). ``--checkpoint PATH`` loads weights from a local .npz (the original JAX ViT
files, through timm's own converter), .safetensors or .pth/.pt/.pth.tar/.bin (``torch.load(weights_only=True)``:
no pickle code runs). A preset names the key layout of its release file (:data:`CHECKPOINT_LAYOUTS`: ``timm``,
``mae``, ``mocov3``): a converter maps it onto the timm model, every key used or deliberately dropped (and
said why), shapes checked; ``peftbench backbone convert`` writes the result once as .safetensors.
"""
from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ._registry import Registry
from .errors import BackboneError

ASSETS = Path(__file__).parent / "assets"


@dataclass(frozen=True)
class Preset:
    """A named backbone: a timm architecture with its keyword arguments and (optionally) local weights."""

    timm_name: str
    kwargs: dict
    checkpoint: Path | None
    description: str
    # non-empty: results on this backbone are a control, not a method's result (e.g. "random weights");
    # leaderboards list such rows apart: not ranked, not on the Pareto frontier, drawn apart in plots
    control: str = ""
    layout: str = "timm"  # the key layout of its checkpoint files (CHECKPOINT_LAYOUTS)
    weights: str = ""  # where the release file comes from (a --checkpoint the user downloads)
    family: str = "vit"  # the architecture family (what methods support)
    # the input normalisation its runs use (None: ImageNet's, the VPT/E^2VPT/NOAH code's for every ViT)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # the papers' table its results belong in ("ViT-B/16 ImageNet-21k", "Swin-B ImageNet-21k", "ViT-B/16 MAE"...):
    # leaderboards rank and draw each table apart (:func:`backbone_table`); "" = the preset's name. A control
    # names the table of the backbone it controls for
    table: str = ""


# presets; third-party packages add theirs through the `peftbench.backbones` entry-point group
BACKBONES: Registry[Preset] = Registry("backbone preset", group="peftbench.backbones")


def register_backbone(name: str, preset: Preset) -> Preset:
    return BACKBONES.add(name, preset)


def preset(name: str) -> Preset | None:
    """The preset called ``name``, None for a timm model name."""
    return BACKBONES.get(name) if name in BACKBONES else None


_BUILTIN: dict[str, Preset] = {
    "demo-vit": Preset(
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3),
        ASSETS / "demo_vit.safetensors",
        "tiny ViT (6 blocks, width 96, 32x32 input, patch 4) pretrained on Fashion-MNIST by "
        "scripts/pretrain_demo_backbone.py",
        table="demo ViT (tiny)",
    ),
    "demo-vit-random": Preset(
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3),
        None,
        "the demo ViT architecture, randomly initialised (the control for the pretrained one)",
        control="random-weight backbone",
        table="demo ViT (tiny)",
    ),
    # the self-supervised ViT-B/16 of the VPT and E^2VPT tables, as their code builds and loads them
    # (../shared/spec/backbones.md §3; KMnP/vpt@4410440 src/models/build_vit_backbone.py:45-91)
    "vit-b16-mae": Preset(
        "vit_base_patch16_224", dict(global_pool="avg", fc_norm=True), None,
        "ViT-B/16 MAE (mae_pretrain_vit_base.pth): the features are a fresh LayerNorm (weight 1, bias 0) of the "
        "mean of the tokens after the CLS (prompts included), the release's final norm dropped, as VPT's code",
        layout="mae", table="ViT-B/16 MAE",
        weights="mae_pretrain_vit_base.pth from facebookresearch/mae (README: the pre-trained ViT-Base checkpoint)"),
    "vit-b16-mocov3": Preset(
        "vit_base_patch16_224", {}, None,
        "ViT-B/16 MoCo-v3 (linear-vit-b-300ep.pth.tar, or the pre-training vit-b-300ep.pth.tar): the CLS token "
        "after the final norm, as VPT's code",
        layout="mocov3", table="ViT-B/16 MoCo-v3",
        weights="linear-vit-b-300ep.pth.tar (or vit-b-300ep.pth.tar) from facebookresearch/moco-v3 CONFIG.md"),
    # the other backbones of the papers' tables (timm's hub names; the VPT paper's ViT-L/H rows, the CLIP and
    # DINOv2 rows of PETL_Vision / VFPT / SNELL / GPS); weights from the Hugging Face hub through timm
    "vit-b16-in21k": Preset("vit_base_patch16_224.orig_in21k", {}, None,
                            "ViT-B/16 ImageNet-21k (the original ViT-B_16.npz; the paper suites' default)",
                            table="ViT-B/16 ImageNet-21k"),
    "vit-l16-in21k": Preset("vit_large_patch16_224.orig_in21k", {}, None,
                            "ViT-L/16 ImageNet-21k (the original release, as the VPT paper's ViT-L rows)",
                            table="ViT-L/16 ImageNet-21k"),
    "vit-h14-in21k": Preset("vit_huge_patch14_224.orig_in21k", {}, None,
                            "ViT-H/14 ImageNet-21k (the original release, as the VPT paper's ViT-H rows)",
                            table="ViT-H/14 ImageNet-21k"),
    "dinov2-vit-b14": Preset("vit_base_patch14_dinov2.lvd142m", dict(img_size=224), None,
                             "DINOv2 ViT-B/14 (LVD-142M) at 224 px (timm interpolates its position embedding)",
                             table="DINOv2 ViT-B/14"),
    "clip-vit-b16-openai": Preset("vit_base_patch16_clip_224.openai", {}, None,
                                  "CLIP ViT-B/16 image tower (OpenAI), CLIP's normalisation", table="CLIP ViT-B/16 (OpenAI)",
                                  mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)),
    "clip-vit-b16-laion2b": Preset("vit_base_patch16_clip_224.laion2b", {}, None,
                                   "CLIP ViT-B/16 image tower (LAION-2B, OpenCLIP), CLIP's normalisation",
                                   table="CLIP ViT-B/16 (LAION-2B)",
                                   mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)),
    # the papers' Swin-B: ImageNet-21k, 224 px, window 7 (VPT build_vit_backbone.py:170-182; timm's tag points at
    # the release file swin_base_patch4_window7_224_22k.pth, converted by timm's checkpoint filter)
    "swin-b-in22k": Preset("swin_base_patch4_window7_224.ms_in22k", {}, None,
                           "Swin-B ImageNet-21k (224, window 7), as VPT/E^2VPT used it (timm hub, or the release "
                           "swin_base_patch4_window7_224_22k.pth with --checkpoint)", family="swin", layout="swin",
                           table="Swin-B ImageNet-21k"),
    # the demo's and the tests' tiny random Swin (4 stages of 2 blocks, width 32, window 4 on 32-pixel images)
    "demo-swin-tiny": Preset("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, embed_dim=32,
                                                                  depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                                                                  window_size=4),
                             None, "random tiny Swin (4 x 2 blocks, width 32, window 4, 32 px) for the demo and "
                                   "tests", family="swin", table="demo Swin (tiny, random)"),
}
for _name, _preset in _BUILTIN.items():
    register_backbone(_name, _preset)


# timm modules whose models are the ViT family peftbench tunes (a VisionTransformer: patch embedding, CLS token,
# pre-norm blocks with a fused qkv); any other family is refused in one line before anything is built
VIT_MODULES = ("vision_transformer", "deit")
# other timm modules whose models some methods tune, by family name (Method.families)
FAMILY_MODULES = {"swin_transformer": "swin"}
# the families peftbench tunes, each with the timm keyword arguments its backbones are built with (besides
# num_classes=0; a preset's own kwargs win): the ViT's feature is its CLS token (the papers' code), Swin keeps timm's
# average of the final tokens
FAMILY_KWARGS: dict[str, dict] = {"vit": {"global_pool": "token"}, "swin": {"global_pool": "avg"}}
TUNED_FAMILIES = tuple(FAMILY_KWARGS)


@lru_cache(maxsize=1)
def _timm_modules() -> dict[str, str]:
    """timm architecture name -> the timm module that defines it (timm's public listing)."""
    import timm

    return {arch: module for module in timm.list_modules() for arch in timm.list_models(module=module)}


def backbone_family(backbone: str) -> str:
    """``vit`` for the ViT family (presets say theirs), else the timm module of the architecture (``swin_transformer``,
    ``convnext``...), or "" for a name timm does not know."""
    p = preset(backbone)
    if p is not None:
        return p.family
    module = _timm_modules().get(backbone.split(".")[0], "")
    return "vit" if module in VIT_MODULES else FAMILY_MODULES.get(module, module)


def backbone_table(backbone: str) -> str:
    """The papers' table results on ``backbone`` belong in: its preset's ``table``; a timm name is in the table of the
    preset built from exactly that name (``vit_base_patch16_224.orig_in21k`` -> ``ViT-B/16 ImageNet-21k``); any other
    backbone is a table of its own, named by itself. Leaderboards rank each table apart (docs/leaderboard.md)."""
    p = preset(backbone)
    if p is not None:
        return p.table or backbone
    same = [q for _, q in BACKBONES.items() if q.timm_name == backbone and not q.kwargs and q.checkpoint is None
            and not q.control and q.layout in ("timm", "swin")]
    return (same[0].table or backbone) if len(same) == 1 else backbone


def normalisation(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The input mean and std of ``backbone``'s preset, or None: ImageNet's (the papers' code uses ImageNet's for
    every ViT, whatever timm's config says; :func:`peftbench.train.build.normalizer_for` fills it in)."""
    p = preset(backbone)
    return (tuple(p.mean), tuple(p.std)) if p is not None and p.mean and p.std else None


# keys a classification checkpoint may carry that the backbone (num_classes=0) does not have
_IGNORED_PREFIXES = ("head.", "fc.", "pre_logits.", "classifier.")


def _file_sha256(path: Path) -> str:
    """sha256 of a file, cached next to nothing: keyed in memory by (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


_SHA_CACHE: dict[tuple, str] = {}


def checkpoint_id(backbone: str, checkpoint: str | None) -> str | None:
    """What identifies the weights in a run key: the sha256 of the checkpoint file in use."""
    path = resolve_checkpoint(backbone, checkpoint)
    return _file_sha256(path)[:16] if path is not None else None


def resolve_checkpoint(backbone: str, checkpoint: str | None) -> Path | None:
    if checkpoint:
        p = Path(checkpoint).expanduser()
        if not p.is_file():
            raise BackboneError(f"--checkpoint {checkpoint}: no such file")
        return p
    p = preset(backbone)
    if p is not None and p.checkpoint is not None:
        if not p.checkpoint.is_file():
            raise BackboneError(
                f"backbone {backbone!r}: its weights {p.checkpoint} are missing; rebuild them with "
                f"`python scripts/pretrain_demo_backbone.py`"
            )
        return p.checkpoint
    return None


def create_backbone(backbone: str, checkpoint: str | None = None, *, pretrained: bool = True,
                    device: str | torch.device | None = None) -> nn.Module:
    """A timm ViT without classifier (``num_classes=0``), features = CLS token after the final norm.

    ``pretrained=False`` builds the architecture with random weights (parameter counting); building
    under ``torch.device("meta")`` makes no memory at all.
    """
    import timm

    p = preset(backbone)
    family = backbone_family(backbone)
    if family not in TUNED_FAMILIES + ("",):
        raise BackboneError(f"backbone {backbone!r} is a timm {family} model: peftbench tunes the ViT family (timm's "
                            f"{', '.join(VIT_MODULES)} models) and Swin (timm's swin_transformer models), and the "
                            "presets of `peftbench list backbones`; other families are not supported")
    name, kwargs = (p.timm_name, dict(p.kwargs)) if p else (backbone, {})
    kwargs["num_classes"] = 0
    # (a preset may pool otherwise: vit-b16-mae averages; a timm name timm does not know is built as a ViT, and
    # timm's own error names it)
    kwargs = {**FAMILY_KWARGS[family or "vit"], **kwargs}
    ckpt = resolve_checkpoint(backbone, checkpoint) if pretrained else None
    if pretrained and ckpt is None and p is not None and p.weights:
        raise BackboneError(f"backbone {backbone!r} needs its release file: --checkpoint PATH ({p.weights})")
    # a preset fetches from the hub when it names a pretrained tag (vit-l16-in21k); without one it is random
    # (demo-vit-random: a control)
    use_hub = pretrained and ckpt is None and (p is None or "." in p.timm_name)
    try:
        if use_hub:
            model = timm.create_model(name, pretrained=True, **kwargs)
        else:
            model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise BackboneError(unknown_backbone_message(backbone)) from None
        raise
    except Exception as exc:  # hub download failures (offline machine, no cache)
        if not use_hub:
            raise
        raise BackboneError(
            f"could not fetch the pretrained weights of {backbone!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Either run once with network access so that timm "
            f"caches them (HF_HOME), or pass a local file: --checkpoint PATH (the original ViT-B_16.npz, a "
            f".safetensors or a .pth state dict)."
        ) from None
    if ckpt is not None:
        load_checkpoint(model, ckpt, p.layout if p else "timm")
    if device is not None:
        model.to(device)
    return model


def read_state(path: Path) -> dict:
    """The tensors of a .safetensors or torch file (``weights_only=True``: no pickled code runs), as a dict."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # truncated, empty or not safetensors at all (SafetensorError, OSError, ...)
            raise BackboneError(f"checkpoint {path} cannot be read as .safetensors: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if path.suffix.lower() in (".pth", ".pt", ".bin", ".ckpt", ".tar"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BackboneError(
                f"checkpoint {path} cannot be read as a plain state dict (weights_only=True refuses pickled "
                f"code): {exc}") from None
        if not isinstance(state, dict):
            raise BackboneError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of tensors")
        return state
    raise BackboneError(f"checkpoint {path}: unknown format {path.suffix!r} (use .npz, .safetensors, .pth or .pth.tar)")


def _unwrap(state: dict, *wrappers: str) -> dict:
    for wrapper in wrappers:
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


# ---------------------------------------------------------------------------------------------
# checkpoint layouts: a release file's keys -> the timm model's (every key used or dropped with a reason)
# ---------------------------------------------------------------------------------------------

Converter = Callable[[dict, nn.Module], tuple[dict, dict[str, str]]]  # (raw, model) -> (state, dropped key -> why)
CHECKPOINT_LAYOUTS: Registry[Converter] = Registry("checkpoint layout", group="peftbench.checkpoint_layouts")


def register_layout(name: str):
    def deco(fn: Converter) -> Converter:
        CHECKPOINT_LAYOUTS.add(name, fn)
        return fn
    return deco


@register_layout("timm")
def _timm_layout(raw: dict, model: nn.Module) -> tuple[dict, dict[str, str]]:
    """timm's own names, maybe wrapped (``state_dict``, ``model``, ``module``) or DDP-prefixed (``module.``); a
    classifier the backbone (num_classes=0) does not have is dropped."""
    state = _unwrap(raw, "state_dict", "model", "module")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    dropped = {k: "a classifier layer (the backbone has none)" for k in state if k.startswith(_IGNORED_PREFIXES)}
    return {k: v for k, v in state.items() if k not in dropped}, dropped


@register_layout("mae")
def _mae_layout(raw: dict, model: nn.Module) -> tuple[dict, dict[str, str]]:
    """MAE's ``mae_pretrain_vit_base.pth`` (``{'model': encoder state}``, timm names): its final ``norm`` is dropped
    and a fresh ``fc_norm`` (weight 1, bias 0) pools, as MAE's fine-tuning code and VPT's loader do
    (facebookresearch/mae@efb2a80 main_finetune.py:248-254; KMnP/vpt@4410440 src/models/vit_backbones/vit_mae.py:14-26);
    a ``_full`` release's decoder and mask token are dropped too. A file already converted passes through."""
    state = dict(_unwrap(raw, "model"))
    dropped: dict[str, str] = {}
    for k in list(state):
        if k.startswith("norm.") and not any(x.startswith("fc_norm.") for x in state):
            dropped[k] = "MAE's final norm: the papers' features use a fresh fc_norm instead"
        elif k.startswith(("decoder", "mask_token")):
            dropped[k] = "MAE's decoder (the _full release): not part of the encoder"
        elif k.startswith(_IGNORED_PREFIXES):
            dropped[k] = "a classifier layer (the backbone has none)"
    state = {k: v for k, v in state.items() if k not in dropped}
    own = model.state_dict()
    if "fc_norm.weight" in own and "fc_norm.weight" not in state:  # fresh, as the papers' code leaves it
        state["fc_norm.weight"] = torch.ones_like(own["fc_norm.weight"], device="cpu")
        state["fc_norm.bias"] = torch.zeros_like(own["fc_norm.bias"], device="cpu")
    return state, dropped


@register_layout("mocov3")
def _mocov3_layout(raw: dict, model: nn.Module) -> tuple[dict, dict[str, str]]:
    """MoCo-v3's files: the linear-classification checkpoint (``linear-vit-b-300ep.pth.tar``: ``state_dict`` of
    the DDP-wrapped ViT, ``module.`` + timm names, and its 1000-class ``head``) or the pre-training one
    (``vit-b-300ep.pth.tar``: ``module.base_encoder.*`` with a projector ``head``, ``module.momentum_encoder.*``,
    ``module.predictor.*``), mapped by MoCo's own rule: the base encoder without its head
    (facebookresearch/moco-v3@c349e6e main_lincls.py:178-189). VPT's loader strips ``module.`` only, which
    loads nothing from the pre-training file; peftbench maps it."""
    state = dict(_unwrap(raw, "state_dict"))
    dropped: dict[str, str] = {}
    out = {}
    pretraining = any(k.startswith("module.base_encoder.") for k in state)
    for k, v in state.items():
        if pretraining:
            if k.startswith("module.base_encoder.head."):
                dropped[k] = "the pre-training projector (MoCo's rule drops it)"
            elif k.startswith("module.base_encoder."):
                out[k.removeprefix("module.base_encoder.")] = v
            else:
                dropped[k] = "the momentum encoder or the predictor (pre-training only)"
        else:
            name = k.removeprefix("module.")
            if name.startswith(_IGNORED_PREFIXES):
                dropped[k] = "the linear classifier of the release (the backbone has none)"
            else:
                out[name] = v
    return out, dropped


@register_layout("swin")
def _swin_layout(raw: dict, model: nn.Module) -> tuple[dict, dict[str, str]]:
    """Swin's release files (``swin_base_patch4_window7_224_22k.pth``: ``{'model': state}``, Microsoft's names):
    timm's own converter (``timm.models.swin_transformer.checkpoint_filter_fn``: the stage's patch merging moves
    from the end of stage s to the start of stage s + 1, ``head.`` becomes ``head.fc.``) and the buffers timm
    rebuilds itself (``relative_position_index``, ``attn_mask``) dropped; the release's 21,841-class head is
    dropped (the backbone has none). A file already in timm's names passes through."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    state = dict(_unwrap(raw, "model", "state_dict"))
    dropped = {k: "a buffer timm rebuilds (relative_position_index, attn_mask)" for k in state
               if k.endswith(("relative_position_index", "attn_mask"))}
    dropped.update({k: "the release's classifier (the backbone has none)" for k in state if k.startswith("head.")})
    return checkpoint_filter_fn({k: v for k, v in state.items() if k not in dropped}, model), dropped


def load_checkpoint(model: nn.Module, path: Path, layout: str = "timm") -> dict[str, str]:
    """Load a local weight file in ``layout`` (:data:`CHECKPOINT_LAYOUTS`) into a timm ViT; a file that does not
    fit names the keys. Returns the keys deliberately dropped, with why."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        if layout != "timm":
            raise BackboneError(f"checkpoint {path}: a .npz file, but this backbone's layout is {layout!r}")
        # the original JAX ViT checkpoints (ViT-B_16.npz): timm's converter maps the names; the keys are
        # checked first so that a file that does not fit is reported by key, not by a bare shape error
        problems = _npz_problems(model, path)
        if problems:
            raise BackboneError(f"checkpoint {path} does not fit the backbone: " + "; ".join(problems))
        try:
            model.load_pretrained(str(path))
        except Exception as exc:
            raise BackboneError(f"checkpoint {path} does not fit the backbone: {type(exc).__name__}: {exc}") from None
        return {}
    state, dropped = CHECKPOINT_LAYOUTS.get(layout)(read_state(path), model)
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise BackboneError(f"checkpoint {path} does not fit the backbone: entries that are not tensors {_short(bad)}")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    parts = _fit_report(missing, [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong], unexpected)
    if parts:
        raise BackboneError(f"checkpoint {path} ({layout} layout) does not fit the backbone: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return dropped


def _npz_problems(model: nn.Module, path: Path) -> list[str]:
    """Missing keys, shape mismatches and surplus encoder blocks of an original-format ViT .npz
    (``ViT-B_16.npz`` names: ``Transformer/encoderblock_{i}/...``) against a timm ViT. Other npz
    layouts (big_vision ``params/...``) are left to timm's converter."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            shapes = {k: tuple(z[k].shape) for k in z.files}
    except Exception as exc:
        return [f"cannot be read as .npz ({type(exc).__name__}: {exc})"]
    prefix = "opt/target/" if "opt/target/embedding/kernel" in shapes else ""
    if f"{prefix}Transformer/encoderblock_0/LayerNorm_0/scale" not in shapes and prefix + "embedding/kernel" not in shapes:
        if any(k.startswith("params/") for k in shapes):
            return []  # big_vision layout: timm handles and reports it
        return [f"not a ViT .npz (no 'embedding/kernel' nor 'Transformer/encoderblock_0/...'; "
                f"keys {_short(sorted(shapes))})"]
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "cls_token"):
        return []
    d = model.cls_token.shape[-1]
    heads = blocks[0].attn.num_heads
    hd = d // heads
    mlp = blocks[0].mlp.fc1.out_features
    want = {"embedding/bias": (d,), "cls": (1, 1, d), "Transformer/encoder_norm/scale": (d,),
            "Transformer/encoder_norm/bias": (d,)}
    for i in range(len(blocks)):
        p = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            want[p + ln + "/scale"] = want[p + ln + "/bias"] = (d,)
        for n in ("query", "key", "value"):
            want[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = (d, heads, hd)
            want[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = (heads, hd)
        want[p + "MultiHeadDotProductAttention_1/out/kernel"] = (heads, hd, d)
        want[p + "MultiHeadDotProductAttention_1/out/bias"] = (d,)
        want[p + "MlpBlock_3/Dense_0/kernel"], want[p + "MlpBlock_3/Dense_0/bias"] = (d, mlp), (mlp,)
        want[p + "MlpBlock_3/Dense_1/kernel"], want[p + "MlpBlock_3/Dense_1/bias"] = (mlp, d), (d,)
    missing = [k for k in want if prefix + k not in shapes]
    wrong = []
    for k in ("embedding/kernel", "Transformer/posembed_input/pos_embedding"):  # resampled by timm: width only
        if prefix + k not in shapes:
            missing.append(k)
        elif shapes[prefix + k][-1] != d:
            wrong.append(f"{k} {shapes[prefix + k]} (width {shapes[prefix + k][-1]}, the model's is {d})")
    wrong += [f"{k} {shapes[prefix + k]} vs {v}" for k, v in want.items()
              if prefix + k in shapes and shapes[prefix + k] != v]
    extra = sorted({k.split("/")[1] for k in shapes if k.startswith(prefix + "Transformer/encoderblock_")
                    and int(k[len(prefix + "Transformer/encoderblock_"):].split("/")[0]) >= len(blocks)})
    return _fit_report([prefix + k for k in missing], wrong, extra,
                       unexpected_what=f"unexpected encoder blocks {{}} (the model has {len(blocks)})")


def _fit_report(missing: list[str], wrong: list[str], unexpected: list[str],
                unexpected_what: str = "unexpected keys {}") -> list[str]:
    """The parts of a "does not fit" message: missing keys, shape mismatches, what is left over."""
    out = []
    if missing:
        out.append(f"missing keys {_short(missing)}")
    if wrong:
        out.append(f"shape mismatch {_short(wrong)}")
    if unexpected:
        out.append(unexpected_what.format(_short(unexpected)))
    return out


def _short(items: list[str], n: int = 6) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


def image_size(model: nn.Module) -> int:
    size = model.patch_embed.img_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def unknown_backbone_message(backbone: str) -> str:
    """'unknown backbone', with the closest timm names and presets."""
    import timm

    arch = backbone.split(".")[0]
    names = list(BACKBONES.names()) + timm.list_models("vit*") + timm.list_models("deit*")
    close = difflib.get_close_matches(arch, names, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (f"unknown backbone {backbone!r}: not a timm model nor a preset ({', '.join(BACKBONES.names())}).{hint} "
            "`peftbench list backbones` lists the presets; any timm ViT name works, with its pretrained tag")
