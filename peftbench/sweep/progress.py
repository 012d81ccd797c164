"""A sweep's progress as people expect it: a live bar (tqdm) with the sweep's ETA on a terminal, plain
lines when the output is a file (one per finished run, and a status line every ``interval_s`` seconds,
never ``\\r`` segments), nothing with ``--quiet``, every epoch with ``--verbose``.

The ETA (:class:`Eta`) does not extrapolate from the first run alone: every planned run has a *size*,
its seconds from the bench table (``peftbench bench``) when one is given, else its work in images
(``epochs × train images + evaluations × eval images / 3``; a head on cached features: one forward
pass over its images), and the remaining time is the remaining size times the measured seconds per
unit of size, the current run counted by its finished epochs. With a bench table the table's rate is
the prior, worth two average runs, so the first measurements refine it rather than replace it. The
first run of a process also pays one-time costs (the backbone loaded, images decoded into the cache,
the process warmed up) before its first epoch: that setup, beyond a typical run's, is left out of
the rate (:meth:`Eta._measured`).
docs/results.md ("Progress and ETA") has the formula and the measurement.
"""
from __future__ import annotations

import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

from .._text import printable, terminal
from ..data.splits import split_size
from ..methods import get_method
from ..store import RunSpec
from ..tasks import get_task
from ..train.loop import fmt_s, uses_cached_features

EVAL_COST = 1 / 3  # an evaluated image (forward only) against a trained one (forward + backward)
PRIOR_RUNS = 2.0  # a bench table's rate counts as much as this many average runs
INTERVAL_S = 60.0  # lines mode: a status line at most this often
TICK_S = 1.0  # the bar's redraw period (seconds)


