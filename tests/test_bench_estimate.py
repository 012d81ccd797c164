"""Cost estimates on backbones without a bench table of their own: the shipped table of the same family, scaled by
the two backbones' forward FLOPs per image (counted on the meta device), said so in the dry-run."""
from __future__ import annotations

import pytest

from peftbench.bench.estimate import TABLES, find_table, forward_gflops, speeds_for
from peftbench.bench.speed import read_table


def vit_forward_flops(depth: int, width: int, patch: int, img: int = 224) -> int:
    """A timm ViT's matmul FLOPs (2·m·n·k per product) per image, no head: the patch embedding, then per block
    qkv + proj + fc1 + fc2 (24·n·d²) and the attention's two products (4·n²·d), n = patches + CLS."""
    patches = (img // patch) ** 2
    n = patches + 1
    return 2 * patches * 3 * patch * patch * width + depth * (24 * n * width ** 2 + 4 * n * n * width)


@pytest.mark.parametrize("backbone,depth,width,patch", [("vit_base_patch16_224", 12, 768, 16),
                                                        ("vit-l16-in21k", 24, 1024, 16)])
def test_forward_flops_equal_the_formula(backbone, depth, width, patch):
    assert forward_gflops(backbone) * 1e9 == pytest.approx(vit_forward_flops(depth, width, patch), rel=1e-5)


def test_a_preset_finds_the_table_of_its_timm_architecture():
    shipped = TABLES / "bench-cpu-vit_base_patch16_224.csv"
    assert find_table("vit-b16-in21k", None) == shipped  # the preset's timm name, then its architecture
    assert find_table("vit_base_patch16_224.orig_in21k", None) == shipped
    speeds = speeds_for("vit-b16-in21k", None)
    assert speeds is not None and speeds.scale == 1.0 and "scaled" not in speeds.describe()


def test_a_backbone_without_a_table_is_costed_from_its_family_scaled_by_flops():
    speeds = speeds_for("vit-l16-in21k", None)
    assert speeds is not None and speeds.path == TABLES / "bench-cpu-vit_base_patch16_224.csv"
    ratio = vit_forward_flops(12, 768, 16) / vit_forward_flops(24, 1024, 16)
    assert speeds.scale == pytest.approx(ratio, rel=1e-5) and 0.25 < speeds.scale < 0.32
    measured = read_table(speeds.path)
    for method in ("e2vpt", "vpt-deep", "lora"):
        assert speeds.rows[method]["train_images_per_s"] == pytest.approx(
            float(measured[method]["train_images_per_s"]) * speeds.scale)
        assert speeds.rows[method]["eval_images_per_s"] == pytest.approx(
            float(measured[method]["eval_images_per_s"]) * speeds.scale)
    assert "measured on vit_base_patch16_224 and scaled x0.2" in speeds.describe() and "an estimate" in speeds.describe()


def test_no_table_of_the_family_gives_no_estimate(monkeypatch, tmp_path):
    import peftbench.bench.estimate as estimate

    monkeypatch.setattr(estimate, "TABLES", tmp_path)  # no shipped tables at all
    assert speeds_for("vit-l16-in21k", None) is None


def test_a_dry_run_without_the_data_says_so_instead_of_zero_hours(tmp_path, capsys):
    from peftbench.cli import main

    assert main(["run", "--methods", "linear", "--suite", "fgvc", "--tasks", "cub200,nabirds", "--data-root",
                 str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "estimated compute for the 90 runs to run: unknown: the data of 2 task(s) is not in" in out
    assert "(cub200, nabirds)" in out and "`peftbench data prepare --suite fgvc`" in out
    grid = next(line for line in out.splitlines() if line.startswith("* grid"))
    assert grid.split()[-3:] == ["unknown", "unknown", "unknown"] and "0.00" not in grid


def test_a_gpu_sweep_costed_from_the_cpu_table_says_so(capsys):
    from peftbench.cli import main

    assert main(["run", "--methods", "lora", "--suite", "vtab", "--tasks", "dtd", "--executor", "slurm",
                 "--gpus-per-node", "1", "--dry-run"]) == 0
    assert "the runs train on GPUs, these hours are the CPU table's" in capsys.readouterr().out
    assert main(["run", "--methods", "lora", "--suite", "vtab", "--tasks", "dtd", "--dry-run"]) == 0
    assert "the runs train on GPUs" not in capsys.readouterr().out  # a CPU sweep: the table is its own


def test_every_builtin_method_has_a_row_in_the_shipped_vit_b_table():
    """`--dry-run` costs a sweep from this table: a built-in method without a row is "not estimated". A new method
    joins with `peftbench bench --backbone vit_base_patch16_224 --device cpu --batch-size 8 --warmup 1 --steps 2
    --no-probe --methods full,<name>` (its row copied in, results/README.md naming the command)."""
    from peftbench.bench.speed import table_path
    from peftbench.methods import METHODS

    rows = read_table(table_path(TABLES, "cpu", "vit_base_patch16_224"))
    builtin = sorted(n for n, m in METHODS.items() if type(m).__module__.startswith("peftbench.methods."))
    missing = [n for n in builtin if n not in rows]
    assert not missing, f"no CPU bench row for {missing} in {table_path(TABLES, 'cpu', 'vit_base_patch16_224')}"
