"""The PETL methods of docs/methods/{ssf,adaptformer,convpass,fact,repadapter,adapter_plus,difffit,ln_tune}.md
through the real engine (train, record, saved weights) and, for the mergeable ones, `peftbench export`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_BACKBONE, ensure_registered, make_data_root

from peftbench.cli import main

ensure_registered()

MERGEABLE = ["ssf", "fact-tt", "fact-tk", "repadapter", "difffit", "ln-tune"]
NOT_MERGEABLE = ["adaptformer", "convpass", "adapter-plus", "adapter-houlsby"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = make_data_root(tmp_path_factory.mktemp("petldata"))
    runs = tmp_path_factory.mktemp("petlruns")
    code = main(["run", "--methods", ",".join(MERGEABLE + NOT_MERGEABLE), "--suite", "testsuite", "--tasks", "toy",
                 "--data-root", str(root), "--runs-dir", str(runs), "--backbone", TINY_BACKBONE, "--protocol", "fixed",
                 "--seeds", "1", "--epochs", "2", "--batch-size", "16", "--quiet"])
    assert code == 0
    return runs


def _final(runs: Path, method: str) -> dict:
    recs = [json.loads(p.read_text()) for p in Path(runs, method, "toy").glob("*.json") if "." not in p.stem]
    (rec,) = [r for r in recs if r["spec"]["eval_split"] == "test"]
    return rec


@pytest.mark.parametrize("method", MERGEABLE + NOT_MERGEABLE)
def test_every_method_trains_through_the_engine(trained, method):
    rec = _final(trained, method)
    assert rec["status"] == "ok" and 0 <= rec["metrics"]["top1"] <= 100
    assert rec["spec"]["method_version"] == 1
    p = rec["params"]
    assert p["head"] == 49 * 3 and p["trainable"] == p["trainable_without_head"] + p["head"] > p["head"]
    assert rec["weights"] == f"{rec['key']}.final.safetensors"


@pytest.mark.parametrize("method", MERGEABLE)
def test_export_writes_the_merged_plain_vit(trained, tmp_path, capsys, method):
    import timm
    from safetensors.torch import load_file

    rec = _final(trained, method)
    out = tmp_path / "m.safetensors"
    capsys.readouterr()
    assert main(["export", "--runs-dir", str(trained), "--run", rec["key"][:12], "--out", str(out)]) == 0
    cfg = json.loads(out.with_suffix(".json").read_text())
    assert cfg["method"] == method and cfg["max_abs_logit_diff"] < 1e-4
    model = timm.create_model(**cfg["timm"])
    model.load_state_dict(load_file(str(out)))  # strict: exactly the keys of a plain timm ViT
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("method", NOT_MERGEABLE)
def test_export_refuses_the_methods_that_cannot_merge(trained, capsys, method):
    rec = _final(trained, method)
    capsys.readouterr()
    assert main(["export", "--runs-dir", str(trained), "--run", rec["key"][:12]]) == 2
    assert "has no 'merged' model" in capsys.readouterr().err
