"""Publishing a trained run (docs/export.md): `peftbench export` finds the run by method, task and seed (or a key prefix
that `peftbench status --all` shows), writes a Hugging Face hub folder whose every model reloads with the run's logits
(peftbench's own format with `peftbench.load_pretrained`, timm's, peft's), a model card the hub reads, and uploads it with
one flag (tested against a local stand-in for the hub: no network)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY_BACKBONE, ensure_registered, make_data_root
from test_clean_errors import one_line_error as one_error_line

import peftbench
from peftbench.cli import main
from peftbench.export import CONFIG, ExportError, export_folder, load_pretrained, push_to_hub

ensure_registered()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """lora with two seeds and vpt-shallow with one, one epoch each on the toy task, weights kept."""
    root = make_data_root(tmp_path_factory.mktemp("pubdata"))
    runs = tmp_path_factory.mktemp("pubruns")
    for methods, seeds in (("lora", "0,1"), ("vpt-shallow", "0")):
        assert main(["run", "--methods", methods, "--suite", "testsuite", "--tasks", "toy", "--data-root", str(root),
                     "--runs-dir", str(runs), "--backbone", TINY_BACKBONE, "--protocol", "fixed", "--seeds", seeds,
                     "--epochs", "1", "--batch-size", "16", "--quiet"]) == 0
    return runs


def finals(runs: Path, method: str) -> list[dict]:
    recs = [json.loads(p.read_text()) for p in Path(runs, method, "toy").glob("*.json") if "." not in p.stem]
    return sorted((r for r in recs if r["spec"]["stage"] == "final"), key=lambda r: r["spec"]["seed"])


def test_export_by_method_task_and_seed_loads_back_in_every_format(runs, tmp_path, capsys):
    import timm
    from huggingface_hub import ModelCard
    from peft import PeftModel

    from peftbench.backbones import create_backbone

    rec = finals(runs, "lora")[1]
    out = tmp_path / "lora-toy"
    capsys.readouterr()
    assert main(["export", "--runs-dir", str(runs), "--method", "lora", "--task", "toy", "--seed",
                 str(rec["spec"]["seed"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors",
                     CONFIG, "peftbench_model.safetensors"]
    assert all(f in printed for f in files) and "reloaded and checked" in printed
    model = peftbench.load_pretrained(out)
    assert model.export_info["run"] == rec["key"] and model.export_info["num_classes"] == 3 and not model.training
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # timm alone, from its hub files
        assert (plain(x) - expected).abs().max() < 1e-4
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the tiny test backbone is random: as the run's (seeded 0)
            base = create_backbone(TINY_BACKBONE)
        base.reset_classifier(3)
        adapter = PeftModel.from_pretrained(base, str(out)).eval()  # peft alone, onto the timm backbone
        assert torch.equal(adapter(x), expected)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["modules_to_save"] == ["head"]
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "timm" and "lora" in card.data.tags
    result = card.data.eval_results[0]
    assert result.metric_type == "accuracy" and result.metric_value == pytest.approx(rec["metrics"]["top1"], abs=1e-3)
    assert result.dataset_split == "test"
    assert f"| run key | {rec['key']} |" in card.text and "| lr | " in card.text
    assert "peftbench.load_pretrained" in card.text and "PeftModel.from_pretrained" in card.text


def test_a_prompt_method_exports_in_peftbench_format_only(runs, tmp_path):
    (rec,) = finals(runs, "vpt-shallow")
    done = export_folder(runs, tmp_path / "vpt", method="vpt-shallow", task="toy")
    assert done.key == rec["key"] and set(done.diffs) == {"peftbench"}
    assert sorted(done.files) == ["README.md", CONFIG, "peftbench_model.safetensors"]
    assert load_pretrained(done.folder).export_info["method"] == "vpt-shallow"


def test_choosing_the_run_lists_key_prefixes_and_status_shows_them(runs, tmp_path, capsys):
    a, b = finals(runs, "lora")
    capsys.readouterr()
    assert main(["export", "--runs-dir", str(runs), "--method", "lora", "--task", "toy", "--out", str(tmp_path / "x")]) == 2
    line = one_error_line(capsys.readouterr().err, "names 2 runs", a["key"][:10], b["key"][:10], "--seed")
    assert "Traceback" not in line and not (tmp_path / "x").exists()
    assert main(["export", "--runs-dir", str(runs), "--method", "lora", "--task", "toy", "--seed", "77"]) == 2
    one_error_line(capsys.readouterr().err, "no finished run with kept weights", "seed 77", "status --all")
    assert main(["export", "--runs-dir", str(runs)]) == 2
    one_error_line(capsys.readouterr().err, "--method M --task T")
    assert main(["status", "--runs-dir", str(runs), "--all", "--no-query"]) == 0
    listed = capsys.readouterr().out
    assert a["key"][:10] in listed and b["key"][:10] in listed
    assert main(["export", "--runs-dir", str(runs), "--run", a["key"][:10], "--out", str(tmp_path / "y")]) == 0
    assert json.loads((tmp_path / "y" / CONFIG).read_text())["run"] == a["key"]
    assert main(["export", "--runs-dir", str(runs), "--run", a["key"][:10], "--out", str(tmp_path / "y")]) == 2
    one_error_line(capsys.readouterr().err, "not an empty folder")


def test_load_pretrained_refuses_what_is_not_an_export_in_one_line(runs, tmp_path):
    with pytest.raises(ExportError, match="no peftbench_config.json"):
        load_pretrained(tmp_path)
    done = export_folder(runs, tmp_path / "v", method="vpt-shallow", task="toy")
    info = json.loads((done.folder / CONFIG).read_text())
    (done.folder / CONFIG).write_text(json.dumps({**info, "format": "other/9"}))
    with pytest.raises(ExportError, match="format 'other/9'"):
        load_pretrained(done.folder)
    (done.folder / CONFIG).write_text(json.dumps({**info, "method": "no-such-method"}))
    with pytest.raises(ExportError, match="not registered"):
        load_pretrained(done.folder)
    (done.folder / CONFIG).write_text(json.dumps({**info, "method": "lora"}))  # tensors of another method
    with pytest.raises(ExportError, match="lacks 6 trained tensor.*of a 'lora' model"):
        load_pretrained(done.folder)


def test_a_model_trained_from_a_release_file_needs_that_file_back(tmp_path):
    """A backbone from a local checkpoint: load_pretrained asks for the file, and refuses another one (its sha256)."""
    from safetensors.torch import save_file

    from peftbench.backbones import create_backbone

    root = make_data_root(tmp_path / "data")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        own = create_backbone(TINY_BACKBONE, pretrained=False)
    ckpt = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in own.state_dict().items()}, str(ckpt))
    runs = tmp_path / "runs"
    assert main(["run", "--methods", "bitfit", "--suite", "testsuite", "--tasks", "toy", "--data-root", str(root),
                 "--runs-dir", str(runs), "--backbone", TINY_BACKBONE, "--checkpoint", str(ckpt), "--protocol",
                 "fixed", "--seeds", "1", "--epochs", "1", "--batch-size", "16", "--quiet"]) == 0
    done = export_folder(runs, tmp_path / "out", method="bitfit", task="toy")
    assert json.loads((done.folder / CONFIG).read_text())["checkpoint_file"] == "weights.safetensors"
    with pytest.raises(ExportError, match="pass it"):
        load_pretrained(done.folder)
    moved = tmp_path / "elsewhere.safetensors"
    shutil.copy(ckpt, moved)
    assert load_pretrained(done.folder, moved).export_info["method"] == "bitfit"
    save_file({k: v.contiguous() + 1 for k, v in own.state_dict().items()}, str(moved))
    with pytest.raises(ExportError, match="another file"):
        load_pretrained(done.folder, moved)


class LocalHub:
    """A stand-in for huggingface_hub.HfApi that keeps repositories in a local folder."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[tuple] = []

    def create_repo(self, repo_id, repo_type, private, exist_ok):
        self.calls.append(("create_repo", repo_id, private))
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
        self.calls.append(("upload_folder", repo_id, commit_message))
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)


