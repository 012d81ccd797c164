"""A sweep's progress: the ETA from run sizes (not from the first run alone), a bench table as its prior,
a live bar on a terminal, plain lines in a file, --quiet / --verbose; end to end through
`peftbench run`."""
from __future__ import annotations

import io

import pytest
from helpers import TINY_BACKBONE, make_data_root

from peftbench.store import RunSpec
from peftbench.sweep.progress import EVAL_COST, PRIOR_RUNS, Eta, SweepProgress, run_size


def spec(method: str, task: str = "demo_digits", epochs: int = 10, seed: int = 42, stage: str = "final") -> RunSpec:
    return RunSpec(method=method, task=task, suite="demo", protocol="demo", stage=stage, train_split="train800val200",
                   eval_split="test", hparams={"lr": 0.1, "epochs": epochs, "batch_size": 64}, seed=seed,
                   backbone="demo-vit", config=method)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_run_size_weighs_cached_heads_and_epochs():
    from peftbench.tasks import get_task

    n_test = get_task("demo_digits").split_sizes["test"]
    assert run_size(spec("lora", epochs=10)) == pytest.approx(10 * 1000 + n_test * EVAL_COST)
    assert run_size(spec("linear", epochs=100)) == pytest.approx((1000 + n_test) * EVAL_COST)  # cached features
    assert run_size(spec("lora", epochs=20)) > 1.9 * run_size(spec("lora", epochs=10))


def test_first_eta_weighs_runs_by_size():
    """A short first run (2 epochs) before runs of 20 epochs: the old estimate (first run's time × runs left)
    is 10x too low; the sized one is exact."""
    specs = [spec("lora", epochs=2)] + [spec("lora", task=t, seed=s, epochs=20) for t in ("demo_digits", "demo_animals")
                                         for s in (1, 2, 3, 4)]
    rate = 0.002
    eta = Eta.plan(specs)
    eta.start(specs[0])
    eta.finish(rate * run_size(specs[0]), ran=True, setup=0.0)
    truth = sum(rate * run_size(s) for s in specs[1:])
    assert eta.seconds_left() == pytest.approx(truth, rel=1e-9)
    old = rate * run_size(specs[0]) * (len(specs) - 1)
    assert truth / old > 8


def test_one_time_setup_of_the_first_run_is_left_out():
    """The first run also loads the backbone and decodes the images (80 s before its first epoch): the
    estimate after it is not inflated; once a second run shows a typical setup (1 s), that much of the
    first run's setup counts again."""
    specs = [spec("lora", seed=s) for s in range(1, 7)]
    size = run_size(specs[0])
    rate = 0.003
    eta = Eta.plan(specs)
    eta.start(specs[0])
    eta.finish(80.0 + 1.0 + rate * size, ran=True, setup=81.0)
    assert eta.seconds_left() == pytest.approx(5 * rate * size)  # typical setup unknown yet: all left out
    eta.start(specs[1])
    eta.finish(1.0 + rate * size, ran=True, setup=1.0)
    per_run = 1.0 + rate * size
    assert eta.seconds_left() == pytest.approx(4 * per_run)
    old = (81.0 + rate * size) * 5  # the first run's time × runs left
    assert old / (5 * per_run) > 2


def test_a_cached_first_run_makes_no_estimate_alone():
    """A linear probe first (features computed before its first epoch: setup and work cannot be told
    apart): no estimate until another run is measured, then that run's rate."""
    specs = [spec("linear", epochs=100)] + [spec("lora", seed=s) for s in (1, 2, 3)]
    eta = Eta.plan(specs)
    eta.start(specs[0])
    eta.finish(90.0, ran=True)  # 80 s of it one-time
    assert eta.seconds_left() is None
    eta.start(specs[1])
    eta.finish(0.002 * run_size(specs[1]), ran=True, setup=0.0)
    assert eta.seconds_left() == pytest.approx(2 * 0.002 * run_size(specs[2]))


