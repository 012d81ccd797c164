"""A method from a package outside peftbench, found through its ``peftbench.methods`` entry point.

The package is written into tmp_path as an installed distribution would leave it on sys.path (a
module + ``<name>-<version>.dist-info/`` with METADATA and entry_points.txt), put on PYTHONPATH, and
the real CLI runs it in a subprocess: no change to peftbench, no pip install.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

METHOD = "plugin-lntune"

PLUGIN_SOURCE = '''
"""LayerNorm tuning: every LayerNorm weight and bias of the backbone + the head."""
from torch import nn

from peftbench.methods import FULL_FT_RECIPE, Method, Option, TunedViT


class LayerNormTuning(Method):
    name = "plugin-lntune"
    description = "LayerNorm tuning (external plugin): LayerNorm weights and biases + head"
    recipe = FULL_FT_RECIPE
    options = {"final_norm": Option(True, "also train the final LayerNorm")}

    def build(self, backbone, num_classes, opts):
        model = TunedViT(backbone, num_classes)  # freezes the backbone, adds the head
        for name, module in backbone.named_modules():
            if isinstance(module, nn.LayerNorm) and (opts["final_norm"] or name != "norm"):
                for p in module.parameters():
                    p.requires_grad = True
        return model
'''


def _write_package(site: Path) -> None:
    site.mkdir(parents=True, exist_ok=True)
    (site / "pb_plugin_demo.py").write_text(PLUGIN_SOURCE)
    info = site / "pb_plugin_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pb-plugin-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[peftbench.methods]\n{METHOD} = pb_plugin_demo:LayerNormTuning\n")


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("peftbench")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "peftbench"]


@pytest.fixture
def plugin_env(tmp_path):
    site = tmp_path / "site"
    _write_package(site)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["HF_HUB_OFFLINE"] = "1"
    env["PEFTBENCH_CACHE"] = str(tmp_path / "cache")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def test_external_method_is_listed(plugin_env):
    out = subprocess.run(_cli() + ["list", "methods"], env=plugin_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    line = next((ln for ln in out.stdout.splitlines() if ln.split() and ln.split()[0] == METHOD), None)
    assert line is not None, out.stdout
    assert "external plugin" in line


def test_external_method_runs_on_the_demo_suite(plugin_env, tmp_path, demo_root):
    runs, data = tmp_path / "runs", demo_root  # demo_root: a session-wide tmp data root (conftest)
    cmd = _cli() + ["run", "--methods", METHOD, "--suite", "demo", "--tasks", "demo_digits", "--epochs", "1",
                    "--backbone", "demo-vit-random", "--data-root", str(data), "--runs-dir", str(runs), "--quiet"]
    out = subprocess.run(cmd, env=plugin_env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    records = sorted((runs / METHOD / "demo_digits").glob("*.json"))
    assert records, f"no run record under {runs}: {out.stdout}{out.stderr}"
    record = json.loads(records[0].read_text())
    assert record["status"] == "ok", record.get("error")
    assert record["spec"]["method"] == METHOD
    assert record["metrics"]["top1"] is not None
    # 6 blocks x 2 LayerNorms + final norm, weight and bias each, width 96; head 97 x 10
    assert record["params"]["trainable_without_head"] == (6 * 2 + 1) * 2 * 96
    assert record["params"]["head"] == 97 * 10
