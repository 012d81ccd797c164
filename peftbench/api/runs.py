"""Run records as pandas DataFrames: :func:`load_runs` (one row per run) and :func:`leaderboard` (one
row per method configuration, the columns of ``<suite>-leaderboard.csv``)."""
from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Callable

from ..store import FINAL

# first columns of load_runs, in this order (the rest: every field of the record, flattened with dots)
FIRST = ("key", "method", "config", "task", "suite", "protocol", "stage", "job", "seed", "lr", "wd", "precision", "status",
         "top1", "stale", "failed", "finished", "tuned_total_pct", "trainable", "wall_s", "path")


def load_runs(runs_dir: str | Path = "runs", *, warn: Callable[[str], None] | None = None):
    """Every run record under ``runs_dir`` as a DataFrame, one row per run.

    Columns: the convenience columns of :data:`FIRST` (``top1`` = the record's ``metrics.top1``;
    ``stale``: produced by other code than the installed one; ``failed``: status failed or diverged;
    ``finished``: ok or diverged; ``path``: the record file, relative to ``runs_dir``), then every field
    of the record flattened with dots (``spec.hparams.lr``, ``params.trainable``, ``timing.train_images_per_s``,
    ``metrics.best_epoch_top1``, ...; ``history`` stays a list of per-epoch dicts). Corrupt or partial
    record files are skipped with a warning (``warn``; default: a line on stderr). ``df.attrs["runs_dir"]``
    remembers where the records are (:func:`leaderboard` reads it)."""
    import pandas as pd

    from ..results.board import load_runs as board_runs

    root = Path(runs_dir)
    runs, skipped = board_runs(root, warn)
    rows = []
    for r in runs:
        d = r.record.to_dict()
        history = d.pop("history", [])
        flat = pd.json_normalize(d, sep=".").iloc[0].to_dict() if d else {}
        spec = r.spec
        hp = spec.get("hparams") or {}
        row = {"key": r.record.key or Path(r.path).stem, "method": spec.get("method"),
               "config": spec.get("config") or spec.get("method"), "task": spec.get("task"), "suite": spec.get("suite"),
               "protocol": spec.get("protocol"), "stage": spec.get("stage"), "job": spec.get("job", "train"),
               "seed": spec.get("seed"), "lr": hp.get("lr"), "wd": hp.get("wd"), "precision": r.precision, "status": r.status,
               "top1": r.top1,
               "stale": r.stale, "failed": r.status in ("failed", "diverged"),
               "finished": r.status in FINAL, "tuned_total_pct": r.params.get("tuned_total_pct"),
               "trainable": r.params.get("trainable"), "wall_s": r.record.wall_s, "path": r.path}
        for k, v in flat.items():
            if k not in row and k != "key":
                row[k] = v
        row["history"] = history
        rows.append(row)
    df = pd.DataFrame(rows, columns=None if rows else list(FIRST))
    df.attrs["runs_dir"] = str(root.resolve())
    df.attrs["skipped"] = [(s.path, s.reason) for s in skipped]
    return df


def leaderboard(runs="runs", suite: str | None = None, *, reference: bool | str | Path = True,
                warn: Callable[[str], None] | None = None):
    """The leaderboard of ``suite`` as a DataFrame: the rows and columns of ``<suite>-leaderboard.csv``
    (docs/leaderboard.md), reproduced rows first, then the papers' reported rows (``reference=False``:
    none; a folder: those numbers).

    ``runs``: a runs folder, or a DataFrame from :func:`load_runs` (filtered as you like: only its rows
    count). ``suite``: default the only suite the runs have."""
    import pandas as pd

    from ..errors import SettingsError
    from ..results.board import build_board, suite_grid
    from ..results.board import load_runs as board_runs
    from ..results.columns import csv_text, table
    from ..results.reference import default_reference_dir, load_reference
    from ..results.tables import terminal_table

    Leaderboard = _leaderboard_class()

    if isinstance(runs, pd.DataFrame):
        root = runs.attrs.get("runs_dir")
        if not root:
            raise SettingsError("leaderboard(df): the DataFrame does not say where its records are "
                                "(df.attrs['runs_dir']); pass the runs folder instead")
        keep = set(runs["path"]) if "path" in runs else set()
        all_runs, skipped = board_runs(root, warn or (lambda m: None))
        chosen = [r for r in all_runs if r.path in keep]
    else:
        chosen, skipped = board_runs(runs, warn)
    suites = sorted({str(r.spec.get("suite")) for r in chosen})
    if suite is None:
        if len(suites) != 1:
            raise SettingsError(f"leaderboard: the runs are of {len(suites)} suites ({', '.join(suites) or 'none'}); "
                                "pass suite=")
        suite = suites[0]
    grid = suite_grid(suite, chosen)
    ref_dir = None if reference is False else (default_reference_dir() if reference is True else Path(reference))
    board = build_board(chosen, grid.suite, load_reference(ref_dir, grid) if ref_dir else None, skipped, grid=grid,
                        warn=warn or (lambda m: None))
    text = csv_text(*table("leaderboard", board, board.rows))
    df = Leaderboard(pd.read_csv(io.StringIO(text)))
    df.attrs["board"] = terminal_table(board)
    return df


@functools.lru_cache(maxsize=None)
def _leaderboard_class():
    import pandas as pd

    class Leaderboard(pd.DataFrame):
        """The leaderboard's DataFrame (every column of ``<suite>-leaderboard.csv``), printed as the board:
        ``print(lb)`` shows what ``peftbench leaderboard`` prints; ``lb.to_string()`` or ``pd.DataFrame(lb)``
        give the whole frame."""

        @property
        def _constructor(self):  # slices and copies are plain DataFrames (with the frame's own repr)
            return pd.DataFrame

        def __repr__(self) -> str:
            board = self.attrs.get("board")
            if not board:
                return super().__repr__()
            return f"{board.rstrip()}\n[{len(self)} rows x {len(self.columns)} columns: lb.columns lists them]"

    return Leaderboard


def __getattr__(name: str):
    if name == "Leaderboard":  # pandas is imported on first use only
        return _leaderboard_class()
    raise AttributeError(name)


def status(runs_dir: str | Path = "runs", *, query: bool = True):
    """What ``peftbench status`` shows, as a DataFrame: one row per run of ``runs_dir`` (records, runs a
    live driver has queued, runs an executor knows of), with ``status`` (pending, running, done, failed,
    diverged, interrupted), ``job`` (a SLURM job id, ``ray:<task id>``), ``node``, ``restart_count``,
    ``retries``, ``top1``, ``stale``, ``holder``. ``df.attrs``: ``driver`` (a live SLURM or Ray driver)
    and ``drivers`` (live ``peftbench run`` processes). ``query=False``: do not ask SLURM for job states."""
    import pandas as pd

    from ..executors import collect

    info = collect(runs_dir, query=query)
    df = pd.DataFrame(info["runs"])
    df.attrs.update(runs_dir=info["runs_dir"], driver=info["driver"], drivers=info["drivers"],
                    unreadable=info["unreadable"])
    return df
