"""The required settings tables of the plugin conformance suite (tests/test_plugin_conformance.py): one row per
registered built-in executor, tracker, data layout and protocol. A registered plugin without a row fails the
suite, saying what to add; a row for a plugin that is not registered fails too.

* executors: the settings that make a cheap instance on this machine (``make``), or the reason it cannot be made
  here and the test that runs the same contract where it can (``needs``: an environment variable that, when set,
  makes it available, e.g. CI's Ray cluster).
* trackers: the environment and settings that make it write locally, and the files it writes (a glob under the
  runs folder, ``{tmp}`` for the test's folder).
* layouts: the function that writes a tiny task in that layout (``write(data_root) -> task name``).
* protocols: the number of final runs per (method, task) pair for one seed and the stages it plans for a linear
  probe with a 2-point grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class ExecutorRow:
    settings: dict = field(default_factory=dict)
    doc: str = "docs/executors.md"
    needs: str = ""  # an environment variable without which the executor cannot run here
    reason: str = ""  # why, and where it is tested instead


@dataclass(frozen=True)
class TrackerRow:
    options: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    writes: str = ""  # a glob under the runs folder ({tmp}: the test's temporary folder)


@dataclass(frozen=True)
class LayoutRow:
    write: Callable


@dataclass(frozen=True)
class ProtocolRow:
    stages: tuple[str, ...]  # planned for linear on the toy task with --lr 0.1,0.2 and one seed
    card: str | None = None  # the --card file it needs (tests/papers/...)


EXECUTORS: dict[str, ExecutorRow] = {
    "local": ExecutorRow(),
    "slurm": ExecutorRow(settings={"cluster": "debug", "poll_s": 0.01, "gpus_per_node": 0, "cpus_per_task": 1},
                         doc="docs/slurm.md"),
    "ray": ExecutorRow(settings={"gpus_per_run": 0, "cpus_per_run": 1}, needs="RAY_ADDRESS",
                       reason="needs a Ray cluster (CI starts one and sets RAY_ADDRESS; tests/test_ray_executor.py "
                              "starts its own)"),
}

TRACKERS: dict[str, TrackerRow] = {
    "tensorboard": TrackerRow(writes="tensorboard/*/*/*/*/events.out.tfevents.*"),
    "wandb": TrackerRow(options={"project": "conformance"}, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
                        writes="wandb/offline-run-*/run-*.wandb"),
    "mlflow": TrackerRow(options={"uri": "file://{tmp}/mlruns"}, env={"MLFLOW_ALLOW_FILE_STORE": "true"},
                         writes="../mlruns/*/*/meta.yaml"),
}


def _noah(root):
    from helpers import make_data_root

    make_data_root(root)
    return "toy"


def _tfds(root):
    from fixtures_data import write_tfds_toy

    return write_tfds_toy(root)


def _fgvc_json(root):
    from fixtures_data import write_fgvc_task

    write_fgvc_task(root, "cub", per_class={"train": 1, "val": 1, "test": 1})
    return "cub"


LAYOUTS: dict[str, LayoutRow] = {
    "noah": LayoutRow(write=_noah),
    "fgvc-json": LayoutRow(write=_fgvc_json),
    "tfds": LayoutRow(write=_tfds),
}

PROTOCOLS: dict[str, ProtocolRow] = {
    "vpt": ProtocolRow(stages=("search", "search", "final")),
    "demo": ProtocolRow(stages=("search", "search", "final")),
    "fixed": ProtocolRow(stages=("final",)),  # given hyper-parameters: the first point of a grid, no search
    # the tests' card (tests/papers/testsuite.toml): linear searches its grid
    "paper": ProtocolRow(stages=("search", "search", "final")),
    # a card trains as given (the tests' card: linear's rule there is a search, so the --lr grid is searched)
    "card": ProtocolRow(stages=("search", "search", "final"), card="papers/testsuite.toml"),
}
