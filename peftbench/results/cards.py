"""Hyper-parameter cards (``peftbench cards``): per configuration and task, what was selected and trained.

From a suite's leaderboard (:func:`peftbench.results.board.build_board`: the final runs that count), for every
reproduced row and task: the hyper-parameters and options the final runs trained with, their seeds, the
protocol and search that chose them, and the result. Written as

* ``<suite>-cards.csv`` and ``<suite>-cards.json``: one entry per (configuration, task);
* ``<suite>-cards/<label>.toml``: one card per configuration, in the format of the papers' recipes
  (docs/protocols.md §15, ``selection.rule = fixed``, one row per task), which ``--protocol card --card FILE``
  trains as given, without a search;
* ``<suite>-cards/<label>.sweep.toml``: a sweep file that replays exactly those final runs (the card, the
  tasks, the seeds, the backbone): ``peftbench run --config <it> --runs-dir <another store>``.

Hyper-parameters that a card cannot set (a rung's ``stop_epoch``) are left out with a note; a configuration
whose final runs disagree on a value across seeds (edited records, mixed versions) is written with the value
of the most recent run and a note.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .._io import atomic_write_bytes, safe_component
from .._text import csv_cell
from ..errors import StoreError
from ..store.records import RUN_POSITION
from .board import FINAL_STAGE, Board, Run, _latest


@dataclass
class CardEntry:
    """One (configuration, task): what its final runs trained and what they scored."""

    label: str
    method: str
    task: str
    suite: str
    protocol: str
    backbone: str
    search: str
    seeds: list[int]
    hparams: dict
    options: dict
    top1_mean: float
    top1_std: float | None
    runs: list[str]  # record paths
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"label": self.label, "method": self.method, "task": self.task, "suite": self.suite,
                "protocol": self.protocol, "backbone": self.backbone, "search": self.search, "seeds": self.seeds,
                "hparams": self.hparams, "options": self.options, "top1_mean": self.top1_mean,
                "top1_std": self.top1_std, "runs": self.runs, "notes": self.notes}


def card_entries(board: Board) -> list[CardEntry]:
    """Every (reproduced row, task) of ``board`` with counted final runs."""
    by_row: dict[tuple, dict[str, list[Run]]] = {}
    for r in board.runs:
        if r.path in board.used and r.spec.get("stage") == FINAL_STAGE:
            by_row.setdefault(r.row_key(), {}).setdefault(str(r.spec["task"]), []).append(r)
    labels = {}
    for row in board.reproduced:
        labels[(row.config, row.backbone, row.checkpoint_id, row.protocol, row.precision)] = row.label
    out = []
    for key in sorted(by_row, key=lambda k: labels.get(k, str(k))):
        for task in board.grid.tasks:
            runs = by_row[key].get(task)
            if not runs:
                continue
            latest = _latest(runs)
            notes = []
            hp = {}
            for k, v in sorted(latest.spec.get("hparams", {}).items()):
                if k in RUN_POSITION:
                    notes.append(f"hyper-parameter {k}={v} left out (a card does not set it)")
                    continue
                if any(r.spec.get("hparams", {}).get(k) != v for r in runs):
                    notes.append(f"{k}: the final runs disagree; the latest run's {v!r} is written")
                hp[k] = v
            options = dict(latest.spec.get("options") or {})
            tops = [float(r.top1) for r in runs if r.top1 is not None]
            out.append(CardEntry(
                label=labels.get(key, key[0]), method=str(latest.spec["method"]), task=task, suite=board.grid.suite,
                protocol=str(latest.spec.get("protocol")), backbone=str(latest.spec.get("backbone") or ""),
                search=str(latest.spec.get("search") or "grid"), seeds=sorted(int(r.spec["seed"]) for r in runs),
                hparams=hp, options=options, top1_mean=statistics.fmean(tops),
                top1_std=statistics.stdev(tops) if len(tops) > 1 else None, runs=sorted(r.path for r in runs),
                notes=notes))
    return out


def cards_csv(entries: list[CardEntry]) -> str:
    keys = sorted({k for e in entries for k in e.hparams})
    opts = sorted({k for e in entries for k in e.options})
    head = ["label", "method", "task", "protocol", "search", "backbone", "seeds", *keys, *(f"option:{o}" for o in opts),
            "top1_mean", "top1_std", "notes"]
    lines = [",".join(csv_cell(h) for h in head)]
    for e in entries:
        row = [e.label, e.method, e.task, e.protocol, e.search, e.backbone, " ".join(map(str, e.seeds)),
               *(_plain(e.hparams.get(k, "")) for k in keys), *(_plain(e.options.get(o, "")) for o in opts),
               f"{e.top1_mean:.4f}", "" if e.top1_std is None else f"{e.top1_std:.4f}", "; ".join(e.notes)]
        lines.append(",".join(csv_cell(str(v)) for v in row))
    return "\n".join(lines) + "\n"


def _plain(v) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return str(v)


def card_toml(entries: list[CardEntry], runs_dir: str) -> str:
    """One card (docs/protocols.md §15) for the entries of one configuration: every task's configuration as a
    per-task row, the rule ``fixed`` (train as given), the seeds of the final runs."""
    import tomlkit

    from .._version import __version__
    from ..provenance import git_sha

    first = entries[0]
    # (None: a default, e.g. lora's alpha = rank; a card leaves it to the method)
    columns = sorted({k for e in entries for k, v in e.hparams.items() if v is not None})
    options = sorted({k for e in entries for k, v in e.options.items() if v is not None})
    seeds = sorted({s for e in entries for s in e.seeds})
    doc = tomlkit.document()
    doc.add(tomlkit.comment(f"peftbench cards: the configurations the final runs of {first.label} trained on suite "
                            f"{first.suite}, read from the run records in {runs_dir}. Train them as given:"))
    doc.add(tomlkit.comment(f"peftbench run --protocol card --card <this file> --methods {first.method} --suite "
                            f"{first.suite} (docs/protocols.md §15)."))
    doc["schema"] = 1
    code = f"peftbench@{git_sha() or __version__}"
    doc["paper"] = {"title": f"the runs of {first.label} in {runs_dir}", "code": code,
                    "reference": f"the row {first.label} of {first.suite}-leaderboard.csv", "suites": [first.suite]}
    doc["selection"] = {"rule": {"value": "fixed", "source": f"chosen by protocol {first.protocol} (search "
                                                              f"{first.search}) in {runs_dir}"}}
    doc["seeds"] = {"value": seeds, "source": f"the seeds of the final runs in {runs_dir}"}
    table = {"columns": [*columns, *(f"option:{o}" for o in options)],
             "source": f"the final runs of {{task}} in {runs_dir} (peftbench cards)"}
    for e in entries:
        table[e.task] = [e.hparams.get(k) for k in columns] + [e.options.get(o) for o in options]
    missing = [(e.task, k) for e in entries for k in columns if e.hparams.get(k) is None]
    missing += [(e.task, o) for e in entries for o in options if e.options.get(o) is None]
    if missing:  # a TOML array has no null: a value one task lacks is not a card
        raise StoreError(f"cannot write a card for {first.label}: {missing[0][0]} has no {missing[0][1]} (its runs "
                         "were planned differently from the other tasks'); write its tasks' cards separately")
    doc["methods"] = {first.method: {"tasks": {first.suite: table}}}
    return tomlkit.dumps(doc)


def replay_sweep(entries: list[CardEntry], card_path: Path) -> str:
    """A sweep file that trains the card's final runs again (in another store)."""
    import tomlkit

    first = entries[0]
    doc = tomlkit.document()
    doc.add(tomlkit.comment(f"peftbench cards: replays the final runs of {first.label} (peftbench run --config "
                            "<this file> --runs-dir <a store>)"))
    doc["methods"] = [first.method]
    doc["suite"] = first.suite
    doc["tasks"] = [e.task for e in entries]
    doc["protocol"] = "card"
    doc["card"] = card_path.name  # relative: beside this file
    doc["seeds"] = sorted({s for e in entries for s in e.seeds})
    doc["backbone"] = first.backbone
    return tomlkit.dumps(doc)


