"""`peftbench params` for ViT-B/16 equals the formulas of docs/methods/README.md §4 (built on the meta device)."""
import json

import pytest

from peftbench.cli import main

C = 100
H = 769 * C


@pytest.mark.parametrize("method,sets,expected", [
    ("linear", [], 76_900),
    ("vpt-deep", ["prompt_tokens=10"], 169_060),
    ("vpt", ["vpt-deep.prompt_tokens=50"], 9_216 * 50 + H),
    ("vpt-shallow", ["prompt_tokens=100"], 153_700),
    ("full", [], 85_875_556),
])
def test_params_equal_the_documented_formulas(capsys, method, sets, expected):
    args = ["params", "--method", method, "--num-classes", str(C), "--json"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trainable"] == expected
    assert out["trainable_without_head"] == expected - H
    assert out["total"] == 85_798_656 + out["trainable_without_head"] * (method != "full") + H
    assert out["tuned_total_pct"] == pytest.approx(100 * expected / out["total"])


def test_params_human_output(capsys):
    assert main(["params", "--method", "vpt-deep", "--num-classes", "100", "--set", "prompt_tokens=10"]) == 0
    assert "169,060" in capsys.readouterr().out


def test_params_bad_option(capsys):
    assert main(["params", "--method", "linear", "--num-classes", "10", "--set", "prompt_tokens=3"]) == 2
    assert "none of the selected methods has an option 'prompt_tokens'" in capsys.readouterr().err
