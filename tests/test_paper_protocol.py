"""--protocol paper (docs/protocols.md §15): every paper recipe reads and is cited, its transcribed values
equal their sources, every method with reference rows has one (or a stated reason), the loop options the
recipes need do what the official code does, and the tests' own card trains end to end on the toy suite."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import TINY_BACKBONE, ensure_registered, make_data_root

from peftbench.cli import main
from peftbench.errors import SettingsError
from peftbench.methods import METHODS
from peftbench.results.reference import default_reference_dir
from peftbench.sweep.paper import add_card, papers_dir, read_card, recipes, resolve_card
from peftbench.sweep.protocols import get_protocol

ensure_registered()

# methods with reference rows whose paper recipe is not transcribed yet, and why (a method with reference rows
# that is neither here nor in a card fails test_every_method_with_reference_rows_has_a_paper_recipe)
PENDING = {
    "adaptformer": "its row is the Convpass report's re-run of AdaptFormer (h = 8): which s and code it used is not "
                   "released",
    "vfpt": "VFPT's per-task values are in a Google sheet (runtsang/VFPT#2) not readable here",
    "spt-lora": "its reference rows are FGVC (SNELL's copy of SPT's row) and SPT released no FGVC code",
    "spt-adapter": "its reference rows are FGVC (SNELL's copy of SPT's row) and SPT released no FGVC code",
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("paperdata"))


def get_suite_tasks(suite):
    from peftbench.tasks import get_suite

    return get_suite(suite).tasks


def _cards():
    return sorted(papers_dir().glob("*.toml"))  # the shipped cards (not the tests' own)


def _reference_methods() -> set[str]:
    import csv

    out = set()
    for path in sorted(default_reference_dir().glob("*-top1.csv")):
        rows = [r for r in csv.DictReader(line for line in path.open(encoding="utf-8") if not line.startswith("#"))]
        for r in rows:
            for config in (r.get("peftbench_config") or "").split(";"):
                name = config.strip().split("(")[0]
                if name:
                    out.add(name)
    return out


# ---------------------------------------------------------------------------------------------
# the cards
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", _cards(), ids=lambda p: p.name)
def test_every_card_reads_and_every_value_is_cited(path):
    card = read_card(path)
    assert card.title and "@" in card.code
    for method in card.methods:
        assert method in METHODS, f"{path.name}: {method!r} is not a registered method"
        for suite in card.suites:
            from peftbench.tasks import get_suite

            for task in get_suite(suite).tasks:
                res = resolve_card(card, method, suite, task)
                for key, source in res.sources().items():
                    assert source.strip(), (path.name, method, task, key)
                for v in [*res.hparams.values(), *res.grid.values(), *res.options.values(), res.seeds]:
                    assert v.source.startswith("unpublished: ") or "@" in v.source or "Table" in v.source \
                        or "methods/" in v.source or "row" in v.source, (path.name, method, task, v)


def test_every_method_with_reference_rows_has_a_paper_recipe():
    covered = {m for m, _ in recipes()}
    missing = sorted(m for m in _reference_methods() if m in METHODS and m not in covered and m not in PENDING)
    assert not missing, (f"methods with reference rows but no paper recipe: {missing}: add them to a card in "
                         "methods/papers/ (docs/protocols.md §15) or to PENDING here with the reason")
    stale = sorted(m for m in PENDING if m in covered or m not in _reference_methods())
    assert not stale, f"{stale} have a card now, or no reference rows: remove them from PENDING"


def test_transcribed_values_equal_their_sources():
    """Spot checks of each value table against the official files, as read (tables cited in the cards)."""
    cards = recipes()
    # extremebird/Hydra@4138457 vtab1k/configs/hydra_both/{cifar,smallnorb_azi}.yaml:3,4,7; train.py:113
    hyd = lambda t: resolve_card(cards["hydra", "vtab"], "hydra", "vtab", t).values("final")  # noqa: E731
    assert (hyd("cifar100")["lr"], hyd("cifar100")["wd"], hyd("cifar100")["batch_size"]) == (5e-4, 1e-4, 16)
    assert hyd("smallnorb_azimuth")["wd"] == 1e-5 and hyd("dtd")["cosine_epochs"] == 500
    # OSU-MLB/PETL_Vision@245d262 experiment/config/{lr_wd_vtab_processed,default_vtab_processed}.yml
    petl = resolve_card(cards["difffit", "vtab"], "difffit", "vtab", "dtd")
    assert petl.grid["lr_grid"].value == [0.001, 0.01] and petl.grid["wd_grid"].value == [0.0001, 0.001]
    assert petl.tie == "later-point" and petl.seeds.value == [42]
    final = petl.values("final")
    assert (final["mean"], final["std"], final["interpolation"]) == ([0.0] * 3, [1.0] * 3, "bicubic")
    assert (final["optimizer"], final["drop_path"], final["schedule_lag"], final["head_init"]) == \
        ("adamw-all", 0.1, 1, "torch")
    assert resolve_card(cards["ln-tune", "vtab"], "ln-tune", "vtab", "dtd").values("final") == final
    ssf = lambda t, s="vtab": resolve_card(cards["ssf", s], "ssf", s, t).values("final")  # noqa: E731
    # dongzelian/SSF@e94e0e7 train_scripts/vit/vtab/<task>/train_ssf.sh: --lr, --weight-decay
    assert (ssf("cifar100")["lr"], ssf("cifar100")["wd"]) == (5e-3, 5e-5)
    assert (ssf("clevr_distance")["lr"], ssf("clevr_distance")["wd"]) == (5e-2, 5e-2)
    assert (ssf("eurosat")["lr"], ssf("eurosat")["wd"]) == (3e-3, 5e-2)
    assert (ssf("stanford_dogs", "fgvc")["lr"], ssf("stanford_dogs", "fgvc")["wd"]) == (2.5e-4, 0.05)
    assert ssf("cifar100")["epochs"] == 110 and ssf("cifar100")["cosine_epochs"] == 100  # 100 + 10 cool-down
    assert ssf("cifar100")["batch_size"] == 64 and ssf("cifar100")["precision"] == "fp16"  # 2 GPUs x 32, --amp
    assert (ssf("cifar100")["drop_path"], ssf("eurosat")["drop_path"], ssf("nabirds", "fgvc")["drop_path"]) == (0, .2, .1)
    # ChengHan111/E2VPT@7a66e75 command.txt: batch 64 on VTAB, 128 on FGVC; FGVC grid without 0.05
    e2 = resolve_card(cards["e2vpt", "fgvc"], "e2vpt", "fgvc", "cub200")
    assert e2.values("final")["batch_size"] == 128 and 0.05 not in e2.grid["lr_grid"].value
    assert e2.values("search")["report"] == "best" and e2.values("final")["report"] == "last"
    assert resolve_card(cards["e2vpt", "vtab"], "e2vpt", "vtab", "dtd").values("final")["batch_size"] == 64
    # ZhangYuanhan-AI/NOAH@e9c55f3: absolute lr 1e-3, wd 1e-4, timm cosine stepped with step(epoch)
    noah = resolve_card(cards["lora", "vtab"], "lora", "vtab", "dtd").values("final")
    assert (noah["lr"], noah["wd"], noah["lr_scaling"], noah["schedule_lag"]) == (1e-3, 1e-4, False, 1)
    assert (noah["warmup_lr"], noah["min_lr"], noah["drop_last"], noah["report"]) == (1e-6, 1e-5, True, "best")
    assert noah["drop_path"] == 0.1
    assert resolve_card(cards["lora", "vtab"], "lora", "vtab", "dtd").options["init"].value == "trunc-normal"
    # FightingFighting/GPS@72e0c31: the card's per-task table is the method's own (methods/gps/settings.csv)
    import csv as _csv

    rows = {r["task"]: r for r in _csv.DictReader(line for line in (papers_dir().parent / "gps" / "settings.csv")
                                                  .open() if not line.startswith("#"))}
    for suite in ("vtab", "fgvc"):
        for task in get_suite_tasks(suite):
            hp = resolve_card(cards["gps", suite], "gps", suite, task).values("final")
            assert (hp["lr"], hp["batch_size"]) == (float(rows[task]["lr"]), int(rows[task]["batch_size"])), task
    # JieShibo/PETL-ViT@026e4f1 FacT/fact_tt.py and convpass/vtab/train.py, luogen1996/RepAdapter@360992f train.py
    for m in ("fact-tk", "convpass", "repadapter"):
        hp = resolve_card(cards[m, "vtab"], m, "vtab", "dtd").values("final")
        assert (hp["optimizer"], hp["lr"], hp["wd"], hp["head_init"], hp["eval_every"]) == ("adamw-all", 1e-3, 1e-4,
                                                                                           "torch", 10)
        assert (hp["drop_path"], hp["interpolation"], hp["schedule_lag"], hp["drop_last"]) == (0.1, "bicubic", 1, True)
    # KMnP/vpt@4410440: configs/base-linear.yaml batch 1024, base-finetune.yaml batch 384 / warm-up 5
    vpt = lambda m: resolve_card(cards[m, "vtab"], m, "vtab", "dtd")  # noqa: E731
    assert vpt("linear").values("final")["batch_size"] == 1024
    assert (vpt("full").values("final")["batch_size"], vpt("full").values("final")["warmup_epochs"]) == (384, 5)
    assert vpt("vpt-deep").grid["lr_grid"].value == [5.0, 2.5, 1.0, 50.0, 25.0, 10.0, 0.5, 0.25, 0.1, 0.05]
    assert resolve_card(cards["vpt-deep", "vtab"], "vpt-deep", "vtab", "dmlab").values("final")["batch_size"] == 64
    # showlab/SCT@384cecb run_model_sct.sh (--lr, --wd, --dpr per task), configs/model_sct/vtab/<file>.yaml
    sct = lambda t: resolve_card(cards["sct", "vtab"], "sct", "vtab", t)  # noqa: E731
    hp = sct("cifar100").values("final")
    assert (hp["lr"], hp["wd"], hp["label_smoothing"], hp["drop_path"], hp["optimizer"]) == (0.013, 1.0, 0.1, 0.1,
                                                                                            "adamw-all")
    assert "augment" not in hp and sct("dtd").values("final")["augment"] == "flip-rand-m9-mstd0.5-inc1"
    assert sct("smallnorb_elevation").values("final")["label_smoothing"] == 0.0  # (its config has no train_aug)
    assert sum("augment" in sct(t).values("final") for t in get_suite_tasks("vtab")) == 11
    assert sct("kitti_distance").options["channels"].value == 96
    # Noahsark/DA-VPT@1a5ac60 configs/vtab/vitb_<task>.yaml: wd_head, class_sampler, sched_on_updates
    da = lambda t: resolve_card(cards["da-vpt", "vtab"], "da-vpt", "vtab", t).values("final")  # noqa: E731
    assert (da("cifar100")["head_wd"], da("dsprites_orientation")["head_wd"], da("smallnorb_elevation")["head_wd"]) == \
        (20.0, 0.0001, 3.0)  # (smallnorb_ele sets none: params.py's default 3.0)
    assert (da("dtd")["sampler"], da("dtd")["samples_per_class"], da("dtd")["schedule_per_update"]) == \
        ("class-balanced", 2, True)
    assert (da("dtd")["clip_grad"], da("dtd")["clip_mode"]) == (10.0, "value")
    # Minhchuyentoancbn/VAPT@ff3e65b tune_vtab.py (VPT's prompt grid, strict > in decreasing lr then wd), README.md
    va = resolve_card(cards["vapt", "vtab"], "vapt", "vtab", "dtd")
    assert va.rule == "search" and va.tie == "larger-lr" and va.seeds.value == [42, 44, 82, 100, 800]
    assert va.grid["lr_grid"].value == vpt("vpt-deep").grid["lr_grid"].value and va.grid["wd_grid"].value == [
        0.01, 0.001, 0.0001, 0.0]
    assert (va.options["tokens"].value, va.values("final")["batch_size"]) == (10, 64)
    # Lingyun0419/CVPT@2fc9877 configs/<task>.yaml (lr, seed, num, read by train.py --test), train.py defaults
    cv = lambda t: resolve_card(cards["cvpt", "vtab"], "cvpt", "vtab", t)  # noqa: E731
    assert (cv("caltech101").seeds.value, cv("caltech101").values("final")["lr"]) == ([800], 0.001)
    assert (cv("svhn").seeds.value, cv("svhn").values("final")["lr"]) == ([800], 0.01)
    assert cv("dtd").seeds.value == [80] and "configs/<file>.yaml" in cv("dtd").seeds.source  # a seed per task
    assert (cv("dtd").values("final")["wd"], cv("dtd").values("final")["batch_size"]) == (0.05, 32)


@pytest.mark.parametrize("text, needle", [
    ("schema = 2", "this peftbench reads schema 1"),
    ("[hparams]\nbatch_sise = { value = 1, source = 'x' }", "did you mean 'batch_size'"),
    ("[hparams]\nlabel_smoothing = { value = 0.1 }", "give exactly one of source"),
    ("[hparams]\neval_every = { value = -1, source = 'x' }", "eval_every=-1: must not be negative"),
    ("[selection]\nrule = { value = 'fixed', source = 'x' }", "a fixed recipe gives it"),
])
def test_a_broken_card_is_refused_naming_its_file(tmp_path, text, needle):
    base = (Path(__file__).with_name("papers") / "testsuite.toml").read_text()
    if text.startswith("schema"):
        base = base.replace("schema = 1", text)
    elif text.startswith("[hparams]"):
        base = base.replace("[hparams]", text, 1)
    else:
        base = base.replace('[selection]\nrule = { value = "search", source = "tests: a grid on the search splits" }',
                            text)
    path = tmp_path / "broken.toml"
    path.write_text(base)
    with pytest.raises(SettingsError, match="broken.toml") as exc:
        read_card(path)
    assert needle in str(exc.value)


def test_a_method_and_suite_belong_to_one_card(tmp_path):
    path = tmp_path / "again.toml"
    path.write_text((Path(__file__).with_name("papers") / "testsuite.toml").read_text())
    with pytest.raises(SettingsError, match="already in"):
        add_card(path)
    assert ("linear", "testsuite") in recipes()  # the failed add left the registry as it was


# ---------------------------------------------------------------------------------------------
# the loop options
# ---------------------------------------------------------------------------------------------


def test_drop_last_trains_only_full_batches():
    from peftbench.data.loader import batches

    xs, ys = torch.zeros(1000, 1), torch.zeros(1000, dtype=torch.long)
    order = torch.arange(1000)
    kept = list(batches(xs, ys, order, 64, prepare=lambda x: x, drop_last=True))
    assert len(kept) == 15 and all(len(i) == 64 for _, _, i in kept)  # 1000 // 64 steps (NOAH, SSF)
    assert len(list(batches(xs, ys, order, 64, prepare=lambda x: x))) == 16  # VPT, E^2VPT: the last 40 too


def test_label_smoothing_is_torchs_smoothed_cross_entropy():
    from peftbench.train.loop import train_step

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    logits = layer(x).detach()
    eps, k = 0.1, 3
    logp = torch.log_softmax(logits, 1)
    expected = -((1 - eps) * logp[torch.arange(8), y] + eps / k * logp.sum(1)).mean()  # the direct formula
    loss = train_step(layer, x, y, torch.optim.SGD(layer.parameters(), lr=0.0), torch.device("cpu"),
                      label_smoothing=eps)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_trunc_normal_head_is_timms_reset_classifier():
    from peftbench.methods import get_method
    from peftbench.train.build import init_head

    ensure_registered()
    from peftbench.backbones import create_backbone

    torch.manual_seed(0)
    m = get_method("linear")
    model = m.build(create_backbone(TINY_BACKBONE, pretrained=False), 50, m.resolve_options(m.default_options(), None)[0])
    assert model.head.bias.allclose(torch.full((50,), -math.log(99)))  # the VPT head
    init_head(model, "trunc-normal")
    w = model.head.weight
    assert model.head.bias.abs().max() == 0 and w.abs().max() <= 2.0 and 0.015 < w.std() < 0.025


def test_eval_first_evaluates_like_a_timm_loop():
    from peftbench.train.hparams import parse_hparams
    from peftbench.train.loop import evaluates

    hp = parse_hparams({"lr": 1.0, "wd": 0.0, "epochs": 100, "batch_size": 64, "eval_every": 10, "eval_first": True})
    assert [e for e in range(100) if evaluates(hp, e)] == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99]  # NOAH's 11
    hp = parse_hparams({"lr": 1.0, "wd": 0.0, "epochs": 100, "batch_size": 64, "eval_every": 10})
    assert [e for e in range(100) if evaluates(hp, e)] == [9, 19, 29, 39, 49, 59, 69, 79, 89, 99]
    # SNELL's train.py:401-408 (and SPT's): epoch % 10 == 0 or epoch >= epochs - 10
    hp = parse_hparams({"lr": 1.0, "wd": 0.0, "epochs": 100, "batch_size": 64, "eval_every": 10, "eval_first": True,
                        "eval_last": 10})
    assert [e for e in range(100) if evaluates(hp, e)] == [0, 10, 20, 30, 40, 50, 60, 70, 80] + list(range(90, 100))
    from peftbench.bench.estimate import evaluations
    from peftbench.store import RunSpec

    spec = RunSpec(method="linear", task="dtd", suite="vtab", protocol="paper", stage="final", train_split="train800val200",
                   eval_split="test", hparams={"lr": 1.0, "wd": 0.0, "epochs": 100, "batch_size": 64, "eval_every": 10,
                                               "eval_first": True, "eval_last": 10}, seed=0, backbone="x")
    assert evaluations(spec) == 19  # the cost estimate counts the same evaluations


# ---------------------------------------------------------------------------------------------
# end to end on the toy suite (the tests' own card)
# ---------------------------------------------------------------------------------------------


def _run(capsys, root, runs, *extra):
    code = main(["run", "--methods", "linear,vpt-deep", "--suite", "testsuite", "--tasks", "toy", "--protocol", "paper",
                 "--data-root", str(root), "--runs-dir", str(runs), "--backbone", TINY_BACKBONE, "--quiet", *extra])
    return code, capsys.readouterr()


def _records(runs):
    return [json.loads(p.read_text()) for p in sorted(Path(runs).glob("*/*/*.json")) if "." not in p.stem]


def test_the_paper_protocol_trains_a_cards_recipe_end_to_end(capsys, root, tmp_path):
    from peftbench.train.optim import lr_at_epoch

    runs = tmp_path / "runs"
    code, out = _run(capsys, root, runs)
    assert code == 0, out.err
    recs = _records(runs)
    lin = [r for r in recs if r["spec"]["method"] == "linear"]
    assert sorted(r["spec"]["stage"] for r in lin) == ["final", "search", "search"]  # the card's 2-point grid
    assert all(r["spec"]["seed"] == 7 for r in recs)  # the card's seeds
    (vpt,) = [r for r in recs if r["spec"]["method"] == "vpt-deep"]  # fixed: the final run only
    hp, spec = vpt["spec"]["hparams"], vpt["spec"]
    assert (hp["lr"], hp["wd"], spec["options"]["prompt_tokens"]) == (0.01, 0.0001, 3)  # the toy row of the table
    assert "tests: the row of toy" in spec["option_sources"]["paper.lr"]
    lrs = [h["lr"] for h in vpt["history"]]
    assert lrs == [pytest.approx(lr_at_epoch(e, 0.01, 3, 1, 1e-4, 1e-5, "timm-cosine", 2, 1)) for e in range(3)]
    assert lrs[0] == lrs[1] == pytest.approx(1e-4)  # lag 1: epochs 0 and 1 at the warm-up lr
    assert vpt["timing"]["train_images"] == 3 * 48  # drop_last: 64 images at batch 24 -> 2 steps per epoch
    evaluated = [h["eval_top1"] for h in vpt["history"] if "eval_top1" in h]
    assert [h["epoch"] for h in vpt["history"] if "eval_top1" in h] == [0, 2]  # eval_first with eval_every 2
    m = vpt["metrics"]
    assert m["top1"] == max(evaluated) and m["last_top1"] == evaluated[-1] and m["reported"] == "best-epoch"
    assert not any("reported" in r["metrics"] for r in lin)  # linear reports its last epoch
    assert vpt["data_pipeline"]["interpolation"] == "bicubic" and vpt["data_pipeline"]["layout"] == "noah"
    assert all(r["data_pipeline"]["interpolation"] == "bilinear" for r in lin)


def test_bicubic_resizing_is_pils(root):
    """``interpolation = bicubic``: every image resized by PIL's BICUBIC filter (NOAH's and SSF's Resize((224,
    224), interpolation=3) of the JPEG export), cached apart from the bilinear copies."""
    import numpy as np
    from PIL import Image

    from peftbench.data.loader import load_split
    from peftbench.data.splits import read_split
    from peftbench.tasks import get_task

    task = get_task("toy")
    split = read_split(task, Path(root), "test")
    bicubic = load_split(task, Path(root), "test", 16, "bicubic").images
    bilinear = load_split(task, Path(root), "test", 16).images
    with Image.open(split.paths[0]) as im:
        expected = np.asarray(im.convert("RGB").resize((16, 16), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(bicubic[0].numpy(), expected)
    assert not torch.equal(bicubic, bilinear)


def test_the_command_line_still_wins_and_the_record_says_so(capsys, root, tmp_path):
    runs = tmp_path / "runs"
    code, out = _run(capsys, root, runs, "--seeds", "1", "--epochs", "1", "--set", "vpt-deep.prompt_tokens=2")
    assert code == 0, out.err
    recs = _records(runs)
    assert all(r["spec"]["seed"] == 1 and r["spec"]["hparams"]["epochs"] == 1 for r in recs)
    (vpt,) = [r for r in recs if r["spec"]["method"] == "vpt-deep"]
    assert vpt["spec"]["options"]["prompt_tokens"] == 2
    assert "given on the command line" in vpt["spec"]["option_sources"]["paper.override.epochs"]
    assert "[replaced by --set]" in vpt["spec"]["option_sources"]["paper.prompt_tokens"]


def test_a_method_without_a_paper_recipe_is_refused_in_one_line(capsys, root, tmp_path):
    code = main(["run", "--methods", "bitfit", "--suite", "testsuite", "--protocol", "paper", "--data-root", str(root),
                 "--runs-dir", str(tmp_path / "runs"), "--backbone", TINY_BACKBONE, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "method 'bitfit' has no paper recipe on suite 'testsuite' (it has one on fgvc, vtab)" in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.json"))


@pytest.mark.slow
def test_the_dry_run_prints_each_papers_recipe_and_the_unified_protocol_beside_it(capsys):
    assert main(["run", "--methods", "e2vpt,vpt-deep", "--suite", "vtab", "--protocol", "paper", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "e2vpt: the recipe of E^2VPT (Han et al., ICCV 2023) (e2vpt.toml)" in out
    assert "batch_size: 64: ChengHan111/E2VPT@7a66e75eef6b7e15df83463d31b60eba5938d208:command.txt:6-46" in out
    assert "vpt-deep: the recipe of VPT (Jia et al., ECCV 2022)" in out and "unpublished: per task" in out
    assert "departure.search_seed" in out
    assert "protocols side by side" in out and "\n  paper " in out and "\n  vpt " in out


def test_drop_path_is_timms_stochastic_depth_on_the_frozen_backbone():
    """``drop_path``: the DropPath modules timm itself builds with drop_path_rate, active in train mode only,
    and the backbone still frozen (no gradient reaches it)."""
    import timm

    from peftbench.backbones import create_backbone
    from peftbench.methods import get_method
    from peftbench.train.build import add_stochastic_depth

    ensure_registered()
    m = get_method("vpt-deep")
    model = m.build(create_backbone(TINY_BACKBONE, pretrained=False), 3,
                    m.resolve_options(m.default_options(), None)[0])
    add_stochastic_depth(model, 0.2)
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3,
                            drop_path_rate=0.2, pretrained=False)
    probs = lambda vit: [getattr(getattr(b, n), "drop_prob", 0.0) for b in vit.blocks  # noqa: E731
                         for n in ("drop_path1", "drop_path2")]
    assert probs(model.backbone) == pytest.approx(probs(ref)) and max(probs(ref)) == pytest.approx(0.2)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))  # eval: no stochastic depth
    model.train()
    torch.manual_seed(0)
    a = model(x)
    assert not torch.equal(a, model(x))  # train: the frozen blocks drop their branches
    a.sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters() if not p.requires_grad)


def test_noahs_initialisation_of_its_adapters_and_lora():
    """NOAH's ViT.init_weights redraws every Linear built before it (trunc-normal 0.02, biases 0): the adapters'
    and LoRA's too, so NOAH's LoRA starts with BA != 0 (option init = trunc-normal)."""
    from peftbench.backbones import create_backbone
    from peftbench.methods import get_method

    ensure_registered()

    def build(name, **opts):
        m = get_method(name)
        torch.manual_seed(0)
        return m.build(create_backbone(TINY_BACKBONE, pretrained=False), 3,
                       m.resolve_options({**m.default_options(), **opts}, None)[0])

    ada = [mod for mod in build("adapter-noah", init="trunc-normal").modules() if type(mod).__name__ == "Adapter"]
    assert ada and all(a.down.bias.abs().max() == 0 and a.up.bias.abs().max() == 0 for a in ada)
    assert all(a.down.weight.abs().max() <= 2.0 and 0.01 < a.down.weight.std() < 0.03 for a in ada)
    xav = [mod for mod in build("adapter-noah").modules() if type(mod).__name__ == "Adapter"]
    assert all(0 < a.down.bias.abs().max() < 1e-4 for a in xav)  # the module's own N(0, 1e-6) by default

    def lora_b(model):
        return [mod.weight for n, mod in model.named_modules() if n.endswith("lora_B.default")]

    assert all(w.abs().max() == 0 for w in lora_b(build("lora")))  # peft: B = 0, BA starts at 0
    bs = lora_b(build("lora", init="trunc-normal"))
    assert bs and all(w.abs().max() > 0 and 0.01 < w.std() < 0.03 for w in bs)


def test_torch_head_init_is_a_fresh_linear():
    from peftbench.backbones import create_backbone
    from peftbench.methods import get_method
    from peftbench.train.build import init_head

    ensure_registered()
    m = get_method("linear")
    model = m.build(create_backbone(TINY_BACKBONE, pretrained=False), 50, m.resolve_options(m.default_options(), None)[0])
    torch.manual_seed(3)
    init_head(model, "torch")
    torch.manual_seed(3)
    fresh = torch.nn.Linear(model.head.in_features, 50)  # PyTorch's own init, same random stream
    assert torch.equal(model.head.weight, fresh.weight) and torch.equal(model.head.bias, fresh.bias)


def test_each_tie_rule_picks_as_its_paper_does():
    """Four points of PETL_Vision's grid (lr outer, wd inner) with the first two tied: smaller-lr keeps the earlier
    point, larger-lr the larger lr, later-point (sorted(...)[-1]) the later point of the tie."""
    from types import SimpleNamespace

    from peftbench.store import RunRecord
    from peftbench.sweep.stages import select_best

    points = [{"lr": lr, "wd": wd} for lr in (0.001, 0.01) for wd in (0.0001, 0.001)]
    recs = [RunRecord(key=str(i), spec={"hparams": p}, status="ok", metrics={"top1": t})
            for i, (p, t) in enumerate(zip(points, (70.0, 70.0, 60.0, 60.0)))]
    protocol = get_protocol("paper")

    def pick(rule, records=recs):
        protocol._res = lambda ctx: SimpleNamespace(tie=rule)  # the card's resolved tie rule
        return points.index(select_best(records, protocol.tie(None, points)).hparams)

    try:
        assert (pick("smaller-lr"), pick("later-point")) == (0, 1)
        high = [RunRecord(key=str(i), spec={"hparams": p}, status="ok", metrics={"top1": 70.0})
                for i, p in enumerate(points)]
        assert (pick("larger-lr", high), pick("later-point", high)) == (2, 3)
    finally:
        del protocol._res
