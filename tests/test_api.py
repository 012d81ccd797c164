"""The Python API (docs/api.md): import peftbench stays light; plan and run a sweep from Python; the run
store as a DataFrame (stale and failed runs flagged); a leaderboard from a (filtered) DataFrame; a
method's model for one's own training loop."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import TINY_BACKBONE, make_data_root

import peftbench as pb


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("toydata"))


def test_import_peftbench_and_help_do_not_import_torch():
    code = ("import sys, peftbench\n"
            "assert callable(peftbench.run_sweep) and peftbench.Sweep and peftbench.load_runs\n"
            "from peftbench.cli import main\n"
            "for argv in (['--help'], ['run', '--help'], ['list', 'trackers'], ['list', 'executors']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "heavy = [m for m in ('torch', 'timm', 'pandas', 'ray', 'mlflow', 'wandb', 'tensorboard') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-500:]
    assert set(pb.__all__) >= {"Sweep", "plan_sweep", "run_sweep", "load_runs", "leaderboard", "build_model"}
    with pytest.raises(AttributeError):
        pb.no_such_name  # noqa: B018


def _sweep(data_root, runs, **kw):
    base = dict(methods=["linear", "bitfit"], suite="testsuite", tasks=["toy"], protocol="fixed", seeds=[1, 2],
                backbone=TINY_BACKBONE, data_root=str(data_root), runs_dir=str(runs), device="cpu",
                search={"epochs": 2, "batch_size": 16, "lr": [0.05], "wd": [0.0]})
    base.update(kw)
    return pb.Sweep(**base)


def test_plan_run_load_and_leaderboard_from_python(data_root, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    plan = pb.plan_sweep(_sweep(data_root, runs))
    assert len(plan.runs) == 4 and not plan.done and not runs.exists()  # planning writes nothing
    table = plan.table()
    assert list(table["method"]).count("bitfit") == 2 and set(table["seed"]) == {1, 2} and not table["done"].any()
    assert plan.sweep.protocol == "fixed" and plan.sweep.seeds == [1, 2] and plan.sweep.name.startswith("testsuite-")

    # one run fails (its method raises inside training): the sweep goes on, the run is flagged
    from peftbench.train import engine

    real = engine.train

    def train(spec, *a, **k):
        if spec.method == "bitfit" and spec.seed == 2:
            raise RuntimeError("planted failure")
        return real(spec, *a, **k)

    monkeypatch.setattr(engine, "train", train)
    result = pb.run_sweep(plan, quiet=True)
    assert result.failed == 1 and not result.ok
    assert result.sweep_file.is_file() and result.leaderboard.is_file()
    summary = result.summary()
    assert set(summary["config"]) == {"linear", "bitfit"} and len(summary) == 2

    df = pb.load_runs(runs)
    assert len(df) == 4 and df.attrs["runs_dir"] == str(runs.resolve())
    assert {"key", "method", "task", "stage", "seed", "status", "top1", "stale", "failed", "path", "spec.hparams.lr",
            "params.trainable", "metrics.top1", "timing.train_images_per_s", "provenance.torch"} <= set(df.columns)
    ok = df[df.status == "ok"]
    assert len(ok) == 3 and (ok["top1"] == ok["metrics.top1"]).all() and not ok["failed"].any()
    assert (ok["spec.hparams.lr"] == 0.05).all() and ok["history"].map(len).eq(2).all()
    bad = df[df.failed]
    assert len(bad) == 1 and bad.iloc[0]["method"] == "bitfit" and "planted failure" in bad.iloc[0]["error"]
    assert len(result.runs()) == 4
    st = pb.status(runs, query=False)  # what `peftbench status` shows
    assert sorted(st["status"]) == ["done", "done", "done", "failed"] and st.attrs["driver"] is None

    # a record produced by other code than the installed one is flagged stale
    path = runs / ok.iloc[0]["path"]
    rec = json.loads(path.read_text())
    rec["code"]["method"] = "0" * 16  # as other code would have written it (through the store: its digest matches)
    from peftbench.store import RunSpec, RunStore
    RunStore(runs).write(RunSpec.from_dict(rec["spec"]), rec)
    df = pb.load_runs(runs, warn=lambda m: None)
    assert df.set_index("key").loc[rec["key"], "stale"] == True  # noqa: E712
    assert df["stale"].sum() == 1

    board = pb.leaderboard(df)
    mine = board[board.source == "reproduced"]
    assert set(mine["config"]) == {"linear", "bitfit"}
    lin = mine.set_index("config").loc["linear"]
    assert lin["toy"] == pytest.approx(df[(df.method == "linear")]["top1"].mean(), abs=1e-3)
    assert mine.set_index("config").loc["bitfit", "failed_runs"] == 1
    only = pb.leaderboard(df[df.method == "linear"])  # a filtered DataFrame: only its runs count
    assert list(only[only.source == "reproduced"]["config"]) == ["linear"]
    assert pb.leaderboard(runs, suite="testsuite").shape == board.shape


def test_run_sweep_skips_done_runs_and_dry_run_plans(data_root, tmp_path):
    runs = tmp_path / "runs"
    sweep = _sweep(data_root, runs, methods=["linear"], seeds=[1])

    class Recorder:  # a run hook of this process (peftbench.train.loop.RunHooks)
        events: list = []

        def run_start(self, spec, info):
            self.events.append(("start", info["attempt"]))

        def epoch(self, spec, entry):
            self.events.append(("epoch", entry["epoch"]))

        def run_end(self, spec, record):
            self.events.append(("end", str(record.status)))

    assert pb.run_sweep(sweep, quiet=True, hooks=[Recorder()]).ok
    assert Recorder.events == [("start", 1), ("epoch", 0), ("epoch", 1), ("end", "ok")]
    again = pb.plan_sweep(sweep)
    assert again.done == {s.key for s in again.runs}
    dry = pb.run_sweep(sweep.replace(seeds=[1, 7]), dry_run=True)
    assert isinstance(dry, pb.Plan) and len(dry.runs) == 2 and len(dry.done) == 1


def test_build_model_for_your_own_loop():
    model = pb.build_model("vpt-deep", num_classes=5, backbone=TINY_BACKBONE, options={"prompt_tokens": 3},
                           pretrained=False, seed=0)
    counts = model.parameter_counts()
    depth, width = 3, 48  # the tiny preset: 3 blocks of width 48
    assert counts["trainable"] == 3 * depth * width + (width * 5 + 5)  # prompts of every block + the head
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("head", "prompt")) or "prompt" in n for n in trainable), trainable
    frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits = model(x)
    assert logits.shape == (4, 5)
    torch.nn.functional.cross_entropy(logits, y).backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.backbone.named_parameters())  # the backbone is frozen
    from peftbench.errors import SettingsError

    with pytest.raises(SettingsError, match="has no option 'prompt_tokenz'"):
        pb.build_model("vpt-deep", num_classes=5, backbone=TINY_BACKBONE, options={"prompt_tokenz": 3}, pretrained=False)
