"""Bad input gets a clear error naming the file, line or option, before any compute, and never loses a
finished run."""
import json

import pytest
import torch
from helpers import TINY_BACKBONE, ensure_registered, make_data_root
from safetensors.torch import save_file

from peftbench.cli import main

ensure_registered()


@pytest.fixture
def root(tmp_path):
    return make_data_root(tmp_path / "data")


def run(capsys, root, runs, *extra, tasks="toy"):
    code = main(["run", "--methods", "linear", "--suite", "testsuite", "--tasks", tasks, "--data-root", str(root),
                 "--runs-dir", str(runs), "--backbone", TINY_BACKBONE, "--protocol", "fixed", "--seeds", "1",
                 "--epochs", "1", "--batch-size", "16", "--quiet", *extra])
    return code, capsys.readouterr().err


@pytest.fixture
def finished(capsys, root, tmp_path):
    """A runs dir holding one finished run, and its record's bytes."""
    runs = tmp_path / "runs"
    code, _ = run(capsys, root, runs)
    assert code == 0
    (rec,) = list(runs.rglob("*.json"))
    return runs, rec, rec.read_bytes()


@pytest.mark.parametrize("argv,needle", [
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--methods", "linear", "--tasks", "toyy"], "unknown task 'toyy'"),
    (["--methods", "linear", "--suite", "vtabb"], "unknown suite 'vtabb'"),
    (["--methods", "linear", "--set", "linear.dropout=1"], "method 'linear' has no option 'dropout'"),
    (["--methods", "vpt", "--set", "vpt.prompt_tokens=ten"], "cannot read 'ten'"),
])
def test_unknown_names_and_options(capsys, argv, needle):
    assert main(["run", "--suite", "testsuite"] + argv if "--suite" not in argv else ["run"] + argv) == 2
    assert needle in capsys.readouterr().err


def test_missing_data_root_names_path_and_how_to_get(capsys, tmp_path):
    code = main(["run", "--methods", "linear", "--suite", "vtab", "--tasks", "dtd", "--data-root",
                 str(tmp_path / "nowhere"), "--backbone", TINY_BACKBONE])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "nowhere" / "vtab-1k" / "dtd") in err and "--data-root" in err


def test_vtab_without_data_root_says_how(capsys, monkeypatch):
    monkeypatch.delenv("PEFTBENCH_DATA", raising=False)
    assert main(["run", "--methods", "linear", "--suite", "vtab", "--backbone", TINY_BACKBONE]) == 2
    assert "--data-root" in capsys.readouterr().err


def test_missing_split_file(capsys, root, finished):
    runs, rec, before = finished
    (root / "testsuite" / "toy" / "val200.txt").unlink()
    code, err = run(capsys, root, runs)
    assert code == 2 and "val200.txt is missing" in err
    assert rec.read_bytes() == before


def test_malformed_split_line_names_file_and_line(capsys, root, finished):
    runs, rec, before = finished
    f = root / "testsuite" / "toy" / "test.txt"
    lines = f.read_text().splitlines()
    lines[4] = "images/test/000004.png"  # no label
    f.write_text("\n".join(lines) + "\n")
    code, err = run(capsys, root, runs)
    assert code == 2 and f"{f}:5:" in err
    assert rec.read_bytes() == before


def test_label_outside_classes(capsys, root, finished):
    runs, rec, before = finished
    f = root / "testsuite" / "toy" / "train800.txt"
    lines = f.read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0] + " 7"
    f.write_text("\n".join(lines) + "\n")
    code, err = run(capsys, root, runs)
    assert code == 2 and f"{f}:3: label 7 is outside the task's classes 0..2" in err
    assert rec.read_bytes() == before


def test_undecodable_image_names_its_path(capsys, root, finished):
    runs, rec, before = finished
    bad = root / "testsuite" / "toy_b" / "images" / "test" / "000003.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    code, err = run(capsys, root, runs, tasks="toy_b")
    assert code != 0 and str(bad) in err
    assert rec.read_bytes() == before


def test_checkpoint_that_does_not_fit_names_keys(capsys, root, finished, tmp_path):
    runs, rec, before = finished
    ck = tmp_path / "wrong.safetensors"
    save_file({"cls_token": torch.zeros(1, 1, 7), "something.else": torch.zeros(2)}, str(ck))
    code, err = run(capsys, root, runs, "--checkpoint", str(ck))
    assert code == 2 and "does not fit the backbone" in err
    assert "missing keys" in err and "unexpected keys [something.else]" in err and "cls_token (1, 1, 7)" in err
    assert rec.read_bytes() == before
    code, err = run(capsys, root, runs, "--checkpoint", str(tmp_path / "absent.pth"))
    assert code == 2 and "absent.pth: no such file" in err


