"""peftbench cards (docs/protocols.md §15, issue "paper recipes" item 4): the selected and trained configurations
exported as CSV, JSON, cards and sweep files, and a card trained back as given (--protocol card): the replayed
final runs equal the originals bit for bit."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import TINY_BACKBONE, make_data_root

from peftbench.cli import main
from peftbench.sweep.paper import read_card


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("carddata"))


def _records(runs):
    return [json.loads(p.read_text()) for p in sorted(Path(runs).glob("*/*/*.json")) if "." not in p.stem]


@pytest.fixture(scope="module")
def store(root, tmp_path_factory):
    """A searched sweep: two methods, a 2-point lr grid, two seeds, both toy tasks."""
    runs = tmp_path_factory.mktemp("cardruns") / "runs"
    assert main(["run", "--methods", "linear,vpt-deep", "--suite", "testsuite", "--data-root", str(root),
                 "--runs-dir", str(runs), "--backbone", TINY_BACKBONE, "--protocol", "vpt", "--seeds", "1,2",
                 "--epochs", "2", "--batch-size", "16", "--lr", "0.5,0.05", "--wd", "0", "--quiet",
                 "--set", "vpt-deep.prompt_tokens=2"]) == 0
    return runs


def test_cards_export_what_was_selected_and_trained(store, capsys):
    assert main(["cards", "--runs-dir", str(store)]) == 0
    out = store / "cards"
    rows = list(csv.DictReader((out / "testsuite-cards.csv").open()))
    finals = [r for r in _records(store) if r["spec"]["stage"] == "final"]
    assert len(rows) == 4  # 2 configurations x 2 tasks
    for row in rows:
        mine = [r for r in finals if r["spec"]["config"] == row["label"] and r["spec"]["task"] == row["task"]]
        assert float(row["lr"]) == mine[0]["spec"]["hparams"]["lr"]  # the chosen point
        assert row["seeds"] == "1 2" and row["protocol"] == "vpt"
        assert float(row["top1_mean"]) == pytest.approx(sum(r["metrics"]["top1"] for r in mine) / 2, abs=1e-4)
    entries = json.loads((out / "testsuite-cards.json").read_text())
    assert {e["label"] for e in entries} == {"linear", "vpt-deep(prompt_tokens=2)"}
    vpt = next(e for e in entries if e["method"] == "vpt-deep")
    assert vpt["options"]["prompt_tokens"] == 2 and vpt["hparams"]["epochs"] == 2
    card = read_card(out / "testsuite-cards" / "vpt-deep-prompt_tokens-2.toml")  # a card the protocol reads
    assert card.methods == ("vpt-deep",) and card.suites == ("testsuite",)


def test_a_card_replays_the_final_runs_bit_for_bit_without_a_search(store, root, tmp_path, capsys):
    assert main(["cards", "--runs-dir", str(store)]) == 0
    sweep = store / "cards" / "testsuite-cards" / "vpt-deep-prompt_tokens-2.sweep.toml"
    again = tmp_path / "again"
    assert main(["run", "--config", str(sweep), "--runs-dir", str(again), "--data-root", str(root), "--quiet"]) == 0
    replayed = _records(again)
    assert replayed and all(r["spec"]["stage"] == "final" and r["spec"]["protocol"] == "card" for r in replayed)
    original = {(r["spec"]["task"], r["spec"]["seed"]): r for r in _records(store)
                if r["spec"]["stage"] == "final" and r["spec"]["method"] == "vpt-deep"}
    assert len(replayed) == len(original) == 4
    for r in replayed:
        o = original[r["spec"]["task"], r["spec"]["seed"]]
        assert r["spec"]["hparams"] == o["spec"]["hparams"] and r["spec"]["options"] == o["spec"]["options"]
        assert r["metrics"]["top1"] == o["metrics"]["top1"] and r["history"] == o["history"]  # bit for bit


def test_a_card_is_given_with_its_protocol_only(root, tmp_path, capsys):
    code = main(["run", "--methods", "linear", "--suite", "testsuite", "--data-root", str(root), "--runs-dir",
                 str(tmp_path / "r"), "--backbone", TINY_BACKBONE, "--card", str(tmp_path / "x.toml"), "--quiet"])
    assert code == 2 and "a card file is what --protocol card trains" in capsys.readouterr().err
    code = main(["run", "--methods", "linear", "--suite", "testsuite", "--data-root", str(root), "--runs-dir",
                 str(tmp_path / "r"), "--backbone", TINY_BACKBONE, "--protocol", "card", "--quiet"])
    assert code == 2 and "give the card file with --card FILE" in capsys.readouterr().err


def test_cards_of_an_empty_store_say_so(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    assert main(["cards", "--runs-dir", str(tmp_path / "runs")]) == 0
    assert "nothing to export" in capsys.readouterr().err