def test_current_run_counts_by_its_finished_epochs():
    specs = [spec("lora", seed=s) for s in (1, 2, 3)]
    eta = Eta.plan(specs)
    assert eta.seconds_left() is None  # nothing measured yet, no table
    eta.start(specs[0])
    size = run_size(specs[0])
    eta.progress(0.1, 0.1 * size * 0.01)  # the first epoch: its setup is not known yet
    assert eta.seconds_left() is None
    eta.progress(0.5, 0.5 * size * 0.01, setup=0.0)  # half-way at 0.01 s per unit
    assert eta.seconds_left() == pytest.approx(0.01 * size * 2.5)


def test_bench_table_is_the_prior():
    specs = [spec("lora", seed=s) for s in (1, 2, 3, 4, 5)]
    est = {s.key: 30.0 for s in specs}
    eta = Eta.plan(specs, est)
    assert eta.seconds_left() == pytest.approx(150.0)  # before any run: the table
    eta.start(specs[0])
    eta.finish(60.0, ran=True, setup=0.0)  # twice the table's time
    weight = PRIOR_RUNS * 30.0
    rate = (60.0 + 1.0 * weight) / (30.0 + weight)
    assert eta.seconds_left() == pytest.approx(rate * 4 * 30.0)
    # a partial table (a spec without an estimate) falls back to image-count sizes
    eta = Eta.plan(specs, {specs[0].key: 30.0})
    assert eta.prior_rate is None


def test_skipped_runs_leave_the_plan_without_time():
    specs = [spec("lora", seed=s) for s in (1, 2, 3)]
    eta = Eta.plan(specs)
    eta.start(specs[0])
    eta.finish(5.0, ran=False)  # done already
    eta.start(specs[1])
    eta.finish(10.0, ran=True, setup=0.0)
    assert eta.seconds_left() == pytest.approx(10.0)


def _events(p: SweepProgress, specs, clock: Clock, epoch_s: float = 30.0):
    for s in specs:
        p.run_started(s)
        p.message(f"[run] {s.label()} resuming")
        for e in range(2):
            clock.t += epoch_s
            p.message(f"{s.label()} epoch {e + 1}/2 loss 0.1", detail=True)
            p.epoch(s, {"epoch": e})
        p.run_finished(s, ran=True)
        p.message(f"{p.prefix()} {s.label()}: ok")


def test_lines_in_a_file_no_carriage_returns():
    specs = [spec("lora", epochs=2, seed=s) for s in (1, 2, 3)]
    out, clock = io.StringIO(), Clock()
    p = SweepProgress(specs, stream=out, clock=clock, interval_s=50.0)
    assert p.mode == "lines"
    _events(p, specs, clock)
    p.close()
    text = out.getvalue()
    assert "\r" not in text and "epoch 1/2 loss" not in text  # epochs are details
    assert "[run 1/3, sweep left ~0:02:00] lora demo_digits final" in text  # after the first run: 2 more × 60 s
    assert "[run 3/3, sweep left ~0:00:00]" in text
    status = [x for x in text.splitlines() if x.startswith("peftbench: ")]
    assert status and "runs done" in status[0] and "elapsed" in status[0]  # a status line every 50 s


def test_verbose_and_quiet():
    specs = [spec("lora", epochs=2)]
    out, clock = io.StringIO(), Clock()
    p = SweepProgress(specs, stream=out, clock=clock, verbose=True)
    _events(p, specs, clock)
    assert "epoch 2/2 loss" in out.getvalue()
    out = io.StringIO()
    p = SweepProgress(specs, stream=out, clock=clock, mode="quiet")
    _events(p, specs, clock)
    assert out.getvalue() == ""


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_bar_on_a_terminal():
    specs = [spec("lora", epochs=2, seed=s) for s in (1, 2)]
    out, clock = Tty(), Clock()
    p = SweepProgress(specs, stream=out, clock=clock)
    assert p.mode == "bar"
    _events(p, specs, clock)
    p.close()
    text = out.getvalue()
    assert "\r" in text and "2/2 runs" in text and "sweep left" in text  # tqdm redraws one line
    assert "lora demo_digits final epoch 2/2" in text  # the bar names the run and its epoch
    assert "demo_digits final lr=0.1 wd=None seed=1: ok\n" in text  # messages are whole lines above the bar


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))
    return make_data_root(tmp_path / "data")


