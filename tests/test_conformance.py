"""The method contract, checked for every built-in method of the registry (parametrised from the registry
itself, so a new method is tested without anyone writing a list; its row in tests/method_settings.py is
required). What every method must do (docs/methods/README.md §2-4, docs/plugins.md §1):

* have a settings row, a docs page and a row in the README's methods table;
* build on the meta device with the counts of the built model, and on ViT-B/16 with its documented count;
* on every backbone family it claims (``Method.families``: a tiny backbone of each, FAMILY_BACKBONES), pass the
  gradient, state, fused and inference-model checks below;
* train exactly what ``requires_grad`` names (gradients reach those tensors and nothing else) and keep every
  module but ``train_modules`` in eval mode;
* give the same logits after its trained state is saved and loaded into a freshly built model;
* if ``fusable``: K models fused under vmap give each model's own logits and gradients;
* offer exactly the inference models its row says, each with the model's logits;
* train one epoch through the engine on the toy suite, its own stages included, and record it.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_BACKBONE, ensure_registered, make_data_root
from method_settings import SETTINGS, MethodSettings

from peftbench.backbones import create_backbone
from peftbench.methods import METHODS
from peftbench.train.build import load_trainable, save_trainable
from peftbench.train.fused import FusedModel

ensure_registered()
ROOT = Path(__file__).resolve().parent.parent
# every built-in method (plugins a test module registers are not the project's to list)
BUILTIN = sorted(n for n, m in METHODS.items() if type(m).__module__.startswith("peftbench.methods."))
CLASSES = 5
# a tiny backbone of every family a method may claim (peftbench.backbones.TUNED_FAMILIES), 32-pixel input
FAMILY_BACKBONES = {"vit": TINY_BACKBONE, "swin": "demo-swin-tiny"}
# (method, family) for every family each method claims
CASES = [pytest.param(n, f, id=f"{n}-{f}") for n in BUILTIN for f in METHODS.get(n).families]


def row(name: str) -> MethodSettings:
    if name not in SETTINGS:
        pytest.fail(f"method {name!r} has no row in tests/method_settings.py: add SETTINGS[{name!r}] = "
                    "MethodSettings(options=..., vit_b=(options, trainable without head on ViT-B/16), variants=...)")
    return SETTINGS[name]


def options(name: str, raw: dict | None = None) -> dict:
    m = METHODS.get(name)
    opts, _ = m.resolve_options(m.parse_options(row(name).options if raw is None else raw), None)
    return opts


def pretrained(family: str = "vit") -> torch.nn.Module:
    """The tiny backbone of ``family``, the same weights every time (as a pretrained one would be)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_backbone(FAMILY_BACKBONES[family], pretrained=False)


def build(name: str, seed: int = 0, backbone=None, num_classes: int = CLASSES, raw: dict | None = None,
          family: str = "vit"):
    """The method's model; ``seed``: its own initialisation."""
    backbone = backbone if backbone is not None else pretrained(family)
    torch.manual_seed(seed)
    return METHODS.get(name).build(backbone, num_classes, options(name, raw))


