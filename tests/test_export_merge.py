"""Merged inference: the methods whose update folds into the backbone's weights give a plain timm ViT
with the same logits; `peftbench export` writes it (safetensors + timm config) and timm loads it back;
`peftbench bench` reports the merged model's inference speed beside the plain backbone's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_BACKBONE, ensure_registered, make_data_root

from peftbench.cli import main

ensure_registered()

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("exportdata"))


def _run(root, runs, methods, *extra):
    return main(["run", "--methods", methods, "--suite", "testsuite", "--tasks", "toy", "--data-root", str(root),
                 "--runs-dir", str(runs), "--backbone", TINY_BACKBONE, "--protocol", "fixed", "--seeds", "1",
                 "--epochs", "2", "--batch-size", "16", "--quiet", *extra])


def _final_record(runs, method):
    recs = [json.loads(p.read_text()) for p in Path(runs, method, "toy").glob("*.json") if "." not in p.stem]
    return next(r for r in recs if r["spec"]["eval_split"] == "test")


def test_export_writes_a_timm_model_with_the_runs_logits(root, tmp_path, capsys):
    import timm
    from safetensors.torch import load_file

    from peftbench.store import RunSpec, RunStore
    from peftbench.train.build import build_model, load_trainable
    from peftbench.train.env import Env

    runs = tmp_path / "runs"
    assert _run(root, runs, "lora") == 0
    rec = _final_record(runs, "lora")
    assert rec["weights"] == f"{rec['key']}.final.safetensors"
    capsys.readouterr()
    assert main(["export", "--runs-dir", str(runs), "--run", rec["key"][:10], "--out", str(tmp_path / "m.safetensors")]) == 0
    cfg = json.loads((tmp_path / "m.json").read_text())
    assert cfg["method"] == "lora" and cfg["peftbench_run"] == rec["key"] and cfg["max_abs_logit_diff"] < 1e-4
    model = timm.create_model(**cfg["timm"])
    model.load_state_dict(load_file(str(tmp_path / "m.safetensors")))  # strict: every key of a plain ViT
    store = RunStore(runs)
    spec = RunSpec.from_dict(rec["spec"])
    tuned = build_model(spec, Env(), store)
    load_trainable(tuned, store.artifact_path(spec, "final.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), tuned.eval()(x), atol=1e-5)


def test_export_refuses_what_cannot_be_merged_or_was_not_kept(root, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert _run(root, runs, "vpt-shallow") == 0
    rec = _final_record(runs, "vpt-shallow")
    capsys.readouterr()
    assert main(["export", "--runs-dir", str(runs), "--run", rec["key"], "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "has no 'merged' model" in capsys.readouterr().err
    assert _run(root, runs, "bitfit", "--save-weights", "none") == 0
    rec = _final_record(runs, "bitfit")
    assert "weights" not in rec
    capsys.readouterr()
    assert main(["export", "--runs-dir", str(runs), "--run", rec["key"]]) == 2
    assert "no saved weights" in capsys.readouterr().err
    assert main(["export", "--runs-dir", str(runs), "--run", "0000nokey"]) == 2


def test_bench_measures_merged_inference_beside_the_plain_backbone():
    from peftbench.bench.speed import BenchSettings, run_bench, targets

    s = BenchSettings(methods=["linear", "lora", "vpt-deep"], backbone=TINY_BACKBONE, batch_size=2, warmup=0,
                      steps=1, precisions=("fp32", "bf16"))
    rows = run_bench(s, log=lambda m: None)
    key = {(r["method"], r["variant"], r["precision"]) for r in rows}
    assert ("lora", "merged", "fp32") in key and ("linear", "merged", "bf16") in key
    # VPT-deep does not merge into the weights; its only variant folds the prompts into keys/values
    assert {r["variant"] for r in rows if r["method"] == "vpt-deep"} == {"", "folded"}
    merged = next(r for r in rows if (r["method"], r["variant"], r["precision"]) == ("lora", "merged", "fp32"))
    plain = next(r for r in rows if (r["method"], r["variant"], r["precision"]) == ("linear", "merged", "fp32"))
    unmerged = next(r for r in rows if (r["method"], r["variant"], r["precision"]) == ("lora", "", "fp32"))
    # the merged LoRA model is the plain architecture: the same FLOPs, fewer than with the LoRA branch
    assert merged["gflops_forward_per_image"] == plain["gflops_forward_per_image"]
    assert unmerged["gflops_forward_per_image"] > merged["gflops_forward_per_image"]
    assert merged["eval_vs_plain"] != "" and "train_step_ms" not in merged
    assert any("lora merged inference" in t["target"] for t in targets(rows, None))