def test_pickled_checkpoint_is_refused(capsys, root, tmp_path):
    ck = tmp_path / "evil.pth"
    torch.save({"x": object()}, ck)  # needs pickle code to load: weights_only refuses it
    code, err = run(capsys, root, tmp_path / "runs", "--checkpoint", str(ck))
    assert code == 2 and "weights_only" in err


def test_good_checkpoint_loads(capsys, root, tmp_path):
    from peftbench.backbones import create_backbone

    bb = create_backbone(TINY_BACKBONE)
    ck = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in bb.state_dict().items()}, str(ck))
    code, _ = run(capsys, root, tmp_path / "runs", "--checkpoint", str(ck))
    assert code == 0
    (rec,) = list((tmp_path / "runs").rglob("*.json"))
    assert json.loads(rec.read_text())["spec"]["checkpoint_id"]


def test_a_misspelt_option_names_the_close_one_and_the_options(capsys):
    assert main(["params", "--method", "lora", "--set", "rnak=4", "--num-classes", "10"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'rank'?" in err and "options: alpha, dropout, init, rank, targets" in err
    assert main(["params", "--method", "lora", "--set", "lora.rnak=4", "--num-classes", "10"]) == 2
    assert "did you mean 'rank'?" in capsys.readouterr().err


def test_params_lists_a_methods_options(capsys):
    assert main(["params", "--method", "lora", "--options"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("options of lora") and "rank" in out and "rank r of B·A" in out and "default 8" in out
    assert main(["params", "--method", "lora"]) == 2
    assert "--num-classes N is required" in capsys.readouterr().err


def test_an_unknown_task_lists_the_tasks_of_the_selected_suite(capsys):
    assert main(["run", "--methods", "lora", "--suite", "demo", "--tasks", "demo_digitz", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'demo_digits'?" in err and "Tasks of suite 'demo': demo_digits" in err
    assert "cifar100" not in err  # not every suite's tasks


def test_the_resolved_sweep_keeps_the_device_and_precision_as_asked(tmp_path):
    """Not the machine's: a sweep resolved on a CPU laptop says nothing of "cpu" or "fp32" unless asked."""
    from peftbench.api import plan_sweep
    from peftbench.api.schema import Sweep
    from peftbench.api.sweep import write_resolved

    root = make_data_root(tmp_path / "data")
    base = dict(methods=["linear"], suite="testsuite", tasks=["toy"], data_root=str(root), backbone=TINY_BACKBONE,
                runs_dir=str(tmp_path / "runs"), protocol="fixed", seeds=[1])
    text = write_resolved(plan_sweep(Sweep(**base), check_data=False)).read_text()
    import re

    assert not re.search(r"^(device|precision) = ", text, re.M)
    text = write_resolved(plan_sweep(Sweep(**base, device="cpu", precision="fp32", name="asked"),
                                     check_data=False)).read_text()
    assert re.search(r'^device = "cpu"$', text, re.M) and re.search(r'^precision = "fp32"$', text, re.M)


def test_every_missing_package_is_named_at_once_before_anything_is_planned(tmp_path, monkeypatch):
    import importlib.util

    from peftbench.api import plan_sweep
    from peftbench.api.schema import Sweep
    from peftbench.errors import SettingsError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("ray", "wandb") else real(name, *a))
    runs = tmp_path / "runs"
    sweep = Sweep(methods=["linear"], suite="testsuite", tasks=["toy"], data_root=str(tmp_path / "no-data"),
                  backbone=TINY_BACKBONE, runs_dir=str(runs), executor="ray", trackers=["wandb"])
    with pytest.raises(SettingsError, match=r"^missing packages: --executor ray needs 'ray'; --tracker wandb needs "
                                            r"'wandb' \(pip install 'peftbench\[ray,wandb\]'\)$"):
        plan_sweep(sweep)
    assert not runs.exists()  # nothing made, and the missing data was not what stopped it


def test_the_decode_log_names_the_cache_folder_once(tmp_path, capsys, monkeypatch):
    """First use decodes every split: one short line per split, the cache folder named once (not an absolute path on
    every line)."""
    import peftbench.data.cache as cache
    from peftbench.data.loader import load_split
    from peftbench.tasks import get_task

    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_ANNOUNCED", set())
    root = make_data_root(tmp_path / "data")
    for split in ("train800", "val200"):
        load_split(get_task("toy"), root, split, 32)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("peftbench: decoded")]
    assert len(err) == 3 and err[0].startswith("peftbench: decoded images are cached in ")
    assert all(str(tmp_path) not in line for line in err[1:])
