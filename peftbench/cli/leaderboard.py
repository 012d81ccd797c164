"""``peftbench leaderboard``: CSV leaderboards, plots and an HTML report regenerated from the run store."""
from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "leaderboard", help="regenerate leaderboards, plots and an HTML report from the run records",
        description="Regenerate <suite>-leaderboard.csv, <suite>-runs.csv, plots and <suite>-report.html from the "
                    "run records (deterministic: the same records give byte-identical files). "
                    "See docs/leaderboard.md for the columns and conventions.")
    p.add_argument("--runs-dir", default="runs", help="where the run records are (default ./runs)")
    p.add_argument("--out", help="output folder (default <runs-dir>/leaderboard)")
    p.add_argument("--force", action="store_true",
                   help="overwrite leaderboard files in --out that another run store produced")
    p.add_argument("--suite", help="only this suite (default: every suite that has records)")
    p.add_argument("--reference", metavar="DIR",
                   help="folder of reported numbers, <suite>-top1.csv (default: $PEFTBENCH_REFERENCE, else the "
                        "numbers shipped with peftbench: peftbench/results/reference)")
    p.add_argument("--no-reference", action="store_true", help="leave out the papers' reported numbers")
    p.add_argument("--no-plots", action="store_true", help="CSV files only (no PNG/SVG files, no HTML report)")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..errors import SettingsError
    from ..results.write import write_leaderboard
    from ..tasks import get_suite

    runs_dir = Path(args.runs_dir)
    suite = get_suite(args.suite).name if args.suite else None  # unknown names fail with close matches
    if not runs_dir.is_dir():
        if suite is None:
            raise SettingsError(f"no run records: {runs_dir} is not a folder (pass --runs-dir, or --suite to "
                                f"write a leaderboard of reported numbers only)")
        print(f"peftbench leaderboard: warning: {runs_dir} does not exist; no run records", file=sys.stderr)
    reference = False if args.no_reference else (args.reference or None)
    if reference and not Path(reference).is_dir():
        raise SettingsError(f"--reference {reference}: not a folder")
    out = args.out or runs_dir / "leaderboard"
    written = write_leaderboard(runs_dir, out, suite, reference_dir=reference, plots=not args.no_plots,
                                html=not args.no_plots, force=args.force)
    if not written:
        raise SettingsError(f"no run records under {runs_dir} (and no --suite given)")
    for p in written:
        print(p)
    return 0
