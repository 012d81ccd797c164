"""``peftbench compare``: two stores that differ by a known amount, pairing by seed, the paired tests
against independent computations, --tag selections of one store, a reference CSV, the CLI and the
comparison section of the report."""
from __future__ import annotations

import csv
import itertools
import json
import math
import random

import pytest
from test_leaderboard import VTAB, add_record, make_vtab_store, read_csv

from peftbench.cli import main
from peftbench.results.compare import compare_paths, holm, sign_flip_p, wilcoxon_p
from peftbench.tasks import get_suite

FGVC = list(get_suite("fgvc").tasks)


def _store(root, shift: dict[str, float], seeds=(1, 2), tasks=FGVC, **kw):
    for i, t in enumerate(tasks):
        for s in seeds:
            for cfg, d in shift.items():
                add_record(root, config=cfg, task=t, seed=s, top1=60.0 + 3 * i + 0.7 * s + d, suite="fgvc", **kw)
    return root


def test_known_shift_between_two_stores(tmp_path):
    a = _store(tmp_path / "a", {"lora": 0.0, "bitfit": 0.0})
    b = _store(tmp_path / "b", {"lora": 1.5, "bitfit": 0.0})
    (cmp,) = compare_paths(a, b, warn=lambda m: None)
    assert cmp.paired and len(cmp.matches) == 2 and not cmp.only_a and not cmp.only_b
    lora = next(m for m in cmp.matches if m.a.label == "lora")
    for t in FGVC:
        line = lora.line("task", t)
        assert line.delta == pytest.approx(1.5) and line.pairs == 2
        assert line.p_sign_flip == pytest.approx(0.5)  # 2 seeds: 2 of the 4 sign patterns are as extreme
        assert line.p_t is None  # a constant difference: the t statistic is undefined
    hl = lora.line("overall", "mean_over_tasks")
    assert hl.delta == pytest.approx(1.5) and hl.delta_std == pytest.approx(0.0)
    assert hl.a == pytest.approx(a_mean := sum(60.0 + 3 * i + 0.7 * 1.5 for i in range(len(FGVC))) / len(FGVC))
    assert hl.b == pytest.approx(a_mean + 1.5)
    assert hl.pairs == 10 and hl.p_sign_flip == pytest.approx(2 / 2 ** 10)  # exact: only all-+ and all-− reach it
    assert hl.p_wilcoxon == pytest.approx(2 / 2 ** 5)  # five positive task deltas, exact signed-rank test
    # clustered by task: all seeds of a task flipped together, 5 units; the seed pairs alone do not make it significant
    assert hl.p_task_flip == pytest.approx(2 / 2 ** 5) and hl.significant() is False
    assert hl.se == pytest.approx(0.0)
    bit = next(m for m in cmp.matches if m.a.label == "bitfit").line("overall", "mean_over_tasks")
    assert bit.delta == pytest.approx(0.0) and bit.p_sign_flip == 1.0 and bit.significant() is False


def test_groups_and_both_overall_means(tmp_path):
    a = make_vtab_store(tmp_path / "a")
    b = tmp_path / "b"
    for p in a.rglob("*.json"):  # B = A + 2 points on every vpt-deep record
        rec = json.loads(p.read_text())
        if rec["spec"]["config"] == "vpt-deep" and rec["status"] == "ok":
            rec["metrics"]["top1"] += 2.0
        q = b / p.relative_to(a)
        q.parent.mkdir(parents=True, exist_ok=True)
        q.write_text(json.dumps(rec))
    (cmp,) = compare_paths(a, b, suite="vtab", warn=lambda m: None)
    vd = next(m for m in cmp.matches if m.a.label == "vpt-deep")
    for g in ("natural", "specialized", "structured"):
        assert vd.line("group", g).delta == pytest.approx(2.0)
    assert vd.line("overall", "mean_of_groups").delta == pytest.approx(2.0)
    assert vd.line("overall", "mean_over_tasks").pairs == len(VTAB) * 3
    assert vd.line("overall", "mean_of_groups").p_sign_flip < 0.001  # 57 pairs, sampled flips
    # 19 tasks, every delta +2: the task-clustered test enumerates 2^19 patterns and agrees
    assert vd.line("overall", "mean_over_tasks").p_task_flip == pytest.approx(2 / 2 ** 19)
    assert vd.line("overall", "mean_of_groups").significant() is True
    lin = next(m for m in cmp.matches if m.a.label == "linear")
    assert lin.line("task", "dmlab").delta is None and lin.line("overall", "mean_of_groups").delta is None


def test_pairs_only_the_seeds_both_sides_have(tmp_path):
    a = _store(tmp_path / "a", {"lora": 0.0}, seeds=(1, 2, 3))
    b = _store(tmp_path / "b", {"lora": 1.0}, seeds=(1, 2, 4))
    (cmp,) = compare_paths(a, b, warn=lambda m: None)
    line = cmp.matches[0].line("task", FGVC[0])
    assert line.pairs == 2 and line.delta == pytest.approx(1.0)
    assert line.a == pytest.approx(60.0 + 0.7 * 1.5)  # over seeds 1 and 2 only


