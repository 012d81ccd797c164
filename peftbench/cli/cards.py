"""``peftbench cards``: per configuration and task, the hyper-parameters that were selected and trained, as
CSV, JSON, a card that ``--protocol card`` trains as given, and a sweep file that replays the final runs
(:mod:`peftbench.results.cards`, docs/protocols.md §15)."""
from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("cards", help="export the selected and trained configurations (CSV, JSON, cards, sweep files)",
                       description="Per configuration and task of the leaderboard: the hyper-parameters and options "
                                   "its final runs trained with, their seeds, the protocol and search that chose them, "
                                   "and the result. Writes <suite>-cards.csv, <suite>-cards.json and, per "
                                   "configuration, <suite>-cards/<label>.toml (a card: peftbench run --protocol card "
                                   "--card FILE trains it without a search) and <label>.sweep.toml (replays the final "
                                   "runs). See docs/protocols.md §15.")
    p.add_argument("--runs-dir", default="runs", help="where the run records are (default ./runs)")
    p.add_argument("--out", help="output folder (default <runs-dir>/cards)")
    p.add_argument("--suite", help="only this suite (default: every suite that has records)")
    p.set_defaults(func=main)


def main(args) -> int:
    from .._text import terminal
    from ..errors import SettingsError
    from ..results.board import build_board, load_runs, suite_grid
    from ..results.cards import write_cards
    from ..results.write import suites_in
    from ..tasks import get_suite

    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        raise SettingsError(f"--runs-dir {runs_dir}: not a folder of run records")
    suite = get_suite(args.suite).name if args.suite else None
    out = Path(args.out) if args.out else runs_dir / "cards"
    runs, skipped = load_runs(runs_dir)
    written = []
    for s in [suite] if suite else suites_in(runs):
        grid = suite_grid(s, runs)
        written += write_cards(build_board(runs, grid.suite, None, skipped, grid=grid), out, str(runs_dir))
    if not written:
        print(f"peftbench cards: no finished final runs under {runs_dir}: nothing to export", file=sys.stderr)
        return 0
    for p in written:
        print(terminal(p))
    return 0
