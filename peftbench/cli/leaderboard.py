"""``peftbench leaderboard``: CSV leaderboards, plots, paper tables and an HTML report regenerated from
the run store."""
from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "leaderboard", help="regenerate leaderboards, plots and an HTML report from the run records",
        description="Regenerate <suite>-leaderboard.csv, <suite>-runs.csv, plots, <suite>-table.tex/.md and "
                    "<suite>-report.html from the run records (deterministic: the same records give byte-identical "
                    "files). With --format latex|markdown, print the papers' Table 1 layout instead. "
                    "See docs/leaderboard.md and docs/results.md.")
    p.add_argument("--runs-dir", default="runs", help="where the run records are (default ./runs)")
    p.add_argument("--out", help="output folder (default <runs-dir>/leaderboard)")
    p.add_argument("--force", action="store_true",
                   help="overwrite leaderboard files in --out that another run store produced")
    p.add_argument("--suite", help="only this suite (default: every suite that has records)")
    p.add_argument("--format", choices=("files", "latex", "markdown", "terminal"), default="files",
                   help="files (default): write every file into --out and print the board; latex | markdown: print "
                        "the table (Table 1 layout, mean ± std, best per column bold) to stdout and write nothing; "
                        "terminal: print the board only")
    p.add_argument("--quiet", action="store_true", help="files: print only the paths written, not the board")
    p.add_argument("--reference", metavar="DIR",
                   help="folder of reported numbers, <suite>-top1.csv (default: $PEFTBENCH_REFERENCE, else the "
                        "numbers shipped with peftbench: peftbench/results/reference)")
    p.add_argument("--no-reference", action="store_true", help="leave out the papers' reported numbers")
    p.add_argument("--no-plots", action="store_true", help="CSV files only (no PNG/SVG files, no tables, no HTML report)")
    p.add_argument("--raw-names", action="store_true",
                   help="the LaTeX and Markdown tables name methods and tasks by their peftbench identifiers (lora, "
                        "oxford_iiit_pet) instead of the papers' display names (LoRA, Pets)")
    g = p.add_argument_group("comparison section (peftbench compare, inside the report)")
    g.add_argument("--compare", metavar="RUNS_B|CSV",
                   help="add B − A against another run store (or a reference CSV): <suite>-compare.csv and a section "
                        "of the report, A being --runs-dir")
    g.add_argument("--compare-tag", action="append", default=[], metavar="FIELD=VALUE",
                   help="twice: compare two selections of --runs-dir instead (e.g. --compare-tag backbone=demo-vit "
                        "--compare-tag backbone=demo-vit-random)")
    g.add_argument("--compare-match", metavar="FIELDS",
                   help="what matches a configuration across the sides (default config,backbone,checkpoint,protocol,"
                        "precision, less the fields the tags select on; e.g. method,protocol)")
    p.set_defaults(func=main)


def comparison_args(args, a: Path, b: str | None, tags: list[str], match: str | None, flag: str):
    """The keyword arguments of :func:`peftbench.results.compare.compare_paths` from the command line."""
    from ..errors import SettingsError
    from ..results.compare import MATCH_FIELDS

    if tags and len(tags) != 2:
        raise SettingsError(f"{flag}: give it exactly twice (side A, then side B), got {len(tags)}")
    if tags and b:
        raise SettingsError(f"{flag} compares two selections of one store: do not give a second store as well")
    fields = None
    if match:
        fields = tuple(f.strip() for f in match.split(",") if f.strip())
        bad = [f for f in fields if f not in (*MATCH_FIELDS, "method")]
        if bad:
            raise SettingsError(f"--match {match}: unknown field(s) {', '.join(bad)} (choose from "
                                f"{', '.join((*MATCH_FIELDS, 'method'))})")
    return {"b": b, "tags": tuple(tags) if tags else None, "match_fields": fields}


def main(args) -> int:
    from .._text import terminal
    from ..errors import SettingsError
    from ..results.write import leaderboard_tables, write_leaderboard
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
    if args.format != "files":
        tables = leaderboard_tables(runs_dir, args.format, suite, reference_dir=reference, raw_names=args.raw_names)
        if not tables:
            raise SettingsError(f"no run records under {runs_dir} (and no --suite given)")
        sys.stdout.write(terminal("\n".join(tables.values())))
        return 0
    comparisons = None
    if args.compare or args.compare_tag:
        from ..results.compare import compare_paths

        kw = comparison_args(args, runs_dir, args.compare, args.compare_tag, args.compare_match, "--compare-tag")
        comparisons = {c.grid.suite: c for c in compare_paths(runs_dir, suite=suite, **kw)}
    out = args.out or runs_dir / "leaderboard"
    written = write_leaderboard(runs_dir, out, suite, reference_dir=reference, plots=not args.no_plots,
                                html=not args.no_plots, force=args.force, comparisons=comparisons,
                                raw_names=args.raw_names)
    if not written:
        raise SettingsError(f"no run records under {runs_dir} (and no --suite given)")
    if not args.quiet:
        for text in leaderboard_tables(runs_dir, "terminal", suite, reference_dir=reference,
                                       warn=lambda msg: None).values():  # (its warnings were printed above)
            print(text)
    print(f"files ({len(written)}) in {terminal(Path(out))}:")
    for p in written:
        print("  " + terminal(p))
    return 0