def run_size(spec: RunSpec, cache: dict | None = None) -> float | None:
    """The work of one run in image passes (None when its task or method is unknown here)."""
    cache = {} if cache is None else cache

    def n(split: str) -> int:
        key = (spec.task, split)
        if key not in cache:
            cache[key] = split_size(task, spec.data_root, split) or 0
        return cache[key]

    try:
        task = get_task(spec.task)
        method = get_method(spec.method)
    except Exception:  # noqa: BLE001 - a plugin that does not load only loses its estimate
        return None
    hp = spec.hparams or {}
    epochs = int(hp.get("epochs") or 1)
    if spec.job != "train":
        return float(n(spec.train_split))  # a job's pass over the training data (e.g. importance scores)
    if uses_cached_features(method, task):
        return (n(spec.train_split) + n(spec.eval_split)) * EVAL_COST
    every = int(hp.get("eval_every") or 0)
    evals = 1 + (epochs // every if every else 0)
    return float(epochs * n(spec.train_split) + evals * n(spec.eval_split) * EVAL_COST)


def separable_setup(spec: RunSpec) -> bool:
    """Whether the time before a run's first epoch is setup rather than its work: true for training
    through the backbone; a head on cached features computes its features there, a job has no epochs."""
    if spec.job != "train":
        return False
    try:
        return not uses_cached_features(get_method(spec.method), get_task(spec.task))
    except Exception:  # noqa: BLE001
        return False


def _slot(spec: RunSpec) -> tuple:
    """What identifies a planned run before its hyper-parameters are chosen (a later stage's learning rate
    comes from the search, so its key is not known when the sweep is planned)."""
    return (spec.config or spec.method, spec.task, spec.stage, spec.job, spec.train_split, spec.eval_split,
            int((spec.hparams or {}).get("epochs") or 0), spec.seed)


@dataclass
class Measured:
    """One run's measurement: its size, its seconds, and its setup seconds (the time before the first
    epoch beyond one epoch's, when :func:`separable_setup`; None when not known or not separable)."""

    size: float
    seconds: float
    setup: float | None = None
    separable: bool = True


@dataclass
class Eta:
    """Seconds left of a sweep from the sizes of its runs and the time the finished ones took."""

    sizes: dict[tuple, list[float]] = field(default_factory=dict)  # slot -> sizes of the planned runs left
    prior_rate: float | None = None  # seconds per size unit (1.0 when sizes are the bench table's seconds)
    prior_weight: float = 0.0  # in size units
    done: list[Measured] = field(default_factory=list)  # the runs trained here, in order
    current: Measured | None = None  # the run in progress (size: all of it; seconds so far)
    current_frac: float = 0.0

    @classmethod
    def plan(cls, specs: list[RunSpec], estimates: dict[str, float] | None = None) -> "Eta":
        """``estimates``: run key -> seconds (bench table); used only when it covers every training run."""
        train = [s for s in specs if s.job == "train"]
        estimates = estimates or {}
        use_table = bool(estimates) and all(s.key in estimates for s in train)
        cache: dict = {}
        eta = cls()
        raw: list[tuple[RunSpec, float | None]] = []
        for s in specs:
            size = estimates.get(s.key) if use_table else None
            if size is None:
                size = run_size(s, cache)
                if use_table and size is not None:
                    size = None  # mixed units: the job's size is unknown
            raw.append((s, size))
        known = [v for _, v in raw if v is not None]
        fill = statistics.fmean(known) if known else 1.0
        for s, v in raw:
            eta.sizes.setdefault(_slot(s), []).append(fill if v is None else v)
        if use_table:
            eta.prior_rate = 1.0
            eta.prior_weight = PRIOR_RUNS * fill
        return eta

    def take(self, spec: RunSpec) -> float:
        """Remove ``spec`` from the runs left; its planned size (the mean size when it was not planned)."""
        sizes = self.sizes.get(_slot(spec))
        if sizes:
            size = sizes.pop()
            if not sizes:
                del self.sizes[_slot(spec)]
            return size
        n = sum(len(v) for v in self.sizes.values())
        return self.size_left() / n if n else 1.0

    def put_back(self, spec: RunSpec) -> None:
        """The run in progress goes back among the runs left (deferred to another driver)."""
        if self.current is not None:
            self.sizes.setdefault(_slot(spec), []).append(self.current.size)
        self.current, self.current_frac = None, 0.0

    def size_left(self) -> float:
        return sum(sum(v) for v in self.sizes.values())

    def start(self, spec: RunSpec, separable: bool | None = None) -> None:
        sep = separable_setup(spec) if separable is None else separable
        self.current = Measured(self.take(spec), 0.0, None, sep)
        self.current_frac = 0.0

    def progress(self, frac: float, seconds: float, setup: float | None = None) -> None:
        """The run in progress: ``frac`` of its epochs done in ``seconds``, ``setup`` seconds of them setup."""
        if self.current is not None:
            self.current.seconds = seconds
            self.current.setup = setup if self.current.separable else None
            self.current_frac = min(max(frac, 0.0), 1.0)

    def finish(self, seconds: float, ran: bool, setup: float | None = None) -> None:
        """The run in progress ended (``ran`` False: it was done already, or another driver ran it)."""
        if self.current is not None and ran:
            cur = self.current
            self.done.append(Measured(cur.size, seconds, setup if cur.separable else None, cur.separable))
        self.current, self.current_frac = None, 0.0

    def skip(self, spec: RunSpec) -> None:
        self.take(spec)

    def _measured(self) -> list[Measured]:
        """What the rate comes from: the finished runs and the finished part of the current one, the first
        run's one-time setup removed (what it spent before its first epoch beyond a typical run's
        setup; all of it while no other run gives a typical one). A first run whose setup cannot be
        told from its work (a head on cached features, a job, a run of one epoch) is left out once
        another run is measured, and makes no estimate alone."""
        runs = list(self.done)
        cur = self.current
        if cur is not None and self.current_frac > 0:
            runs.append(Measured(cur.size * self.current_frac, cur.seconds, cur.setup, cur.separable))
        if not runs:
            return []
        first, rest = runs[0], runs[1:]
        setups = [r.setup for r in rest if r.setup is not None]
        typical = statistics.median(setups) if setups else 0.0
        if first.separable and first.setup is not None:
            first = Measured(first.size, max(0.0, first.seconds - max(0.0, first.setup - typical)), first.setup)
            return [first, *rest]
        if rest:
            return rest
        return [first] if self.prior_rate is not None else []  # alone and unsure: only beside a prior

    def rate(self) -> float | None:
        runs = self._measured()
        size = sum(r.size for r in runs)
        secs = sum(r.seconds for r in runs)
        if self.prior_rate is not None:
            return (secs + self.prior_rate * self.prior_weight) / (size + self.prior_weight)
        return secs / size if size > 0 else None

    def seconds_left(self) -> float | None:
        rate = self.rate()
        if rate is None:
            return None
        left = self.size_left()
        if self.current is not None:
            left += self.current.size * (1 - self.current_frac)
        return rate * left


class SweepProgress:
    """What a sweep shows while it runs. ``mode``: ``auto`` (a bar when ``stream`` is a terminal, else
    lines), ``bar``, ``lines`` or ``quiet``. Executors call :meth:`run_started` / :meth:`run_finished`;
    the engine's messages come through :meth:`message` (``detail``: per-epoch lines, shown with
    ``verbose`` only); it is a run hook (``Env.hooks``): :meth:`epoch` follows every epoch."""

    def __init__(self, planned: list[RunSpec], *, estimates: dict[str, float] | None = None,
                 stream: TextIO | None = None, mode: str = "auto", verbose: bool = False,
                 interval_s: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 tick_s: float = TICK_S):
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if _isatty(self.stream) else "lines"
        if mode not in ("bar", "lines", "quiet"):
            raise ValueError(f"progress mode {mode!r}: auto, bar, lines or quiet")
        self.mode = mode
        self.verbose = verbose
        self.interval_s = interval_s
        self.clock = clock
        self.total = len(planned)
        self.eta = Eta.plan(planned, estimates)
        self.done = 0
        self.t0 = clock()
        self.run_t0: float | None = None
        self.epoch_times: list[float] = []  # seconds since the run started, at its first two epochs' ends
        self.current: RunSpec | None = None
        self.epoch_text = ""
        self.last_line = self.t0
        self.bar = None
        self.tick_s = tick_s  # the bar redraws on this timer too (its elapsed time moves between epochs)
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # -- what executors call -------------------------------------------------------------------

    def run_started(self, spec: RunSpec) -> None:
        self.current, self.run_t0, self.epoch_text = spec, self.clock(), ""
        self.epoch_times = []
        self.eta.start(spec)
        self._refresh()

    def run_finished(self, spec: RunSpec, ran: bool = True) -> None:
        seconds = self.clock() - (self.run_t0 or self.clock())
        self.eta.finish(seconds, ran, self._setup())
        self.done += 1
        self.current, self.run_t0 = None, None
        if self.bar is not None:
            self.bar.update(1)
        self._refresh()

    def run_finished_elsewhere(self, spec: RunSpec, seconds: float, ran: bool = True) -> None:
        """A run that ended in another process (a worker, a fused group) in ``seconds`` of wall time this
        sweep spent on it; the view never saw it start."""
        self.run_started(spec)
        self.run_t0 = self.clock() - seconds
        self.run_finished(spec, ran)

    def run_deferred(self, spec: RunSpec) -> None:
        """The run was left to another driver for now: back among the runs left."""
        self.eta.put_back(spec)
        self.current, self.run_t0 = None, None
        self._refresh()

    def _setup(self) -> float | None:
        """The current run's time before its first epoch, less one epoch's (the second epoch's) time."""
        if len(self.epoch_times) < 2:
            return None
        first, second = self.epoch_times
        return max(0.0, first - (second - first))

    def epoch(self, spec: RunSpec, entry: dict) -> None:
        epochs = int((spec.hparams or {}).get("epochs") or 1)
        done = int(entry.get("epoch", 0)) + 1
        if self.run_t0 is not None:
            elapsed = self.clock() - self.run_t0
            if len(self.epoch_times) < 2:
                self.epoch_times.append(elapsed)
            self.eta.progress(done / epochs, elapsed, self._setup())
        self.epoch_text = f"epoch {done}/{epochs}"
        self._refresh()
        if self.mode == "lines" and self.clock() - self.last_line >= self.interval_s:
            self._say(self.status_line())

    def step(self, spec: RunSpec, where: dict) -> None:
        """Progress within an epoch (the loop's ``step`` event, at most once a second): the bar shows the step, and
        the sweep's ETA counts the epoch's done fraction."""
        epochs = int((spec.hparams or {}).get("epochs") or 1)
        epoch, done, steps = int(where.get("epoch", 0)), int(where.get("step", 0)), max(1, int(where.get("steps", 1)))
        if self.run_t0 is not None:
            self.eta.progress((epoch + done / steps) / epochs, self.clock() - self.run_t0, self._setup())
        self.epoch_text = f"epoch {epoch + 1}/{epochs} step {done}/{steps}"
        self._refresh()

    def message(self, text: str, detail: bool = False) -> None:
        if self.mode == "quiet" or (detail and not self.verbose):
            return
        self._say(text)

    # -- text ----------------------------------------------------------------------------------

    def left_text(self) -> str:
        left = self.eta.seconds_left()
        return "estimating" if left is None else f"~{fmt_s(left)}"

    def prefix(self) -> str:
        """``[run i/N, sweep left ~h:mm:ss]`` for the executor's lines (i = the run in progress)."""
        return f"[run {self.done + (1 if self.current else 0)}/{self.total}, sweep left {self.left_text()}]"

    def status_line(self) -> str:
        cur = ""
        if self.current is not None:
            cur = f"; now {self.current.label()}" + (f" {self.epoch_text}" if self.epoch_text else "")
        return (f"peftbench: {self.done}/{self.total} runs done, {fmt_s(self.clock() - self.t0)} elapsed, sweep left "
                f"{self.left_text()}{cur}")

    def _say(self, text: str) -> None:
        if self.mode == "quiet":
            return
        text = terminal(text)  # labels, configs and errors come from records: no control character reaches the terminal
        self.last_line = self.clock()
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _refresh(self) -> None:
        if self.mode != "bar":
            return
        with self._lock:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, initial=self.done, file=self.stream, unit="run", dynamic_ncols=True,
                                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} runs [{elapsed}{postfix}]", leave=True)
                self._start_ticker()
            what = ""
            if self.current is not None:
                what = f"{self.current.config or self.current.method} {self.current.task} {self.current.stage}"
                if self.epoch_text:
                    what += f" {self.epoch_text}"
            bar = self.bar
            assert bar is not None
            bar.set_description_str(printable(what) or "sweep", refresh=False)
            bar.set_postfix_str(f"sweep left {self.left_text()}", refresh=True)  # tqdm adds the ", "

    def _start_ticker(self) -> None:
        """A daemon thread that redraws the bar every ``tick_s`` seconds, so that its elapsed time runs between the
        epoch and run events (a long epoch used to freeze it)."""
        if self._ticker is not None or self.tick_s <= 0:
            return

        def tick() -> None:
            while not self._stop.wait(self.tick_s):
                try:
                    self._refresh()
                except Exception:  # noqa: BLE001 - a drawing hiccup never stops a sweep
                    pass

        self._ticker = threading.Thread(target=tick, name="peftbench progress", daemon=True)
        self._ticker.start()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2 * self.tick_s + 1)
            self._ticker = None
        with self._lock:
            if self.bar is not None:
                self.bar.close()
                self.bar = None


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