def test_push_to_hub_uploads_the_folder_and_errors_are_one_line(runs, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    done = export_folder(runs, tmp_path / "v", method="vpt-shallow", task="toy")
    hub = LocalHub(tmp_path / "hub")
    url = push_to_hub(done.folder, "me/vpt-toy", private=True, api=hub)
    assert url == "https://huggingface.co/me/vpt-toy" and hub.calls[0] == ("create_repo", "me/vpt-toy", True)
    assert done.key in hub.calls[1][2]
    assert load_pretrained(tmp_path / "hub" / "me" / "vpt-toy").export_info["run"] == done.key  # a download, reloaded
    # the flag, through the real HfApi class with the local stand-in's behaviour
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)
    capsys.readouterr()
    assert main(["export", "--runs-dir", str(runs), "--method", "vpt-shallow", "--task", "toy", "--out",
                 str(tmp_path / "w"), "--push-to-hub", "me/again"]) == 0
    assert "uploaded to https://huggingface.co/me/again" in capsys.readouterr().out
    assert (tmp_path / "hub" / "me" / "again" / "README.md").is_file()
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the real client, offline: one line, the folder kept
    assert main(["export", "--runs-dir", str(runs), "--method", "vpt-shallow", "--task", "toy", "--out",
                 str(tmp_path / "z"), "--push-to-hub", "me/offline"]) == 2
    one_error_line(capsys.readouterr().err, "--push-to-hub me/offline")
    assert (tmp_path / "z" / CONFIG).is_file()


