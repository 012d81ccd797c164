"""A method from a package outside peftbench, found through its ``peftbench.methods`` entry point.

The package is written into tmp_path as an installed distribution would leave it on sys.path (a
module + ``<name>-<version>.dist-info/`` with METADATA and entry_points.txt), put on PYTHONPATH, and
the real CLI runs it in a subprocess: no change to peftbench, no pip install.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

METHOD = "plugin-lntune"

PLUGIN_SOURCE = '''
"""LayerNorm tuning: every LayerNorm weight and bias of the backbone + the head."""
from torch import nn

from peftbench.methods import FULL_FT_RECIPE, Method, Option, TunedViT


class LayerNormTuning(Method):
    name = "plugin-lntune"
    description = "LayerNorm tuning (external plugin): LayerNorm weights and biases + head"
    recipe = FULL_FT_RECIPE
    options = {"final_norm": Option(True, "also train the final LayerNorm")}

    def build(self, backbone, num_classes, opts):
        model = TunedViT(backbone, num_classes)  # freezes the backbone, adds the head
        for name, module in backbone.named_modules():
            if isinstance(module, nn.LayerNorm) and (opts["final_norm"] or name != "norm"):
                for p in module.parameters():
                    p.requires_grad = True
        return model
'''


def _write_package(site: Path) -> None:
    site.mkdir(parents=True, exist_ok=True)
    (site / "pb_plugin_demo.py").write_text(PLUGIN_SOURCE)
    info = site / "pb_plugin_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pb-plugin-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[peftbench.methods]\n{METHOD} = pb_plugin_demo:LayerNormTuning\n")


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("peftbench")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "peftbench"]


@pytest.fixture
def plugin_env(tmp_path):
    site = tmp_path / "site"
    _write_package(site)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["HF_HUB_OFFLINE"] = "1"
    env["PEFTBENCH_CACHE"] = str(tmp_path / "cache")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


@pytest.mark.slow
def test_external_method_is_listed(plugin_env):
    out = subprocess.run(_cli() + ["list", "methods"], env=plugin_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    line = next((ln for ln in out.stdout.splitlines() if ln.split() and ln.split()[0] == METHOD), None)
    assert line is not None, out.stdout
    assert "external plugin" in line


@pytest.mark.slow
def test_external_method_runs_on_the_demo_suite(plugin_env, tmp_path, demo_root):
    runs, data = tmp_path / "runs", demo_root  # demo_root: a session-wide tmp data root (conftest)
    cmd = _cli() + ["run", "--methods", METHOD, "--suite", "demo", "--tasks", "demo_digits", "--epochs", "1",
                    "--backbone", "demo-vit-random", "--data-root", str(data), "--runs-dir", str(runs), "--quiet"]
    out = subprocess.run(cmd, env=plugin_env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    records = sorted((runs / METHOD / "demo_digits").glob("*.json"))
    assert records, f"no run record under {runs}: {out.stdout}{out.stderr}"
    record = json.loads(records[0].read_text())
    assert record["status"] == "ok", record.get("error")
    assert record["spec"]["method"] == METHOD
    assert record["metrics"]["top1"] is not None
    # 6 blocks x 2 LayerNorms + final norm, weight and bias each, width 96; head 97 x 10
    assert record["params"]["trainable_without_head"] == (6 * 2 + 1) * 2 * 96
    assert record["params"]["head"] == 97 * 10


# ---------------------------------------------------------------------------------------------
# the other extension points: a suite on a new on-disk layout, an executor and a leaderboard column,
# each one file of an outside package, found through its entry-point group
# ---------------------------------------------------------------------------------------------

MORE_SOURCE = '''
"""A CSV split layout, a suite that uses it, an executor and a leaderboard column."""
import csv
from pathlib import Path

from peftbench.data.layouts import Layout
from peftbench.executors import ExecutorPlugin
from peftbench.results.columns import Column
from peftbench.tasks import Suite, Task


class CsvLayout(Layout):
    name = "csv-list"
    description = "<split>.csv files with path,label rows"

    def split_file(self, task, task_dir, split):
        return Path(task_dir) / f"{split}.csv"

    def entries(self, task, task_dir, split):
        f = self.check_folder(task, task_dir, split)
        out, defects = [], []
        with open(f, newline="") as fh:
            for i, row in enumerate(csv.DictReader(fh), 2):
                label = int(row["label"])
                if 0 <= label < task.num_classes:
                    out.append((f"{f}:{i}", row["path"], label))
                else:
                    defects.append(f"{f}:{i}: label {label} out of range")
        return out, defects


TASKS = [
    Task(name="plugin_colours", suite="plugin-suite", num_classes=3, description="colour squares (CSV layout)",
         layout="csv-list", split_sizes={}),
    Suite(name="plugin-suite", description="a suite from a plugin", tasks=("plugin_colours",), protocol="demo",
          backbone="demo-vit-random", folder="plugin-suite"),
]


class InlineExecutor:
    def __init__(self, env):
        self.env = env

    def run(self, specs, store):
        from peftbench.train.engine import execute

        out = []
        for spec in specs:
            rec = execute(spec, store, self.env)
            rec.extra["plugin_executor"] = "inline"
            store.write(spec, rec)
            out.append(rec)
        return out

    def close(self):
        pass


class Inline(ExecutorPlugin):
    name = "plugin-inline"
    description = "runs every run inline and marks its record"

    def make(self, settings, *, env, runs_dir, total):
        return InlineExecutor(env)


FINAL_RUNS = Column("final_runs", "final runs counted in the row, every task (a plugin column)",
                    lambda r, b: str(sum(r.seeds.values())), after="seeds_max")
'''

MORE_ENTRY_POINTS = """[peftbench.layouts]
csv-list = pb_plugin_more:CsvLayout
[peftbench.tasks]
plugin-suite = pb_plugin_more:TASKS
[peftbench.executors]
plugin-inline = pb_plugin_more:Inline
[peftbench.columns]
final-runs = pb_plugin_more:FINAL_RUNS
"""


def _write_more(site: Path, data: Path) -> None:
    import numpy as np
    from PIL import Image

    (site / "pb_plugin_more.py").write_text(MORE_SOURCE)
    info = site / "pb_plugin_more-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pb-plugin-more\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(MORE_ENTRY_POINTS)
    task_dir = data / "plugin-suite" / "plugin_colours"
    rng = np.random.default_rng(0)
    for split, n in (("train800", 24), ("val200", 6), ("test", 9)):
        rows = ["path,label"]
        for i in range(n):
            img = rng.integers(0, 50, size=(32, 32, 3), dtype=np.uint8)
            img[8:24, 8:24, i % 3] = 230
            rel = f"img/{split}-{i}.png"
            (task_dir / "img").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(task_dir / rel)
            rows.append(f"{rel},{i % 3}")
        (task_dir / f"{split}.csv").write_text("\n".join(rows) + "\n")
    both = (task_dir / "train800.csv").read_text().splitlines() + (task_dir / "val200.csv").read_text().splitlines()[1:]
    (task_dir / "train800val200.csv").write_text("\n".join(both) + "\n")


@pytest.mark.slow
def test_external_layout_suite_executor_and_column(plugin_env, tmp_path):
    site = Path(plugin_env["PYTHONPATH"].split(os.pathsep)[0])
    data, runs = tmp_path / "data", tmp_path / "runs"
    _write_more(site, data)
    listed = subprocess.run(_cli() + ["list", "suites"], env=plugin_env, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0 and "plugin-suite" in listed.stdout, listed.stderr
    cmd = _cli() + ["run", "--methods", "linear", "--suite", "plugin-suite", "--executor", "plugin-inline",
                    "--data-root", str(data), "--runs-dir", str(runs), "--epochs", "2", "--quiet"]
    out = subprocess.run(cmd, env=plugin_env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    (record,) = [json.loads(p.read_text()) for p in (runs / "linear" / "plugin_colours").glob("*.json")]
    assert record["status"] == "ok" and record["plugin_executor"] == "inline"  # the plugin executor ran it
    assert record["num_train"] == 30 and record["num_eval"] == 9  # read through the CSV layout
    board = (runs / "leaderboard" / "plugin-suite-leaderboard.csv").read_text().splitlines()
    header, row = board[0].split(","), board[1].split(",")
    assert header[header.index("seeds_max") + 1] == "final_runs"  # the plugin column, where it asked to be
    assert row[header.index("final_runs")] == "1"


# ---------------------------------------------------------------------------------------------
# plugins that misbehave: a name clash with a built-in (also through an alias in another case), an
# entry point that fails to import. Other commands keep working; using the name is a clear error.
# ---------------------------------------------------------------------------------------------

BAD_SOURCE = '''
from peftbench.methods import LINEAR_RECIPE, Method, TunedViT


class MyLora(Method):
    name = "lora"  # the built-in's name
    description = "a second lora"
    recipe = LINEAR_RECIPE

    def build(self, backbone, num_classes, opts):
        return TunedViT(backbone, num_classes)


class Shadow(Method):
    name = "shadow-probe"
    aliases = ("BITFIT",)  # a built-in's name in another case
    description = "an alias clash"
    recipe = LINEAR_RECIPE

    def build(self, backbone, num_classes, opts):
        return TunedViT(backbone, num_classes)
'''


@pytest.fixture
def bad_env(plugin_env):
    site = Path(plugin_env["PYTHONPATH"].split(os.pathsep)[0])
    (site / "pb_plugin_bad.py").write_text(BAD_SOURCE)
    (site / "pb_plugin_broken.py").write_text("import a_module_that_does_not_exist\n")
    info = site / "pb_plugin_bad-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pb-plugin-bad\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[peftbench.methods]\nlora = pb_plugin_bad:MyLora\n"
                                           "shadow-probe = pb_plugin_bad:Shadow\nbroken = pb_plugin_broken\n")
    return plugin_env


def _run_cli(env, *args):
    return subprocess.run(_cli() + list(args), env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_misbehaving_plugins_do_not_break_other_commands(bad_env):
    out = _run_cli(bad_env, "list", "methods")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "method 'lora' from entry point 'lora' (pb_plugin_bad:MyLora) of package pb-plugin-bad clashes with " \
           "method 'lora' from module peftbench.methods.peft_tuners" in out.stderr
    assert "'BITFIT' (an alias of 'shadow-probe')" in out.stderr and "peftbench.methods.bitfit" in out.stderr
    assert "entry point 'broken' (pb_plugin_broken) of package pb-plugin-bad failed to load: ModuleNotFoundError" \
           in out.stderr
    assert METHOD in out.stdout and "vpt-deep" in out.stdout  # the well-behaved plugin and the built-ins


@pytest.mark.slow
def test_using_a_clashing_or_broken_plugin_is_a_clear_error(bad_env, tmp_path):
    for name, needle in (("lora", "clashes with method 'lora' from module peftbench.methods.peft_tuners"),
                         ("bitfit", "'BITFIT' (an alias of 'shadow-probe')"),
                         ("broken", "method 'broken' is not available: entry point 'broken'")):
        out = _run_cli(bad_env, "params", "--method", name, "--num-classes", "10")
        assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr, out.stderr
    ok = _run_cli(bad_env, "params", "--method", "vpt-deep", "--num-classes", "10")
    assert ok.returncode == 0, ok.stderr
