"""`peftbench bench` and `--dry-run` estimates: what they compute (no timing assertions)."""
import csv

import pytest
from helpers import TINY_BACKBONE, ensure_registered

from peftbench.bench.speed import BenchSettings, run_bench, table_path, targets, write_table
from peftbench.cli import main

ensure_registered()


@pytest.fixture(scope="module")
def rows():
    s = BenchSettings(methods=["linear", "full", "vpt-deep", "e2vpt"], backbone=TINY_BACKBONE, batch_size=4,
                      warmup=1, steps=1, sets=("prompt_tokens=4", "kv_tokens=2"))
    return {r["method"]: r for r in run_bench(s, log=lambda m: None)}


def test_flops_reflect_what_each_method_trains(rows):
    lin, full, vpt = rows["linear"], rows["full"], rows["vpt-deep"]
    # the linear probe never back-propagates into the backbone: its train step costs one forward
    assert lin["gflops_train_per_image"] == pytest.approx(lin["gflops_forward_per_image"], rel=0.01)
    # full fine-tuning: forward + input gradients + weight gradients ~ 3 forwards
    assert 2.5 < full["gflops_train_per_image"] / full["gflops_forward_per_image"] < 3.5
    # prompts lengthen the sequence; a frozen backbone needs no weight gradients (~2 forwards)
    assert vpt["tokens"] == lin["tokens"] + 4 == rows["e2vpt"]["tokens"]
    assert 1.5 < vpt["gflops_train_per_image"] / vpt["gflops_forward_per_image"] < 2.5
    assert rows["e2vpt"]["gflops_forward_per_image"] > vpt["gflops_forward_per_image"]  # + KV prompts
    assert full["train_time_vs_full"] == 1.0


def test_table_and_targets(rows, tmp_path):
    path = table_path(tmp_path, "cpu", TINY_BACKBONE)
    assert path.name == f"bench-cpu-{TINY_BACKBONE}.csv"
    write_table(list(rows.values()), path)
    with open(path) as fh:
        table = list(csv.DictReader(fh))
    assert [r["method"] for r in table] == ["linear", "full", "vpt-deep", "e2vpt"]
    names = [t["target"] for t in targets(list(rows.values()), {"speedup": 30.0})]
    assert any("vpt-deep train step <= 0.75 x full" in n for n in names)
    assert any("e2vpt train step <= 1.1 x vpt-deep" in n for n in names)
    assert any("cached features" in n for n in names)


def test_dry_run_counts_and_estimates(rows, tmp_path, capsys):
    path = table_path(tmp_path, "cpu", TINY_BACKBONE)
    write_table(list(rows.values()), path)
    code = main(["run", "--methods", "vpt-deep,linear", "--suite", "vtab", "--tasks", "dtd,eurosat", "--dry-run",
                 "--bench-table", str(path), "--backbone", TINY_BACKBONE])
    out = capsys.readouterr().out
    assert code == 0
    # VPT protocol: 10 lr x 4 wd search runs + 5 final seeds, per method and task
    assert "total: 180 runs (linear 90, vpt-deep 90)" in out
    assert "device-hours" in out
