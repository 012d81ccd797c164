"""``peftbench compare``: two sets of results, configuration by configuration, B − A per task, group and
overall, paired by seed, with paired significance tests."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "compare", help="B − A per task / group / overall of matching configurations, with paired tests",
        description="Compare run store A with run store B (or with a reference CSV in the <suite>-top1.csv layout), "
                    "or two --tag selections of one store: per task, per group and overall B − A of the configurations "
                    "that match, paired by seed, with sign-flip permutation, paired t and Wilcoxon tests. Writes "
                    "<suite>-compare.csv and <suite>-compare.html into --out and prints a summary. "
                    "Statistics: docs/results.md.")
    p.add_argument("runs_a", metavar="RUNS_A", help="run store A (the baseline: before a change)")
    p.add_argument("runs_b", metavar="RUNS_B", nargs="?",
                   help="run store B (after the change), or a reference CSV (method, <task>..., peftbench_config)")
    p.add_argument("--tag", action="append", default=[], metavar="FIELD=VALUE[,FIELD=VALUE]",
                   help="twice, instead of RUNS_B: side A's and side B's runs of RUNS_A, by spec field (config, method, "
                        "backbone, checkpoint, protocol, precision, or a dotted path such as hparams.lr)")
    p.add_argument("--match", metavar="FIELDS",
                   help="what matches a configuration across the sides (default config,backbone,checkpoint,protocol,"
                        "precision, less the fields the tags select on); e.g. method,protocol")
    p.add_argument("--suite", help="only this suite (default: every suite of RUNS_A)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the 'significant' column (0.05)")
    p.add_argument("--out", help="output folder (default <RUNS_A>/compare)")
    p.set_defaults(func=main)


def _say(*parts) -> None:
    """print, with control characters from records (ANSI escapes, bells) made visible (peftbench._text)."""
    from .._text import terminal

    print(*(terminal(p) for p in parts))


def main(args) -> int:
    from ..errors import SettingsError
    from ..results.compare import compare_paths
    from ..results.write import write_comparison
    from ..tasks import get_suite
    from .leaderboard import comparison_args

    if not 0 < args.alpha < 1:
        raise SettingsError(f"--alpha {args.alpha}: must be between 0 and 1")
    suite = get_suite(args.suite).name if args.suite else None
    kw = comparison_args(args, Path(args.runs_a), args.runs_b, args.tag, args.match, "--tag")
    comparisons = compare_paths(args.runs_a, suite=suite, alpha=args.alpha, **kw)
    if not comparisons:  # empty stores: an empty comparison, not an error
        _say(f"nothing to compare: no run records under {args.runs_a}" + (f" or {args.runs_b}" if args.runs_b else "")
             + " (0 configurations matched)")
        return 0
    out = Path(args.out) if args.out else Path(args.runs_a) / "compare"
    for cmp in comparisons:
        print_summary(cmp)
        for p in write_comparison(cmp, out):
            _say(p)
    return 0


def print_summary(cmp) -> None:
    """One line per matched configuration: the headline delta, its std over seeds and p-values."""
    _say(f"{cmp.grid.suite}: B − A, A = {cmp.label_a}, B = {cmp.label_b} (matched on {', '.join(cmp.match_fields)})")
    w = max([len("configuration")] + [len(m.a.label) for m in cmp.matches])
    name = "mean of groups" if cmp.grid.groups else "mean over tasks"
    _say(f"  {'configuration':<{w}}  {name:>15}  {'± std':>6}  {'pairs':>5}  {'p sign-flip':>11}  {'p Wilcoxon':>10}")
    for m in cmp.matches:
        hl = m.line("overall", cmp.headline_name)
        d = f"{hl.delta:+.2f}" if hl and hl.delta is not None else "-"
        sd = f"{hl.delta_std:.2f}" if hl and hl.delta_std is not None else ""
        p = f"{hl.p_sign_flip:.3g}" if hl and hl.p_sign_flip is not None else ""
        pw = f"{hl.p_wilcoxon:.3g}" if hl and hl.p_wilcoxon is not None else ""
        star = " *" if hl and hl.significant(cmp.alpha) else ""
        _say(f"  {m.a.label:<{w}}  {d:>15}  {sd:>6}  {hl.pairs if hl else 0:>5}  {p:>11}  {pw:>10}{star}")
        if m.like_for_like != "yes":
            _say(f"  {'':<{w}}  not like for like: {m.like_for_like[4:]}")
    if cmp.only_a:
        _say(f"  only in A: {', '.join(cmp.only_a)}")
    if cmp.only_b:
        _say(f"  only in B: {', '.join(cmp.only_b)}")