def test_what_load_pretrained_refuses_from_a_config(runs, tmp_path):
    """A downloaded folder is data: its weights file is the export's own, its backbone a name (not a location), every
    trained tensor present; loading it leaves the caller's random generators as they were."""
    import random

    import numpy as np
    from safetensors.torch import load_file, save_file

    done = export_folder(runs, tmp_path / "v", method="vpt-shallow", task="toy")
    cfg = done.folder / CONFIG
    info = json.loads(cfg.read_text())
    for change, needle in (({"weights": "../../elsewhere.safetensors"}, "in its own folder"),
                           ({"backbone": "hf-hub:someone/model"}, "not a location")):
        cfg.write_text(json.dumps({**info, **change}))
        with pytest.raises(ExportError, match=needle):
            load_pretrained(done.folder)
    cfg.write_text(json.dumps(info))
    state = load_file(str(done.folder / "peftbench_model.safetensors"))
    dropped = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, str(done.folder / "peftbench_model.safetensors"))
    with pytest.raises(ExportError, match=f"lacks 1 trained tensor.*{dropped}"):
        load_pretrained(done.folder)
    save_file(state, str(done.folder / "peftbench_model.safetensors"))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    before = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    load_pretrained(done.folder)
    assert (random.random(), np.random.rand(), torch.rand(1)) == before


def test_the_export_options_that_do_not_apply_are_refused(runs, tmp_path, capsys):
    base = ["export", "--runs-dir", str(runs), "--method", "vpt-shallow", "--task", "toy"]
    assert main([*base, "--variant", "folded"]) == 2
    one_error_line(capsys.readouterr().err, "--variant folded", "single file")
    assert main([*base, "--private"]) == 2
    one_error_line(capsys.readouterr().err, "--private")
    (tmp_path / "m.safetensors").write_bytes(b"x")
    assert main(["export", "--runs-dir", str(runs), "--method", "lora", "--task", "toy", "--seed", "0", "--out",
                 str(tmp_path / "m.safetensors")]) == 2
    one_error_line(capsys.readouterr().err, "exists")


def test_a_logit_check_never_passes_nan():
    from peftbench.export import _check

    good = torch.zeros(2, 3)
    with pytest.raises(ExportError, match="differ"):
        _check("m", "k", good, torch.full((2, 3), float("nan")))
    with pytest.raises(ExportError, match="shape"):
        _check("m", "k", good, torch.zeros(2, 4))
    assert _check("m", "k", good, good) == 0.0
