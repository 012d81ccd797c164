"""VFPT (docs/methods/vfpt.md): the Fourier transform against an explicit cosine sum, what enters every block
(eval and train mode), α = 0 is VPT-deep, gradients, counts, the paper's per-task settings, the folded model."""
from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import pytest
import timm
import torch

from peftbench.cli.params import count
from peftbench.errors import OptionError
from peftbench.methods import get_method
from peftbench.methods.vfpt import VfptModel, fourier_tokens, fourier_transform
from peftbench.tasks import get_task

REFERENCE = Path(__file__).resolve().parents[1] / "peftbench" / "results" / "reference"


def _backbone():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=3, num_heads=3, num_classes=0, global_pool="token")


def _dft_matrix(N: int) -> torch.Tensor:
    k = torch.arange(N, dtype=torch.float64)
    return torch.exp(-2j * math.pi * torch.outer(k, k) / N)  # F[k, j] = e^{-2πi jk/N}


def _cosine_dft(X: torch.Tensor, rows: bool, cols: bool) -> torch.Tensor:
    """Re(F_m X F_D) with explicit DFT matrices (only the chosen axes transformed):
    Σ_j Σ_n X[j, n] cos(2π(jk/m + nl/D)) for both axes."""
    m, D = X.shape
    Z = X.to(torch.complex128)
    if rows:
        Z = _dft_matrix(m) @ Z
    if cols:
        Z = Z @ _dft_matrix(D)
    return Z.real


@pytest.mark.parametrize("dims,rows,cols", [("all", True, True), ("sequence", True, False), ("hidden", False, True)])
def test_fourier_transform_is_the_real_part_of_the_unnormalised_dft(dims, rows, cols):
    torch.manual_seed(0)
    X = torch.randn(2, 3, 8, dtype=torch.float64)
    got = fourier_transform(X, dims)
    for b in range(2):
        assert torch.allclose(got[b], _cosine_dft(X[b], rows, cols), atol=1e-12, rtol=0)
    # the DC entry of the 2-D transform is the sum of all entries (no 1/sqrt(mD) normalisation)
    assert fourier_transform(X, "all")[0, 0, 0].item() == pytest.approx(X[0].sum().item(), abs=1e-12)


def _inputs(model, x):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone())) for b in model.backbone.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("location", ["prepend", "append"])
def test_every_block_sees_the_transformed_prompts(location):
    P, alpha = 5, 0.5
    model = VfptModel(_backbone(), 4, P, alpha, dropout=0.3, location=location).double()
    m = fourier_tokens(P, alpha)
    assert m == 2
    layers = [model.prompt_embeddings[0]] + list(model.deep_prompt_embeddings)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def expected(p):  # (B, P, D) after dropout
        f = _cosine_dft(p[0, :m].detach(), True, True).expand(p.shape[0], -1, -1)
        return torch.cat([f, p[:, m:]] if location == "prepend" else [p[:, m:], f], 1)

    model.eval()
    for got, p in zip(_inputs(model, x), layers):
        assert torch.allclose(got[:, 1:1 + P], expected(p.detach().unsqueeze(0).expand(2, -1, -1)), atol=1e-12)
    # train mode: dropout (one mask per sample) acts on the prompts BEFORE the transform
    model.train()
    torch.manual_seed(3)
    seen = _inputs(model, x)
    torch.manual_seed(3)
    for got, p in zip(seen, layers):
        d = model.prompt_dropout(p.detach().unsqueeze(0).expand(2, -1, -1))
        f = torch.stack([_cosine_dft(d[b, :m], True, True) for b in range(2)])
        want = torch.cat([f, d[:, m:]] if location == "prepend" else [d[:, m:], f], 1)
        assert torch.allclose(got[:, 1:1 + P], want, atol=1e-12)
    assert not torch.equal(seen[0][0, 1:1 + P], seen[0][1, 1:1 + P])  # per-sample masks


