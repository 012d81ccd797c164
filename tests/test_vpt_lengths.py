"""VPT's own per-task prompt lengths (vpt-deep / vpt-shallow ``prompt_tokens=auto``, docs/methods/vpt.md §7):
every value in methods/vpt_prompt_lengths.csv reproduces the printed per-task Tuned/Total."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from peftbench.cli.params import count
from peftbench.methods import get_method
from peftbench.tasks import get_task

REFERENCE = Path(__file__).resolve().parents[1] / "peftbench" / "results" / "reference"


def _rows(name):
    with open(REFERENCE / name, newline="") as fh:
        return {r["method"]: r for r in csv.DictReader(fh)}


@pytest.mark.parametrize("method,row", [("vpt-deep", "VPT-deep"), ("vpt-shallow", "VPT-shallow")])
def test_auto_prompt_lengths_reproduce_the_printed_tuned_total(method, row):
    printed = {**_rows("vtab-tuned_total_pct.csv")[row], **_rows("fgvc-tuned_total_pct.csv")[row]}
    m = get_method(method)
    checked = 0
    for name, pct in printed.items():
        try:
            task = get_task(name)
        except KeyError:
            continue
        opts, sources = m.resolve_options(m.parse_options({}), task)
        if "default" in sources["prompt_tokens"]:  # FGVC shallow: no source, not invertible
            assert method == "vpt-shallow" and task.suite == "fgvc"
            continue
        c = count(method, task.num_classes, sets=[f"prompt_tokens={opts['prompt_tokens']}"])
        assert round(c["tuned_total_pct"], 2) == float(pct), (name, opts["prompt_tokens"])
        checked += 1
    assert checked == (24 if method == "vpt-deep" else 19)


def test_shallow_lengths_are_the_vpt_or_ft_tables():
    m = get_method("vpt-shallow")
    want = {"caltech101": 5, "sun397": 1, "diabetic_retinopathy": 10, "patch_camelyon": 5, "cifar100": 100}
    for name, p in want.items():
        opts, _ = m.resolve_options(m.parse_options({}), get_task(name))
        assert opts["prompt_tokens"] == p, name
