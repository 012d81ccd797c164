"""--workers / --devices: worker processes share the run store through the run leases; one progress view;
a worker that dies is replaced and its run resumes from its checkpoint."""
import functools
import os
import threading
import time

import pytest
from helpers import TINY_BACKBONE, ensure_registered, make_data_root

from peftbench.api.schema import Sweep
from peftbench.cli import main
from peftbench.executors.local import LocalExecutor
from peftbench.store import RunStore
from peftbench.sweep.drive import count_runs, drive
from peftbench.sweep.plan import plan
from peftbench.train.engine import Env
from peftbench.train.loop import OnEpoch


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("toydata"))


def setup_worker(env):  # runs in each spawned worker: the test suite's tasks and backbone are registered in-process
    ensure_registered()


def _wait_for(path, timeout=120.0):
    deadline = time.time() + timeout
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.05)


def kill_once(marker, env):
    """Worker set-up whose worker kills itself after epoch 0 of seed 2, the first time only, while seed 1 is
    being trained by the other worker (seed 1 waits after its epoch 0 until seed 2's worker is dead)."""
    ensure_registered()

    def maybe_die(spec, epoch):
        if spec.seed == 1 and epoch == 0 and not os.path.exists(marker + ".1"):
            open(marker + ".1", "w").close()
            _wait_for(marker)  # still in flight when the other worker dies
            time.sleep(4.0)  # long enough for a shared pool to notice the death and break
        if spec.seed == 2 and epoch == 0 and not os.path.exists(marker):
            _wait_for(marker + ".1")
            open(marker, "w").close()
            os._exit(3)  # like the OOM killer: no exception, no cleanup

    env.hooks.append(OnEpoch(lambda s, e: maybe_die(s, e['epoch'])))


def contexts(data_root, seeds=(1, 2), tasks=("toy", "toy_b")):
    return plan(Sweep(methods=["vpt-shallow"], suite="testsuite", tasks=list(tasks), data_root=str(data_root),
                              backbone=TINY_BACKBONE, protocol="fixed", seeds=list(seeds),
                              **{"epochs": 3, "batch_size": 16}))


def records(runs):
    return [r for _, r, _ in RunStore(runs).iter_records()]


@pytest.mark.slow
def test_two_workers_finish_a_sweep_and_train_each_run_once(data_root, tmp_path, capfd):
    ctx = contexts(data_root)
    ex = LocalExecutor(Env(), total=len(count_runs(ctx)), workers=2, initializer=setup_worker)
    try:
        outcomes = drive(ctx, ex, RunStore(tmp_path / "runs"))
    finally:
        ex.close()
    assert not any(o.error for o in outcomes)
    recs = records(tmp_path / "runs")
    assert len(recs) == 4 and all(r.status == "ok" and r.attempts == 1 for r in recs)
    assert ex.trained == 4
    err = capfd.readouterr().err
    assert "[local] 2 workers on cpu" in err
    assert err.count(": ok top1") == 4  # the driver's view: one line per finished run
    assert "[w1 cpu]" in err or "[w2 cpu]" in err  # the workers' epoch lines, through the driver
    # the same sweep again trains nothing
    ex = LocalExecutor(Env(quiet=True), workers=2, initializer=setup_worker)
    try:
        drive(ctx, ex, RunStore(tmp_path / "runs"))
    finally:
        ex.close()
    assert ex.trained == 0


@pytest.mark.slow
def test_two_drivers_with_two_workers_each_train_each_run_once(data_root, tmp_path):
    ctx = contexts(data_root, seeds=(1, 2, 3), tasks=("toy",))
    executors = [LocalExecutor(Env(quiet=True), workers=2, initializer=setup_worker) for _ in range(2)]
    errors = []

    def go(ex):
        try:
            drive(ctx, ex, RunStore(tmp_path / "runs"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            ex.close()

    threads = [threading.Thread(target=go, args=(ex,)) for ex in executors]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not errors
    recs = records(tmp_path / "runs")
    assert len(recs) == 3 and all(r.status == "ok" and r.attempts == 1 for r in recs)
    assert sum(ex.trained for ex in executors) == 3


@pytest.mark.slow
def test_a_dead_worker_is_replaced_and_its_run_resumes(data_root, tmp_path, capfd):
    ctx = contexts(data_root, tasks=("toy",))
    ex = LocalExecutor(Env(), workers=2, initializer=functools.partial(kill_once, str(tmp_path / "died")))
    try:
        outcomes = drive(ctx, ex, RunStore(tmp_path / "runs"))
    finally:
        ex.close()
    assert not any(o.error for o in outcomes)
    assert (tmp_path / "died").exists()
    recs = {r.spec["seed"]: r for r in records(tmp_path / "runs")}
    assert all(r.status == "ok" for r in recs.values())
    assert recs[2].attempts == 2
    assert recs[1].attempts == 1  # the other worker's run went on: one death touches one run
    err = capfd.readouterr().err
    assert "a worker process died (w" in err and "resuming" in err


@pytest.mark.parametrize("flags, needle", [
    (["--workers", "0"], "--workers: 0 is below its minimum 1"),
    (["--devices", "cuda:0,cuda:1"], "no CUDA device"),
    (["--device", "cpu", "--devices", "cpu,cpu"], "give one of them"),
    (["--executor", "slurm", "--devices", "cpu,cpu"], "--devices (executor setting 'devices'): executor 'slurm' does not "
                                                      "take it"),
])
def test_bad_worker_flags_are_refused_before_compute(data_root, tmp_path, capsys, flags, needle):
    ensure_registered()
    assert main(["run", "--methods", "linear", "--suite", "testsuite", "--tasks", "toy", "--data-root", str(data_root),
                 "--backbone", TINY_BACKBONE, "--runs-dir", str(tmp_path / "runs"), *flags]) == 2
    assert needle in capsys.readouterr().err
    assert not list((tmp_path / "runs").rglob("*.json"))


@pytest.mark.slow
def test_workers_with_the_sweep_progress_view_and_trackers(data_root, tmp_path):
    """What `peftbench run --workers N` hands its workers: an Env with the sweep's progress view (which stays
    in the driver: it holds a stream) and its trackers (plain data: each worker makes its own hooks)."""
    import glob
    import io

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from peftbench.sweep.progress import SweepProgress
    from peftbench.trackers import Tracking, check_tracking, hooks_for

    runs = tmp_path / "runs"
    ctx = contexts(data_root)
    specs = count_runs(ctx)
    stream = io.StringIO()
    progress = SweepProgress(specs, stream=stream, mode="lines")
    tracking = check_tracking(Tracking(["tensorboard"], "with-workers", str(runs)))
    env = Env(progress=progress, tracking=tracking.to_dict(), hooks=hooks_for(tracking))
    ex = LocalExecutor(env, total=len(specs), workers=2, initializer=setup_worker)
    try:
        drive(ctx, ex, RunStore(runs))
    finally:
        ex.close()
    recs = records(runs)
    assert len(recs) == 4 and all(r.status == "ok" for r in recs)
    assert progress.done == 4 and stream.getvalue().count(": ok top1") == 4
    for rec in recs:
        (folder,) = glob.glob(str(runs / "tensorboard" / "with-workers" / "vpt-shallow" / rec.spec["task"] / f"*-{rec.key}"))
        acc = EventAccumulator(folder)
        acc.Reload()
        assert len(acc.Scalars("train/loss")) == 3