def test_sign_flip_p_against_brute_force():
    rng = random.Random(3)
    d = [rng.gauss(0.4, 1.0) for _ in range(8)]
    w = [rng.uniform(0.5, 2.0) for _ in range(8)]
    obs = abs(sum(wi * di for wi, di in zip(w, d)))
    extreme = sum(abs(sum(s * wi * di for s, wi, di in zip(signs, w, d))) >= obs - 1e-12
                  for signs in itertools.product((1, -1), repeat=8))
    assert sign_flip_p(d, w) == pytest.approx(extreme / 2 ** 8)
    assert sign_flip_p([0.3], [1.0]) == 1.0 and sign_flip_p([], []) is None
    big = [rng.gauss(1.0, 0.2) for _ in range(40)]  # sampled flips: deterministic and tiny
    assert sign_flip_p(big, [1.0] * 40) == sign_flip_p(big, [1.0] * 40) < 0.001


def test_wilcoxon_matches_the_exact_distribution():
    # ranks 1..4 all positive but one: the signed-rank statistic's exact two-sided p by enumeration
    d = [0.5, 1.0, -1.5, 2.0]
    t_obs = min(sum(r for r, x in zip((1, 2, 3, 4), d) if x > 0), sum(r for r, x in zip((1, 2, 3, 4), d) if x < 0))
    count = sum(min(sum(r for r, s in zip((1, 2, 3, 4), signs) if s > 0), sum(r for r, s in zip((1, 2, 3, 4), signs)
                                                                              if s < 0)) <= t_obs
                for signs in itertools.product((1, -1), repeat=4))
    assert wilcoxon_p(d) == pytest.approx(count / 16)
    assert wilcoxon_p([0.0, 0.0, 1.0]) is None


def test_tags_within_one_store(tmp_path):
    root = _store(tmp_path / "runs", {"lora": 0.0}, backbone="vit-a")
    _store(root, {"lora": -4.0}, backbone="vit-b")
    (cmp,) = compare_paths(root, tags=("backbone=vit-a", "backbone=vit-b"), warn=lambda m: None)
    assert cmp.match_fields == ("config", "protocol", "precision")  # the backbone is what differs
    (m,) = cmp.matches
    assert m.line("overall", "mean_over_tasks").delta == pytest.approx(-4.0)
    with pytest.raises(Exception, match="no run record"):
        compare_paths(root, tags=("backbone=vit-a", "backbone=nope"), warn=lambda m: None)


def test_against_a_reference_csv(tmp_path):
    a = _store(tmp_path / "a", {"lora": 0.0})
    ref = tmp_path / "ref" / "fgvc-top1.csv"
    ref.parent.mkdir()
    with open(ref, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "peftbench_config", "source", *FGVC])
        w.writerow(["LoRA (paper)", "lora", "a paper", *[60.0 + 3 * i + 0.7 * 1.5 - 2.0 for i in range(len(FGVC))]])
    (cmp,) = compare_paths(a, ref, warn=lambda m: None)
    assert not cmp.paired
    (m,) = cmp.matches
    assert m.b.label == "LoRA (paper)"
    line = m.line("task", FGVC[0])
    assert line.delta == pytest.approx(-2.0) and line.pairs == 0 and line.p_sign_flip is None
    hl = m.line("overall", "mean_over_tasks")
    assert hl.delta == pytest.approx(-2.0) and hl.pairs == 0
    assert hl.p_sign_flip == pytest.approx(2 / 2 ** 5)  # the tasks are the units
    # the CSV names no recipe, pipeline, backbone or selection: the pair cannot be like for like, and says so
    assert m.like_for_like.startswith("no: recipe peftbench ") and "recipe" in m.like_for_like


def test_cli_compare(tmp_path, capsys):
    a = _store(tmp_path / "a", {"lora": 0.0})
    b = _store(tmp_path / "b", {"lora": 1.5})
    out = tmp_path / "out"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    (line,) = [x for x in text.splitlines() if x.strip().startswith("lora")]
    assert "+1.50" in line and "0.00195" in line and "0.0625" in line and not line.endswith(" *")
    rows = read_csv(out / "fgvc-compare.csv")
    assert {r["scope"] for r in rows} == {"task", "overall"}
    (hl,) = [r for r in rows if r["name"] == "mean_over_tasks"]
    assert hl["delta"] == "1.5000" and hl["significant"] == "no" and hl["pairs"] == "10"
    assert math.isclose(float(hl["p_task_flip"]), 2 / 2 ** 5, rel_tol=1e-3) and hl["delta_se"] == "0.0000"
    assert math.isclose(float(hl["p_sign_flip"]), 2 / 2 ** 10, rel_tol=1e-3)
    html = (out / "fgvc-compare.html").read_text()
    assert 'id="compare-table"' in html and 'id="compare-task-table"' in html and "+1.50" in html
    assert main(["compare", str(a)]) == 2
    assert "two --tag" in capsys.readouterr().err
    assert main(["compare", str(a), "--tag", "backbone=x"]) == 2
    assert "exactly twice" in capsys.readouterr().err
    assert main(["compare", str(a), "--tag", "backbone", "--tag", "b=c"]) == 2
    assert "FIELD=VALUE" in capsys.readouterr().err
    assert main(["compare", str(a), str(b), "--match", "colour"]) == 2


