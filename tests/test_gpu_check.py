"""The checks scripts/gpu_check.sh runs on a GPU, run here on the CPU: bf16 autocast against fp32, and
the fused attention path (SDPA) against timm's explicit path, key-value prompt attention included."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import TINY_BACKBONE, ensure_registered

ensure_registered()
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_checks.py"


@pytest.fixture(scope="module")
def checks():
    spec = importlib.util.spec_from_file_location("gpu_checks", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_checks_pass_on_the_cpu(checks, tmp_path):
    out = tmp_path / "check.json"
    assert checks.main(["--device", "cpu", "--backbone", TINY_BACKBONE, "--batch-size", "8", "--set", "prompt_tokens=4",
                        "--set", "kv_tokens=2", "--out", str(out)]) == 0
    import json

    results = json.loads(out.read_text())["results"]
    assert {(r["check"], r["method"]) for r in results} == {
        ("precision", "e2vpt"), ("precision", "vpt-deep"), ("sdpa", "linear"), ("sdpa", "vpt-deep"), ("sdpa", "e2vpt")}
    assert all(r["attention_modules"] == 3 for r in results if r["check"] == "sdpa")  # every block of the tiny ViT


def test_the_explicit_attention_path_of_kv_prompts_equals_sdpa_in_float64(checks):
    model = checks.build("e2vpt", TINY_BACKBONE, ["prompt_tokens=4", "kv_tokens=2"], torch.device("cpu")).double()
    with torch.no_grad():
        for m in model.modules():  # non-zero prompts: the comparison covers the prompted keys and values
            for name in ("k_prompt", "v_prompt", "kv_prompt"):
                if isinstance(getattr(m, name, None), torch.nn.Parameter):
                    getattr(m, name).normal_()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        checks._set_fused(model, True)
        fused = model(x)
        checks._set_fused(model, False)
        explicit = model(x)
    assert torch.allclose(fused, explicit, atol=1e-12, rtol=0)
    assert fused.abs().max() > 0


def test_a_check_that_fails_makes_the_script_fail(checks, monkeypatch):
    monkeypatch.setattr(checks, "REL_L2", 0.0)  # no rounding error allowed: bf16 must then fail
    assert checks.main(["--device", "cpu", "--backbone", TINY_BACKBONE, "--batch-size", "4"]) == 1
