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
    return {r["method"]: r for r in run_bench(s, log=lambda m: None) if not r["variant"]}


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


def test_bench_writes_one_row_per_precision_and_the_estimate_uses_the_runs_precision(tmp_path, capsys):
    from types import SimpleNamespace

    from peftbench.bench.estimate import estimate_seconds
    from peftbench.bench.speed import read_table

    out = tmp_path / "b"
    assert main(["bench", "--backbone", TINY_BACKBONE, "--methods", "linear,lora", "--batch-size", "2", "--warmup",
                 "0", "--steps", "1", "--precision", "fp32,bf16", "--out", str(out), "--no-probe"]) == 0
    with open(out / f"bench-cpu-{TINY_BACKBONE}.csv") as fh:
        table = list(csv.DictReader(fh))
    assert {(r["method"], r["variant"], r["precision"]) for r in table} >= {
        ("linear", "", "fp32"), ("linear", "", "bf16"), ("lora", "", "fp32"), ("lora", "", "bf16"),
        ("lora", "merged", "fp32"), ("linear", "merged", "bf16")}
    rows = read_table(out / f"bench-cpu-{TINY_BACKBONE}.csv")
    rows[("lora", "bf16")] = {**rows[("lora", "bf16")], "train_images_per_s": "1000", "eval_images_per_s": "1000"}
    rows[("lora", "fp32")] = {**rows[("lora", "fp32")], "train_images_per_s": "10", "eval_images_per_s": "10"}
    task = SimpleNamespace(name="toy", split_sizes={"train": 100, "test": 0})
    ctx = SimpleNamespace(task=task, data_root="")

    def spec(precision):
        return SimpleNamespace(method="lora", job="train", task="toy", train_split="train", eval_split="test",
                               hparams={"epochs": 1, "precision": precision})

    import peftbench.bench.estimate as est

    old = est.get_task
    est.get_task = lambda name: SimpleNamespace(split_sizes={"train": 100, "test": 0}, augment=None)
    try:
        fast, _ = estimate_seconds([spec("bf16")], [ctx], rows)
        slow, _ = estimate_seconds([spec("fp32")], [ctx], rows)
    finally:
        est.get_task = old
    assert fast == pytest.approx(0.1) and slow == pytest.approx(10.0)


@pytest.mark.parametrize("flags", [["--precision", "fp32,fp8"], ["--precision", ","], ["--batch-size", "0"],
                                   ["--steps", "0"], ["--peak-tflops", "-1"]])
def test_bench_refuses_bad_settings_before_measuring(flags, capsys):
    assert main(["bench", "--backbone", TINY_BACKBONE, "--methods", "linear", "--no-probe", *flags]) == 2
    assert "error:" in capsys.readouterr().err


def test_mfu_is_the_share_of_the_devices_peak():
    from peftbench.bench.peaks import mfu_pct, peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.0)  # the longest matching name wins
    assert peak_tflops("cpu (x86_64, 2 threads)", "fp32") is None
    assert mfu_pct(100.0, 1000.0, 200.0) == 50.0 and mfu_pct(1.0, 1.0, None) == ""


def test_rounds_alternate_the_order_and_report_the_median_and_spread(monkeypatch):
    """--repeats R: the methods in order, then reversed (the baselines measured first and last); each timing the median
    of the rounds, its spread a column; a spread above 20 % and a load above the cores are warned about."""
    import os

    from peftbench.bench import speed

    calls, times = [], iter([10.0, 30.0, 12.0, 20.0, 18.0, 26.0])  # train step ms per call, alternating methods

    def fake(name, s, precision=None, compile=None):
        calls.append(name)
        ms = next(times)
        return [{"method": name, "variant": "", "batch_size": 4, "train_step_ms": ms,
                 "train_images_per_s": round(4 / (ms / 1000), 2), "eval_images_per_s": 100.0,
                 "train_mfu_pct": "", "eval_mfu_pct": "", "train_spread_pct": 0.0, "eval_spread_pct": 0.0,
                 "gflops_train_per_image": 1.0, "tokens": 5}]

    monkeypatch.setattr(speed, "bench_method", fake)
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 1.0, 1.0))
    logged = []
    s = BenchSettings(methods=["linear", "full"], backbone=TINY_BACKBONE, batch_size=4, repeats=3, variants=False)
    rows = run_bench(s, logged.append)
    assert calls == ["linear", "full", "full", "linear", "linear", "full"]
    lin, full = rows
    assert lin["repeats"] == 3 and lin["train_step_ms"] == 18.0  # linear: 10, 20, 18; full: 30, 12, 26
    assert lin["train_spread_pct"] == round(100 * (20 - 10) / 18, 1)
    assert full["train_step_ms"] == 26.0 and lin["train_time_vs_full"] == round(18 / 26, 3)
    assert any("load average 64.0 exceeds" in m for m in logged)
    assert any("linear: its timings spread by 56 %" in m for m in logged)


def test_the_train_step_runs_the_methods_per_step_hooks():
    """MoSA's extra loss runs a second forward of the batch (TunedViT.step_loss): its measured training step costs
    about two forwards more than AdaptFormer's, the same adapter without the hook."""
    s = BenchSettings(methods=["adaptformer", "mosa"], backbone=TINY_BACKBONE, batch_size=4, warmup=1, steps=1,
                      variants=False)
    got = {r["method"]: r for r in run_bench(s, log=lambda m: None) if not r["variant"]}
    ratio = {m: r["gflops_train_per_image"] / r["gflops_forward_per_image"] for m, r in got.items()}
    assert ratio["mosa"] > ratio["adaptformer"] + 1.5