def write_cards(board: Board, out_dir: str | Path, runs_dir: str) -> list[Path]:
    """The card files of one suite (module docstring); returns their paths."""
    entries = card_entries(board)
    if not entries:
        return []
    out = Path(out_dir)
    suite = safe_component(board.grid.suite, "suite")
    folder = out / f"{suite}-cards"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the folder {folder}: {exc.strerror or exc}") from None
    written = [_write(out / f"{suite}-cards.csv", cards_csv(entries)),
               _write(out / f"{suite}-cards.json", json.dumps([e.to_dict() for e in entries], indent=1) + "\n")]
    by_label: dict[str, list[CardEntry]] = {}
    for e in entries:
        by_label.setdefault(e.label, []).append(e)
    for label, group in by_label.items():
        name = safe_component(_file_name(label), "card")
        card = _write(folder / f"{name}.toml", card_toml(group, runs_dir))
        written += [card, _write(folder / f"{name}.sweep.toml", replay_sweep(group, card))]
    return written


def _file_name(label: str) -> str:
    """A configuration label as a file name: adapter(reduction=8) [vit, vpt] -> adapter-reduction-8-vit-vpt."""
    keep = "".join(c if c.isalnum() or c in "._" else "-" for c in label)
    return "-".join(p for p in keep.split("-") if p) or "card"


def _write(path: Path, text: str) -> Path:
    try:
        return atomic_write_bytes(path, text.encode("utf-8"), fsync=False)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from None