def _run(data_root, runs, *flags):
    from peftbench.cli import main

    return main(["run", "--methods", "linear,bitfit", "--suite", "testsuite", "--tasks", "toy", "--data-root",
                 str(data_root), "--backbone", TINY_BACKBONE, "--epochs", "2", "--num-seeds", "1", "--lr", "0.1",
                 "--wd", "0", "--runs-dir", str(runs), *flags])


def test_peftbench_run_progress_end_to_end(data_root, tmp_path, capsys):
    assert _run(data_root, tmp_path / "runs") == 0
    err = capsys.readouterr().err
    assert "\r" not in err  # stderr is not a terminal here: lines
    done = [x for x in err.splitlines() if x.startswith("[run ")]
    # the linear probe first: a head on cached features alone gives no estimate; after the last run, none left
    assert len(done) == 2 and done[0].startswith("[run 1/2, sweep left estimating] linear toy final")
    assert done[1].startswith("[run 2/2, sweep left ~0:00:00] bitfit toy final")
    assert " epoch 1/2 " not in err
    assert _run(data_root, tmp_path / "runs", "--verbose") == 0  # everything done: skips are details, shown now
    assert err.count("done already, skipped") == 0 and "done already, skipped" in capsys.readouterr().err
    assert _run(data_root, tmp_path / "runs2", "--quiet") == 0
    assert "[run " not in capsys.readouterr().err
    assert _run(data_root, tmp_path / "runs3", "--quiet", "--verbose") == 2


def test_the_bar_redraws_on_a_timer_between_events():
    """A long epoch froze the bar's elapsed time: it now redraws every tick_s seconds with no event at all."""
    import io
    import time as _time

    from peftbench.sweep.progress import SweepProgress

    out = io.StringIO()
    view = SweepProgress([], stream=out, mode="bar", tick_s=0.05)
    view.message("start")  # (creates nothing: the bar appears on the first refresh)
    view._refresh()
    before = out.getvalue().count("\r")
    _time.sleep(0.4)
    redraws = out.getvalue().count("\r") - before
    view.close()
    assert redraws >= 3 and view._ticker is None
    after = out.getvalue()
    _time.sleep(0.15)
    assert out.getvalue() == after  # closed: the ticker stopped


def test_progress_within_an_epoch(data_root, tmp_path, monkeypatch):
    """The loop's ``step`` events (at most one a second; here every step) move the bar within an epoch: it names the
    step, and the ETA counts the epoch's done fraction."""
    import peftbench.train.loop as loop
    from peftbench.train.loop import RunHooks

    specs = [spec("lora", epochs=2)]
    out, clock = Tty(), Clock()
    view = SweepProgress(specs, stream=out, clock=clock, tick_s=0)
    view.run_started(specs[0])
    clock.t += 3.0
    view.step(specs[0], {"epoch": 0, "step": 4, "steps": 16})
    assert "lora demo_digits final epoch 1/2 step 4/16" in out.getvalue()
    assert view.eta.current_frac == pytest.approx(4 / 16 / 2)
    view.close()

    seen: list[dict] = []

    class Steps(RunHooks):
        def step(self, spec, where):
            seen.append(dict(where))

    monkeypatch.setattr(loop, "STEP_EVENT_S", 0.0)
    import peftbench as pb

    sweep = pb.Sweep(methods=["bitfit"], suite="testsuite", tasks=["toy"], protocol="fixed", seeds=[1],
                     backbone=TINY_BACKBONE, data_root=str(data_root), runs_dir=str(tmp_path / "runs"), device="cpu",
                     search={"epochs": 2, "batch_size": 16, "lr": [0.05], "wd": [0.0]})
    assert pb.run_sweep(sweep, quiet=True, hooks=[Steps()]).ok
    steps = seen[0]["steps"]
    assert steps > 2 and [(w["epoch"], w["step"]) for w in seen] == [(e, s) for e in (0, 1) for s in range(1, steps)]
