"""Visual Fourier Prompt Tuning (Zeng et al., NeurIPS 2024): docs/methods/vfpt.md.

VPT-deep whose first m = ⌊P·α⌋ prompts of every layer pass through a 2-D discrete Fourier transform
(real part, unnormalised, over the m prompt tokens and the D channels) before they enter the block:

    layer input = [CLS, Re(F_m · drop(P_i[0:m]) · F_D), drop(P_i[m:P]), patches]

(``fourier_location=prepend``, the method; ``append`` puts the transformed block after the plain one).
The transform has no parameters: ViT-B/16 trains 9,216·P + 769·C parameters, as VPT-deep. α = 0 is
exactly VPT-deep. ``fourier_dims`` = ``sequence`` / ``hidden`` are the paper's Table 5 ablations
(1-D transforms along one axis only).

``prompt_tokens`` / ``fourier_percentage`` = ``auto`` take the paper's per-task values (data file
``methods/vfpt_settings.csv``: α printed in Tables S1–S4, P inferred from their Tuned/Total); tasks
not listed get P = 10, α = 0.5 (the official config default). Inference: the folded model of
:class:`~peftbench.layers.prompted_vit.PromptedViT` (transformed prompts → fixed keys/values).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from peftbench.layers.prompted_vit import PromptedViT
from peftbench.methods import PROMPT_RECIPE, VPT_LR_GRID, Method, Option, OptionError, PerTask, register_method

SETTINGS_FILE = Path(__file__).with_name("vfpt_settings.csv")
FALLBACK_TOKENS = 10
FALLBACK_PERCENTAGE = 0.5  # MODEL.PROMPT_FOURIER.FOURIER_PERCENTAGE default (src/configs/config.py)
DIMS = ("all", "sequence", "hidden")
LOCATIONS = ("prepend", "append")


def fourier_tokens(prompt_tokens: int, percentage: float) -> int:
    """m = ⌊P·α⌋ (the official ``math.floor``); 0 for α = 0."""
    return 0 if percentage == 0 else math.floor(prompt_tokens * percentage)


def fourier_transform(x: torch.Tensor, dims: str = "all") -> torch.Tensor:
    """Re(FFT) of (B, m, D) prompts: over both axes (``all``), the tokens (``sequence``) or the channels (``hidden``)."""
    if dims == "all":
        return torch.fft.fft2(x, dim=(-2, -1)).real
    if dims == "sequence":
        return torch.fft.fft(x, dim=-2).real
    if dims == "hidden":
        return torch.fft.fft(x, dim=-1).real
    raise ValueError(f"unknown fourier_dims {dims!r} (known: {', '.join(DIMS)})")


class VfptModel(PromptedViT):
    """Frozen timm ViT + deep prompts, the first ⌊P·α⌋ of each layer Fourier-transformed, + head."""

    def __init__(self, backbone: nn.Module, num_classes: int, prompt_tokens: int, percentage: float,
                 dropout: float = 0.1, dims: str = "all", location: str = "prepend"):
        super().__init__(backbone, num_classes, int(prompt_tokens), deep=True, dropout=float(dropout))
        self.percentage = float(percentage)
        self.fourier_num_tokens = fourier_tokens(self.num_prompts, self.percentage)
        self.dims, self.location = dims, location

    def transform_prompts(self, prompts: torch.Tensor) -> torch.Tensor:
        m = self.fourier_num_tokens
        if m == 0:
            return prompts
        x = prompts[:, :m]
        if x.dtype in (torch.float16, torch.bfloat16):  # FFTs of any length need fp32 (or fp64)
            x = x.float()
        with torch.autocast(x.device.type, enabled=False):
            f = fourier_transform(x, self.dims).to(prompts.dtype)
        rest = prompts[:, m:]
        return torch.cat([f, rest] if self.location == "prepend" else [rest, f], dim=1)


def check_settings(prompt_tokens: int, percentage: float) -> None:
    if not 0.0 <= percentage <= 1.0:
        raise OptionError(f"option 'fourier_percentage': {percentage!r} is not in [0, 1]")
    if percentage > 0 and fourier_tokens(prompt_tokens, percentage) == 0:
        raise OptionError(f"options prompt_tokens={prompt_tokens}, fourier_percentage={percentage:g}: ⌊P·α⌋ = 0 Fourier "
                          f"tokens (the official code would transform an empty tensor); use fourier_percentage=0 "
                          f"(plain VPT-deep) or at least {math.ceil(1 / percentage)} prompt tokens")


FGVC_LR_GRID = tuple(lr for lr in VPT_LR_GRID if lr != 0.05)
VFPT_RECIPE = PROMPT_RECIPE.for_suite(
    "fgvc", "VFPT tune_fgvc.py: the VTAB lr grid without 0.05 (docs/methods/vfpt.md §4)", lr_grid=FGVC_LR_GRID)


@register_method
class Vfpt(Method):
    name = "vfpt"
    fusable = True  # the prompts stacked per configuration; the FFT runs under vmap
    aliases = ("visual-fourier-prompt-tuning",)
    description = "VFPT: VPT-deep with a 2-D FFT (real part) on a fraction of the prompts (docs/methods/vfpt.md)"
    recipe = VFPT_RECIPE  # SGD momentum 0.9, batch 64, 100 epochs, warm-up 10, VPT lr x wd grid
    options = {
        "prompt_tokens": Option("auto", "prompt length P per layer (auto: the paper's per-task value, "
                                        "docs/methods/vfpt.md §5; else 10)", type=int, min=0,
                                per_task=PerTask(SETTINGS_FILE, FALLBACK_TOKENS, column="prompt_tokens")),
        "fourier_percentage": Option("auto", "fraction α of each layer's prompts that are Fourier-transformed, "
                                             "m = floor(P·α) (auto: the paper's per-task value; else 0.5)",
                                     type=float, min=0.0, max=1.0,
                                     per_task=PerTask(SETTINGS_FILE, FALLBACK_PERCENTAGE, column="fourier_percentage")),
        "dropout": Option(0.1, "dropout on the prompts, before the transform (train mode only)", min=0.0, max=1.0),
        "fourier_dims": Option("all", "all: 2-D FFT over tokens and channels (the method); sequence / hidden: 1-D "
                                      "ablations (paper Table 5)", choices=DIMS),
        "fourier_location": Option("prepend", "the transformed prompts first (prepend, the method) or after the "
                                              "plain ones (append, ablation)", choices=LOCATIONS),
    }

    def resolve_options(self, opts, task):
        opts, sources = super().resolve_options(opts, task)
        check_settings(int(opts["prompt_tokens"]), float(opts["fourier_percentage"]))
        return opts, sources

    def build(self, backbone, num_classes, opts):
        P, alpha = int(opts["prompt_tokens"]), float(opts["fourier_percentage"])
        check_settings(P, alpha)
        return VfptModel(backbone, num_classes, P, alpha, dropout=float(opts.get("dropout", 0.1)),
                         dims=str(opts.get("fourier_dims", "all")), location=str(opts.get("fourier_location", "prepend")))
