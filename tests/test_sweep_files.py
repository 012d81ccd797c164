"""Sweep files (docs/sweep-files.md): ``peftbench run --config``; flags override the file; the resolved
sweep written beside the run store runs the same runs again; an unknown key or a bad value is an error
naming the file and the line, before any compute."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY_BACKBONE, make_data_root

from peftbench.api import load_sweep, plan_sweep
from peftbench.api.sweepfile import key_lines
from peftbench.cli import build_parser, main
from peftbench.cli.run import sweep_from_args
from peftbench.errors import PeftbenchError


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("toydata"))


def sweep_text(data_root) -> str:
    return f'''# a small sweep
methods = ["linear", "vpt"]          # aliases work (vpt is vpt-deep)
suite = "testsuite"
tasks = ["toy"]
protocol = "fixed"
seeds = [1, 2]
backbone = "{TINY_BACKBONE}"
data_root = "{data_root}"

[options.vpt-deep]
prompt_tokens = 2

[search]
epochs = 2
batch_size = 16
lr = 0.05
wd = [0.0]
'''


def test_run_from_a_sweep_file_and_again_from_the_resolved_one(data_root, tmp_path, capsys):
    f = tmp_path / "small.toml"
    f.write_text(sweep_text(data_root))
    runs = tmp_path / "runs"
    assert main(["run", "--config", str(f), "--runs-dir", str(runs), "--quiet"]) == 0
    records = sorted(runs.glob("*/*/*.json"))
    assert len(records) == 4  # 2 methods × 2 seeds
    resolved = runs / "sweeps" / "small.toml"
    assert resolved.is_file()
    text = resolved.read_text()
    assert "peftbench run --config" in text and 'methods = ["linear", "vpt-deep"]' in text
    again = load_sweep(resolved)
    assert again.runs_dir == str(runs.resolve()) and again.seeds == [1, 2] and again.options == {"vpt-deep": {"prompt_tokens": 2}}
    first = {s.key for s in plan_sweep(load_sweep(f).replace(runs_dir=str(runs))).runs}
    assert {s.key for s in plan_sweep(again).runs} == first == {p.stem for p in records}
    capsys.readouterr()
    assert main(["run", "--config", str(resolved), "--quiet"]) == 0  # exactly the same runs: all done
    assert "(4 done already)" in capsys.readouterr().err
    assert sorted(runs.glob("*/*/*.json")) == records


def test_command_line_flags_override_the_file(data_root, tmp_path):
    f = tmp_path / "small.toml"
    f.write_text(sweep_text(data_root))
    args = build_parser().parse_args(["run", "--config", str(f), "--methods", "linear", "--seeds", "7",
                                      "--epochs", "1", "--set", "linear.bias=false", "--runs-dir", str(tmp_path / "r")])
    sweep = sweep_from_args(args)
    assert sweep.methods == ["linear"] and sweep.seeds == [7] and sweep.epochs == 1
    assert sweep.batch_size == 16 and sweep.tasks == ["toy"]  # the file's values that no flag changed
    args = build_parser().parse_args(["run", "--config", str(f), "--methods", "linear", "--seeds", "7",
                                      "--epochs", "1", "--runs-dir", str(tmp_path / "r")])
    plan = plan_sweep(sweep_from_args(args), check_data=False)
    assert [(s.method, s.seed, s.hparams["epochs"]) for s in plan.runs] == [("linear", 7, 1)]


BAD = [
    ("methodz = ['linear']\n", 1, "unknown key 'methodz'"),
    ("methods = ['linear']\n\nseeds = ['a']\n", 3, "seeds: 'a' is not an integer"),
    ("methods = ['linaer']\n", 1, "Did you mean 'linear'"),
    ("methods = ['linear']\nprecision = 'fp8'\n", 2, "precision: 'fp8' is not one of fp32"),
    ("methods = ['linear']\n[search]\nepochs = 2\nlr = -1\n", 4, "lr: -1 is below its minimum 0"),
    ("methods = ['linear']\n[search]\nlearning_rate = 0.1\n", 3, "unknown key 'learning_rate' in \\[search\\]"),
    ("methods = ['vpt']\n[options.vpt-deep]\nprompt_tokenz = 3\n", 3, "method 'vpt-deep' has no option 'prompt_tokenz'"),
    ("methods = ['vpt']\n[options.vpt-deep]\n\nprompt_tokens = 'many'\n", 4, "cannot read 'many'"),
    ("methods = ['vpt']\n[options]\nrank = 4\n", 3, "none of the methods has an option 'rank'"),
    ("methods = ['linear']\n[executor]\nname = 'slurm'\n[executor.slurm]\npartitionn = 'gpu'\n", 5,
     "executor 'slurm' has no setting 'partitionn'"),
    ("methods = ['linear']\n[executor]\nname = 'locl'\n", 3, "Did you mean 'local'"),
    ("methods = ['linear']\n[tracking]\ntrackers = ['tensorbord']\n", 3, "Did you mean 'tensorboard'"),
    ("methods = ['linear']\n[tracking]\ntrackers = ['mlflow']\n[tracking.mlflow]\nurii = 'x'\n", 5,
     "tracker 'mlflow' has no setting 'urii'"),
    ("methods = ['linear'\n", 1, "not valid TOML"),
    ("methods = ['linear']\nsuite = \n", 2, "not valid TOML"),
]


@pytest.mark.parametrize("text,line,message", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_sweep_files_name_the_file_and_line(tmp_path, text, line, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(PeftbenchError, match=f"^{f}:{line}: .*{message}"):
        load_sweep(f)


def test_bad_executor_values_name_the_line_and_stop_the_cli(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text("methods = ['linear']\nsuite = 'demo'\n\n[executor.slurm]\ncpus_per_task = 8\ngpus_per_node = 'two'\n")
    assert main(["run", "--config", str(f), "--runs-dir", str(tmp_path / "runs"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"peftbench run: error: {f}:6: " in err and "gpus_per_node must be an integer" in err
    assert not (tmp_path / "runs").exists()


def test_key_lines_finds_dotted_inline_and_table_keys():
    text = ('a = 1\n[executor]\nname = "slurm"\nslurm.partition = "gpu"\n'
            'ray = { address = "auto", runtime_env = { pip = ["x"] } }\n'
            'notes = """\nfake = 1\n"""\n[tracking.wandb]\nproject = "p"\n')
    lines = key_lines(text)
    assert lines[("a",)] == 1 and lines[("executor",)] == 2 and lines[("executor", "name")] == 3
    assert lines[("executor", "slurm", "partition")] == 4
    assert lines[("executor", "ray", "address")] == 5 and lines[("executor", "ray", "runtime_env")] == 5
    assert ("executor", "fake") not in lines  # inside a multi-line string
    assert lines[("tracking", "wandb", "project")] == 10


@pytest.mark.parametrize("name", ["demo", "vtab-slurm", "kuberay"])
def test_the_shipped_example_sweep_files_read(name):
    from pathlib import Path

    sweep = load_sweep(Path(__file__).resolve().parents[1] / "scripts" / "sweeps" / f"{name}.toml")
    assert sweep.methods and sweep.name
    assert sweep.executor == {"demo": "local", "vtab-slurm": "slurm", "kuberay": "ray"}[name]


def test_halving_and_local_workers_from_a_sweep_file(data_root, tmp_path):
    """``[search] kind = "halving"`` plans the halving rungs the flag plans; ``[executor.local] workers``
    reaches the local executor; the flags override both; bad values name the file and line."""
    text = sweep_text(data_root).replace('lr = 0.05', 'lr = [0.01, 0.05, 0.2]') + \
        'kind = "halving"\nhalving_rungs = [0.5, 1]\nhalving_factor = 3\n\n[executor]\nname = "local"\n\n' \
        '[executor.local]\nworkers = 2\n'
    f = tmp_path / "halving.toml"
    f.write_text(text)
    plan = plan_sweep(load_sweep(f).replace(runs_dir=str(tmp_path / "runs")))
    assert plan.contexts[0].search.kind == "halving" and plan.contexts[0].search.rungs == (0.5, 1.0)
    assert plan.executor_settings == {"workers": 2}
    parser = build_parser()
    flag = sweep_from_args(parser.parse_args(["run", "--config", str(f), "--search", "grid", "--halving-rungs", "1"]))
    with pytest.raises(PeftbenchError, match="only apply with --search halving"):
        plan_sweep(flag.replace(runs_dir=str(tmp_path / "runs")))
    grid = sweep_from_args(parser.parse_args(["run", "--config", str(f), "--search", "grid"])).replace(
        search="grid", halving_rungs=None, halving_factor=None)
    assert plan_sweep(grid.replace(runs_dir=str(tmp_path / "runs"))).contexts[0].search.kind == "grid"
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("workers = 2", "workers = 0"))
    with pytest.raises(PeftbenchError, match=r"bad\.toml:\d+.*workers"):
        plan_sweep(load_sweep(bad).replace(runs_dir=str(tmp_path / "runs")))
    bad.write_text(text.replace('kind = "halving"', 'kind = "random"'))
    with pytest.raises(PeftbenchError, match=r"bad\.toml:\d+.*not one of grid, halving"):
        load_sweep(bad)


def test_the_docs_table_is_the_declaration():
    """docs/sweep-files.md lists every sweep field as the one declaration does (peftbench/sweep/schema.py): a
    field added there without its row here fails (regenerate it with peftbench.api.schema.markdown_table())."""
    from peftbench.api.schema import markdown_table

    text = (Path(__file__).resolve().parent.parent / "docs" / "sweep-files.md").read_text(encoding="utf-8")
    start = text.index("<!-- sweep-fields")
    body = text[text.index("\n", start) + 1:text.index("<!-- /sweep-fields -->")].strip()
    assert body == markdown_table()


def test_the_python_api_checks_every_value_from_the_same_declaration(tmp_path):
    """Sweep(...) refuses what the command line and the sweep file refuse, with a one-line error naming the
    argument (wrong types, a str split into letters, an empty task list, booleans given as strings, bounds)."""
    from peftbench import Sweep

    assert Sweep(methods="linear,vpt").methods == ["linear", "vpt-deep"]  # a comma-separated string, canonical
    for kwargs, needle in [
        (dict(tasks=5), "Sweep(tasks=...): 5 is not a list of names"),
        (dict(tasks=[]), "Sweep(tasks=...): an empty list"),
        (dict(seeds=["a"]), "Sweep(seeds=...): 'a' is not an integer"),
        (dict(num_seeds="2"), "Sweep(num_seeds=...): '2' is not an integer"),
        (dict(num_seeds=10**8), "above its maximum 1000"),
        (dict(epochs=10**12), "above its maximum"),
        (dict(batch_size=10**9), "above its maximum"),
        (dict(lr=[float("inf")]), "not a finite number"),
        (dict(lr=[float("nan")]), "not a finite number"),
        (dict(search=None), "Sweep(search=...): a value is required"),
        (dict(runs_dir=None), "Sweep(runs_dir=...): a value is required"),
        (dict(verify_data="no"), "Sweep(verify_data=...): 'no' is not true or false"),
        (dict(device=0), "Sweep(device=...): 0 is not a string"),
        (dict(methods=["linaer"]), "Did you mean 'linear'"),
        (dict(suite="vtabb"), "Did you mean 'vtab'"),
        (dict(search={"learning_rate": 1}), "unknown key"),
        (dict(seeds=[1], num_seeds=2), "give seeds or num_seeds"),
    ]:
        with pytest.raises(PeftbenchError) as exc:
            Sweep(**kwargs)
        assert needle in str(exc.value), (kwargs, str(exc.value))
        assert "\n" not in str(exc.value)
    with pytest.raises(PeftbenchError, match="expected a peftbench.Sweep"):
        from peftbench import plan_sweep

        plan_sweep({"methods": ["linear"]})