def test_zero_percentage_is_vpt_deep_and_full_percentage_transforms_every_prompt():
    torch.manual_seed(0)
    backbone = _backbone()
    vfpt = get_method("vfpt").build(copy.deepcopy(backbone), 4, {"prompt_tokens": 3, "fourier_percentage": 0.0})
    vpt = get_method("vpt-deep").build(copy.deepcopy(backbone), 4, {"prompt_tokens": 3, "dropout": 0.1})
    vpt.load_state_dict(vfpt.state_dict())
    x = torch.randn(2, 3, 32, 32)
    vfpt.eval(), vpt.eval()
    with torch.no_grad():
        assert torch.equal(vfpt(x), vpt(x))
    full = VfptModel(copy.deepcopy(backbone), 4, 3, 1.0).double().eval()
    got = _inputs(full, x.double())[1][:, 1:4]
    assert torch.allclose(got[0], _cosine_dft(full.deep_prompt_embeddings[0].detach(), True, True), atol=1e-12)


def test_only_the_prompts_and_the_head_get_gradients():
    model = get_method("vfpt").build(_backbone(), 4, {"prompt_tokens": 4, "fourier_percentage": 0.5})
    model.train()
    assert not model.backbone.training and model.prompt_dropout.training and model.head.training
    torch.nn.functional.cross_entropy(model(torch.randn(3, 3, 32, 32)), torch.tensor([0, 1, 2])).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {"prompt_embeddings", "deep_prompt_embeddings", "head.weight", "head.bias"}
    # the Fourier prompts (rows 0, 1) get a gradient through the transform
    assert model.deep_prompt_embeddings.grad[:, :2].abs().sum() > 0


def test_settings_are_checked_before_compute():
    m = get_method("vfpt")
    with pytest.raises(OptionError, match="0 Fourier tokens"):
        m.resolve_options(m.parse_options({"prompt_tokens": "1", "fourier_percentage": "0.5"}), None)
    with pytest.raises(OptionError, match="above its maximum"):
        m.parse_options({"fourier_percentage": "1.5"})


def _printed(name: str) -> dict[str, dict[str, str]]:
    with open(REFERENCE / name, newline="") as fh:
        return {r["method"]: r for r in csv.DictReader(fh)}


def test_paper_settings_reproduce_the_printed_tuned_total():
    """P from methods/vfpt_settings.csv with the task's head gives the paper's Tuned/Total (Tables S1-S4),
    counted on ViT-B/16 (meta device): 100·(9,216·P + 769·C)/(85,798,656 + 9,216·P + 769·C)."""
    method = get_method("vfpt")
    printed = {**_printed("vtab-tuned_total_pct.csv")["VFPT"], **_printed("fgvc-tuned_total_pct.csv")["VFPT"]}
    checked = 0
    for task_name in ("cifar100", "caltech101", "dtd", "svhn", "sun397", "patch_camelyon", "diabetic_retinopathy",
                      "clevr_distance", "kitti_distance", "smallnorb_azimuth", "cub200", "stanford_cars"):
        task = get_task(task_name)
        opts, sources = method.resolve_options(method.parse_options({}), task)
        assert "vfpt_settings.csv" in sources["prompt_tokens"]
        classes = 196 if task_name == "kitti_distance" else task.num_classes  # the official kitti config's head
        c = count("vfpt", classes, sets=[f"prompt_tokens={opts['prompt_tokens']}",
                                         f"fourier_percentage={opts['fourier_percentage']}"])
        P = opts["prompt_tokens"]
        assert c["trainable"] == c["tuned"] == 9_216 * P + 769 * classes
        assert c["total"] == 85_798_656 + c["trainable"]
        assert round(c["tuned_total_pct"], 2) == float(printed[task_name]), task_name
        checked += 1
    assert checked == 12
    opts, _ = method.resolve_options(method.parse_options({}), get_task("cifar100"))
    assert (opts["prompt_tokens"], opts["fourier_percentage"]) == (10, 0.7)
    opts, src = method.resolve_options(method.parse_options({}), get_task("oxford_iiit_pet"))
    assert opts["prompt_tokens"] == 10 and "default" in src["prompt_tokens"] and opts["fourier_percentage"] == 0.5


def test_folded_vfpt_has_the_same_logits():
    torch.manual_seed(0)
    model = VfptModel(_backbone(), 4, 6, 0.5).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.eval()
    folded = model.inference_variants()["folded"]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-10, rtol=0)
    assert folded.num_prompts == 0