def test_comparison_section_in_the_leaderboard_report(tmp_path):
    a = _store(tmp_path / "a", {"lora": 0.0})
    b = _store(tmp_path / "b", {"lora": 1.5})
    out = tmp_path / "out"
    assert main(["leaderboard", "--runs-dir", str(a), "--out", str(out), "--compare", str(b), "--no-reference"]) == 0
    html = (out / "fgvc-report.html").read_text()
    assert 'id="compare"' in html and 'href="#compare"' in html
    assert (out / "fgvc-compare.csv").is_file()


def test_compare_columns_are_documented():
    from pathlib import Path

    from peftbench.results.columns import columns

    doc = (Path(__file__).resolve().parent.parent / "docs" / "results.md").read_text()
    names = [c.name for c in columns("compare")]
    assert len(names) == 23
    for name in names:
        assert f"`{name}`" in doc, f"docs/results.md does not document the compare column {name}"


def test_a_task_subset_prints_its_task_rows(tmp_path, capsys):
    """No group or overall mean is complete on two of five tasks: the summary shows each task both sides have."""
    a = _store(tmp_path / "a", {"lora": 0.0}, seeds=(1, 2, 3), tasks=FGVC[:2])
    b = _store(tmp_path / "b", {"lora": 1.0}, seeds=(1, 2, 3), tasks=FGVC[:2])
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    rows = [x.strip() for x in text.splitlines() if x.strip().startswith(tuple(FGVC[:2]))]
    assert len(rows) == 2 and all("+1.00" in r and "  3  " in r for r in rows), text


def test_the_exact_sign_flip_enumerates_up_to_20_units():
    from itertools import product

    from peftbench.results.compare import sign_flip_p

    d = [0.3, -0.1, 0.8, 0.25, 0.6, 0.05, -0.2, 0.4, 0.9, 0.15, 0.33, -0.05, 0.7, -0.4, 0.12, 0.05]
    w = [1.0 + (i % 3) for i in range(len(d))]
    t = abs(sum(a * b for a, b in zip(d, w)))
    brute = sum(abs(sum(e * a * b for e, a, b in zip(signs, d, w))) >= t - 1e-12
                for signs in product((1, -1), repeat=len(d))) / 2 ** len(d)
    assert sign_flip_p(d, w) == pytest.approx(brute, rel=1e-12)


def test_twenty_units_are_enumerated_exactly():
    """2^20 patterns, counted in closed form: with d = (2, 1, ..., 1) only the two all-same sign patterns reach |T| = 21
    (any flip lowers |T| by at least 2)."""
    from peftbench.results.compare import sign_flip_p

    assert sign_flip_p([1.0] * 20, [1.0] * 20) == pytest.approx(2 / 2 ** 20)
    assert sign_flip_p([2.0] + [1.0] * 19, [1.0] * 20) == pytest.approx(2 / 2 ** 20)
    # three units of 20 equal to 1 and the rest 0: |T| = 3 is reached by the 2 of 8 patterns of those three, times
    # every pattern of the 17 zeros
    assert sign_flip_p([1.0] * 3 + [0.0] * 17, [1.0] * 20) == pytest.approx(2 / 8)


def test_holm_adjusts_over_the_matched_configurations(tmp_path):
    """Holm's step-down (Holm 1979) against its definition, and its use: each line's p_holm is its tests' p adjusted
    over the configurations that have that line, never below the unadjusted p."""
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # 3·0.01; max(·, 2·0.03); max(·, 1·0.04)
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002]) and holm([0.9, 0.8]) == [1.0, 1.0]  # (capped at 1)
    assert holm([]) == []
    a = _store(tmp_path / "a", {"lora": 0.0, "bitfit": 0.0, "ssf": 0.0}, seeds=(1, 2, 3, 4))
    b = _store(tmp_path / "b", {"lora": 1.5, "bitfit": 0.0, "ssf": -0.3}, seeds=(1, 2, 3, 4))
    (cmp,) = compare_paths(a, b, warn=lambda m: None)
    for scope, name in [("overall", "mean_over_tasks"), ("task", FGVC[0])]:
        lines = [m.line(scope, name) for m in cmp.matches]
        assert [x.p_holm for x in lines] == pytest.approx(holm([x.p_tests for x in lines]))
        assert all(x.p_holm >= x.p_tests for x in lines)
        assert all(x.significant_holm() is (x.p_holm < 0.05) for x in lines)
