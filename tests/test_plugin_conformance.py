"""The contracts of the other plugin kinds, checked for every registered built-in executor, tracker, data layout
and protocol (parametrised from their registries; each needs a row in tests/plugin_settings.py).

* executor: ``run(specs, store)`` returns the records of the specs in order, trains each run once (a second
  call trains nothing), and its settings are documented;
* tracker: it receives a real run and writes where its row says; its settings are documented;
* layout: a task in that layout reads every split and passes ``data verify``;
* protocol: it plans the stages its row says, one final run per seed, and is documented.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import plugin_settings as table
import pytest
from helpers import TINY_BACKBONE, ensure_registered, make_data_root

from peftbench.api.schema import Sweep
from peftbench.data.layouts import LAYOUTS
from peftbench.executors import EXECUTORS
from peftbench.store import RunStore
from peftbench.sweep.drive import count_runs, drive
from peftbench.sweep.plan import plan
from peftbench.sweep.protocols import PROTOCOLS
from peftbench.trackers import TRACKERS

ensure_registered()
ROOT = Path(__file__).resolve().parent.parent


def builtin(registry) -> list[str]:
    return sorted(n for n, item in registry.items() if type(item).__module__.startswith("peftbench."))


def row(kind: str, rows: dict, name: str):
    if name not in rows:
        pytest.fail(f"{kind} {name!r} has no row in tests/plugin_settings.py: add {kind.upper()}S[{name!r}]")
    return rows[name]


@pytest.mark.parametrize("kind,registry,rows", [("executor", EXECUTORS, table.EXECUTORS),
                                                ("tracker", TRACKERS, table.TRACKERS),
                                                ("layout", LAYOUTS, table.LAYOUTS),
                                                ("protocol", PROTOCOLS, table.PROTOCOLS)])
def test_every_builtin_plugin_has_a_row_and_every_row_a_plugin(kind, registry, rows):
    names = builtin(registry)
    assert not [n for n in names if n not in rows], f"add rows to tests/plugin_settings.py for {kind}s " \
                                                   f"{[n for n in names if n not in rows]}"
    assert not [n for n in rows if n not in names], f"rows for unregistered {kind}s: {[n for n in rows if n not in names]}"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("plugdata"))


def linear(data_root, protocol="fixed", lrs=(0.1,), card=None):
    return plan(Sweep(methods=["linear"], suite="testsuite", tasks=["toy"], protocol=protocol, seeds=[1],
                              data_root=str(data_root), backbone=TINY_BACKBONE, card=card,
                              **{"epochs": 1, "batch_size": 16, "lr": tuple(lrs), "wd": (0.0,)}))


# ---------------------------------------------------------------------------------------------
# executors
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", builtin(EXECUTORS))
def test_an_executor_returns_each_stages_records_in_order_and_trains_each_run_once(name, demo_root, tmp_path):
    from peftbench.train.env import Env

    r = row("executor", table.EXECUTORS, name)
    plugin = EXECUTORS.get(name)
    doc = (ROOT / r.doc).read_text(encoding="utf-8")
    assert f"`{name}`" in doc or name in doc, f"{r.doc} does not name executor {name!r}"
    docs = doc + (ROOT / "docs" / "sweep-files.md").read_text(encoding="utf-8")
    undocumented = [k for k in plugin.settings if not re.search(rf"`{k}\b", docs)]
    assert not undocumented, f"executor {name!r}: settings not documented: {undocumented}"
    if r.needs and not os.environ.get(r.needs):
        pytest.skip(f"executor {name!r} {r.reason}")
    # the demo suite: worker processes (a Ray worker, a job) know its tasks without this test's registrations
    contexts = plan(Sweep(methods=["linear"], suite="demo", tasks=["demo_digits"], protocol="vpt", seeds=[1],
                                  data_root=str(demo_root), backbone="demo-vit-random",
                                  **{"epochs": 1, "batch_size": 64, "lr": (0.1, 0.2), "wd": (0.0,)}))
    store = RunStore(tmp_path / "runs")
    env = Env(quiet=True)
    ex = plugin.make(dict(r.settings), env=env, runs_dir=tmp_path / "runs", total=len(count_runs(contexts)))
    try:
        outcomes = drive(contexts, ex, store)
        assert outcomes[0].error is None and [str(x.status) for x in outcomes[0].records] == ["ok"]
        recs = {rec.key: rec for _, rec, _ in store.iter_records()}
        assert len(recs) == 3 and all(str(x.status) == "ok" and x.attempts == 1 for x in recs.values())
        specs = count_runs(contexts)
        again = ex.run(specs, store)  # every run done: records back in order, nothing trained again
        assert [x.key for x in again] == [s.key for s in specs]
        assert all(store.load(s).attempts == 1 for s in specs)
    finally:
        close = getattr(ex, "close", None)
        if close is not None:
            close()


# ---------------------------------------------------------------------------------------------
# trackers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", builtin(TRACKERS))
def test_a_tracker_follows_a_real_run_and_writes_where_it_says(name, data_root, tmp_path, monkeypatch):
    from peftbench.executors.local import LocalExecutor
    from peftbench.trackers import Tracking, check_tracking, hooks_for
    from peftbench.train.env import Env

    r = row("tracker", table.TRACKERS, name)
    tracker = TRACKERS.get(name)
    doc = (ROOT / "docs" / "trackers.md").read_text(encoding="utf-8")
    assert name in doc and all(f"`{k}`" in doc for k in tracker.options), f"docs/trackers.md: {name} or its settings"
    if tracker.requires:
        pytest.importorskip(tracker.requires)
    for k, v in r.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    options = {k: v.format(tmp=tmp_path) for k, v in r.options.items()}
    tracking = check_tracking(Tracking([name], "conformance", str(runs), {name: options}))
    contexts = linear(data_root)
    env = Env(quiet=True, tracking=tracking.to_dict(), hooks=hooks_for(tracking))
    drive(contexts, LocalExecutor(env, len(count_runs(contexts))), RunStore(runs))
    assert [str(rec.status) for _, rec, _ in RunStore(runs).iter_records()] == ["ok"]
    assert list(runs.glob(r.writes)), f"tracker {name!r} wrote nothing matching {r.writes} under {runs}"


# ---------------------------------------------------------------------------------------------
# layouts and protocols
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", builtin(LAYOUTS))
def test_a_task_in_each_layout_reads_every_split_and_verifies(name, tmp_path):
    from peftbench.data.splits import read_split
    from peftbench.data.verify import verify_task
    from peftbench.tasks import get_task, task_splits

    r = row("layout", table.LAYOUTS, name)
    task = get_task(r.write(tmp_path))
    assert task.layout == name
    for split in sorted(task_splits(task)):
        assert len(read_split(task, tmp_path, split)) > 0, split
    report = verify_task(task, tmp_path)
    assert report.ok, report
    assert f"`{name}`" in (ROOT / "docs" / "data.md").read_text(encoding="utf-8"), f"docs/data.md: layout {name}"


@pytest.mark.parametrize("name", builtin(PROTOCOLS))
def test_a_protocol_plans_its_stages_with_one_final_run_per_seed(name, data_root):
    r = row("protocol", table.PROTOCOLS, name)
    card = str(Path(__file__).with_name(r.card.split("/")[0]) / r.card.split("/", 1)[1]) if r.card else None
    specs = count_runs(linear(data_root, name, lrs=(0.1, 0.2), card=card))
    assert tuple(s.stage for s in specs) == r.stages
    finals = [s for s in specs if s.stage == "final"]
    assert len(finals) == 1 and finals[0].seed == 1 and finals[0].eval_split == "test"
    assert all(s.protocol == name for s in specs)
    doc = (ROOT / "docs" / "protocols.md").read_text(encoding="utf-8")
    assert f"`{name}`" in doc and PROTOCOLS.get(name).description