def perturb(model, scale: float = 0.05) -> None:
    """Move every trained tensor off its initial value (LoRA's B = 0 would make many checks trivial)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    a, b = a.double(), b.double()
    return a.shape == b.shape and (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def image(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# the table itself
# ---------------------------------------------------------------------------------------------


def test_every_family_a_method_claims_has_a_tiny_backbone_here():
    from peftbench.backbones import TUNED_FAMILIES

    for n in BUILTIN:
        unknown = [f for f in METHODS.get(n).families if f not in FAMILY_BACKBONES]
        assert not unknown, f"{n} claims {unknown}: add a tiny backbone of that family to FAMILY_BACKBONES"
    assert set(FAMILY_BACKBONES) == set(TUNED_FAMILIES)


def test_the_settings_table_has_a_row_for_every_method_and_only_for_methods():
    missing = [n for n in BUILTIN if n not in SETTINGS]
    assert not missing, f"add a row to tests/method_settings.py for: {', '.join(missing)}"
    unknown = [n for n in SETTINGS if n not in BUILTIN]
    assert not unknown, f"tests/method_settings.py has rows for methods that are not registered: {unknown}"


@pytest.mark.parametrize("name", BUILTIN)
def test_documented_in_its_page_and_in_the_readme_table(name):
    m = METHODS.get(name)
    pages = re.findall(r"docs/methods/[\w.-]+\.md", m.description)
    page = row(name).doc or (pages[0] if pages else "")
    assert page, f"{name}: its description names no docs/methods/<page>.md and its row gives no doc"
    assert (ROOT / page).is_file(), f"{name}: {page} does not exist"
    assert name in (ROOT / page).read_text(encoding="utf-8"), f"{name}: {page} never names the method"
    table = (ROOT / "README.md").read_text(encoding="utf-8")
    first_cells = re.findall(r"^\|([^|]*)\|", table, re.M)  # a row may name a family: `lora` (+ `dora`, ...)
    assert any(f"`{name}`" in cell for cell in first_cells), f"{name}: not in the first column of the README's methods table"


# ---------------------------------------------------------------------------------------------
# counts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN)
def test_counts_on_the_meta_device_equal_the_built_model_and_the_documented_formula(name):
    real = build(name)
    with torch.device("meta"):
        meta = build(name, backbone=create_backbone(TINY_BACKBONE, pretrained=False))
    counts = real.parameter_counts()
    assert meta.parameter_counts() == counts  # what `peftbench params` reports is what trains
    assert counts["trainable"] == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert counts["trainable"] == counts["trainable_without_head"] + counts["head"] and counts["head"] > 0
    assert counts["tuned"] <= counts["trainable"] <= counts["total"]
    r = row(name)
    if r.vit_b is None:
        assert r.counts_elsewhere, f"{name}: give vit_b=(options, count) or say in counts_elsewhere which test counts it"
        return
    raw, expected = r.vit_b
    with torch.device("meta"):
        vit_b = build(name, backbone=create_backbone("vit_base_patch16_224", pretrained=False), num_classes=100, raw=raw)
    c = vit_b.parameter_counts()
    assert c["trainable_without_head"] == expected, f"{name}: {c['trainable_without_head']:,} != documented {expected:,}"
    assert c["head"] == r.vit_b_head


# ---------------------------------------------------------------------------------------------
# frozen means eval mode and no gradient
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,family", CASES)
def test_gradients_reach_exactly_the_trainable_tensors_and_frozen_modules_stay_in_eval(name, family):
    model = build(name, family=family).double()
    perturb(model)
    model.train()
    trained = {id(m) for t in model.train_modules for m in t.modules()}
    # a module with nothing trainable in it (the frozen backbone, its dropout) is in eval mode unless the method
    # put it into train_modules; a method's own modules (a tuner layer holding trained tensors) may follow ``mode``
    moving = [n for n, m in model.named_modules() if n and m.training and id(m) not in trained
              and not any(p.requires_grad for p in m.parameters())]
    assert not moving, f"{name}: frozen modules in train mode outside train_modules: {moving[:5]}"
    assert all(m.training for t in model.train_modules for m in t.modules())
    torch.manual_seed(1)
    F.cross_entropy(model(image()), torch.arange(4) % CLASSES).backward()
    wants = {n for n, p in model.named_parameters() if p.requires_grad}
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == wants, f"{name}: gradient without requires_grad {sorted(got - wants)[:5]}, " \
                         f"requires_grad without gradient {sorted(wants - got)[:5]}"
    assert wants and any(not p.requires_grad for p in model.parameters()) or name == "full"


# ---------------------------------------------------------------------------------------------
# the trained state is the whole state
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,family", CASES)
def test_saved_and_loaded_trainable_state_gives_the_same_logits(name, family, tmp_path):
    a = build(name, seed=0, family=family).double()
    perturb(a)
    a.train()
    with torch.no_grad():  # a train-mode pass: batch-norm statistics of the trained modules move too
        a(image())
    save_trainable(a, tmp_path / "w.safetensors")
    b = build(name, seed=1, family=family).double()  # another initialisation
    load_trainable(b, tmp_path / "w.safetensors")
    with torch.no_grad():
        la, lb = a.eval()(image()), b.eval()(image())
    assert torch.equal(la, lb), f"{name}: logits differ by {(la - lb).abs().max().item():.3g} after save + load"


# ---------------------------------------------------------------------------------------------
# fusable => fused equals separate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,family", [c for c in CASES if METHODS.get(c.values[0]).fusable])
def test_fused_forward_and_gradients_equal_each_models_own(name, family):
    """K models of a fusable method under vmap (timm's attention, prompts, peft layers, batch norm, dropout on):
    the fused logits and gradients are each model's own, with different trained values per model. In float64,
    so that what is compared is the maths, not float32 rounding."""
    m = METHODS.get(name)
    backbone = create_backbone(FAMILY_BACKBONES[family], pretrained=False)
    models = []
    for k in range(3):
        model = build(name, seed=0, backbone=copy.deepcopy(backbone)).double()
        perturb(model, 0.05 * (k + 1))
        models.append(model)
    reference = [copy.deepcopy(model) for model in models]
    fused = FusedModel(models[0], cached=m.frozen_features)
    for model in models[1:]:
        fused.add(model)
    frozen = [n for n, p in models[0].named_parameters() if not p.requires_grad]
    assert all(models[2].get_parameter(n) is models[0].get_parameter(n) for n in frozen)  # stored once
    x = torch.randn(4, models[0].backbone.num_features) if m.frozen_features else torch.randn(4, 3, 32, 32)
    x, y = x.double(), torch.tensor([0, 1, 2, 3])
    fused.base.train()
    torch.manual_seed(7)
    logits = fused.forward(x)
    sum(F.cross_entropy(logits[k], y) for k in range(3)).backward()
    tol = row(name).tol
    for k, ref in enumerate(reference):
        ref.train()
        torch.manual_seed(7)  # the same dropout masks as the fused forward drew
        out = (ref.head if m.frozen_features else ref)(x)
        F.cross_entropy(out, y).backward()
        assert close(logits[k], out, tol)
        for (n, p), (_, q) in zip(models[k].named_parameters(), ref.named_parameters()):
            if q.requires_grad and q.grad is not None:
                assert close(p.grad, q.grad, tol), n
        for n, b in ref.named_buffers():  # batch-norm statistics updated as each model's own forward does
            assert close(models[k].get_buffer(n), b, tol), n


# ---------------------------------------------------------------------------------------------
# inference models (merged / folded / compacted) give the model's logits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,family", CASES)
def test_inference_models_are_those_declared_and_give_the_same_logits(name, family):
    from peftbench.layers.merge import is_plain_timm

    model = build(name, family=family).double()
    perturb(model)
    model.eval()
    variants = model.inference_variants()
    declared = row(name).family_variants.get(family, row(name).variants)
    assert sorted(variants) == sorted(declared), f"{name} on {family}: offers {sorted(variants)}, its row says " \
                                                 f"{sorted(declared)}"
    with torch.no_grad():
        expected = model(image())
        for vname, variant in variants.items():
            got = variant.double().eval()(image())
            assert close(got, expected, row(name).tol), f"{name} {vname}: {(got - expected).abs().max().item():.3g}"
    if "merged" in variants:
        merged = variants["merged"]
        assert is_plain_timm(merged) and not any(p.requires_grad for p in merged.parameters())  # what export writes
        untouched = build(name, family=family).double().eval().inference_variants()["merged"].double().eval()
        with torch.no_grad():  # the trained tensors are really in the merged weights
            assert (untouched(image()) - expected).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# one epoch through the engine, the method's own stages included
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every built-in method, one epoch, on the toy task under the fixed protocol (one sweep: their selection
    jobs, searches and final runs through the real engine and the run store)."""
    from peftbench.cli import main

    root = make_data_root(tmp_path_factory.mktemp("confdata"))
    runs = tmp_path_factory.mktemp("confruns")
    sets = [f"{n}.{k}={v}" for n in BUILTIN for k, v in row(n).options.items()]
    args = ["run", "--methods", ",".join(BUILTIN), "--suite", "testsuite", "--tasks", "toy", "--data-root", str(root),
            "--runs-dir", str(runs), "--backbone", TINY_BACKBONE, "--protocol", "fixed", "--seeds", "1",
            "--epochs", "1", "--batch-size", "16", "--quiet"]
    for s in sets:
        args += ["--set", s]
    code = main(args)
    return runs, code


@pytest.mark.parametrize("name", BUILTIN)
def test_one_epoch_through_the_engine_is_recorded(trained, name):
    runs, code = trained
    assert code == 0
    recs = [json.loads(p.read_text()) for p in Path(runs, name, "toy").glob("*.json") if "." not in p.stem]
    assert recs, f"{name}: no record"
    assert all(r["status"] == "ok" for r in recs), [(r["spec"]["stage"], r["error"]) for r in recs if r["status"] != "ok"]
    (final,) = [r for r in recs if r["spec"]["stage"] == "final"]
    assert 0 <= final["metrics"]["top1"] <= 100 and len(final["history"]) == 1
    p = final["params"]
    assert p["trainable"] == p["trainable_without_head"] + p["head"] and p["head"] > 0
    assert final["weights"] == f"{final['key']}.final.safetensors"
    assert set(final["code"]) == {"method", "engine"} and final["code"]["method"] != "unknown"


@pytest.mark.parametrize("name", BUILTIN)
def test_export_writes_a_plain_timm_vit_exactly_when_the_method_merges(trained, tmp_path, capsys, name):
    """`peftbench export` of the method's final run: a plain timm ViT (safetensors + its timm config, loaded
    strictly) with the run's logits when the method merges; a one-line refusal otherwise."""
    import timm
    from safetensors.torch import load_file

    from peftbench.cli import main

    runs, _ = trained
    recs = [json.loads(p.read_text()) for p in Path(runs, name, "toy").glob("*.json") if "." not in p.stem]
    (final,) = [r for r in recs if r["spec"]["stage"] == "final"]
    out = tmp_path / "m.safetensors"
    capsys.readouterr()
    code = main(["export", "--runs-dir", str(runs), "--run", final["key"][:12], "--out", str(out)])
    if "merged" not in row(name).variants:
        assert code == 2 and "has no 'merged' model" in capsys.readouterr().err
        return
    assert code == 0, capsys.readouterr().err
    cfg = json.loads(out.with_suffix(".json").read_text())
    assert cfg["method"] == name and cfg["max_abs_logit_diff"] < 1e-4
    model = timm.create_model(**cfg["timm"])
    model.load_state_dict(load_file(str(out)))  # strict: exactly the keys of a plain timm ViT
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("name", BUILTIN)
def test_export_folder_loads_back_with_the_runs_logits(trained, tmp_path, name):
    """`peftbench export` of the method's final run as a hub folder: every method (prompt methods too) in peftbench's
    format, which `peftbench.load_pretrained` turns back into the trained model; timm's format exactly when the method
    merges; a peft adapter exactly when it is one of peft's tuners; a model card whose metadata the hub reads."""
    from huggingface_hub import ModelCard

    import peftbench
    from peftbench.export import export_folder
    from peftbench.methods.peft_tuners import PeftTunerMethod
    from peftbench.store import RunSpec, RunStore
    from peftbench.train.build import build_model, load_trainable
    from peftbench.train.env import Env

    runs, _ = trained
    recs = [json.loads(p.read_text()) for p in Path(runs, name, "toy").glob("*.json") if "." not in p.stem]
    (final,) = [r for r in recs if r["spec"]["stage"] == "final"]
    done = export_folder(runs, tmp_path / "out", method=name, task="toy")
    assert done.key == final["key"]
    kinds = {"peftbench"} | ({"timm"} if "merged" in row(name).variants else set()) \
        | ({"peft"} if isinstance(METHODS.get(name), PeftTunerMethod) else set())
    assert set(done.diffs) == kinds, f"{name}: exported {sorted(done.diffs)}"
    store = RunStore(runs)
    spec = RunSpec.from_dict(final["spec"])
    trained_model = build_model(spec, Env(device="cpu"), store)
    load_trainable(trained_model, store.artifact_path(spec, "final.safetensors"))
    loaded = peftbench.load_pretrained(done.folder)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(x), trained_model.eval()(x)), name
    card = ModelCard.load(done.folder / "README.md")
    assert card.data.eval_results[0].metric_value == pytest.approx(final["metrics"]["top1"], abs=1e-3)
