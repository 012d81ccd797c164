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
    """One line per matched configuration: the headline delta, its standard error and p-values; when no mean is complete
    (a task subset), one line per task that both sides have."""
    _say(f"{cmp.grid.suite}: B − A, A = {cmp.label_a}, B = {cmp.label_b} (matched on {', '.join(cmp.match_fields)})")
    w = max([len("configuration")] + [len(m.a.label) + 2 for m in cmp.matches])
    name = "mean of groups" if cmp.grid.groups else "mean over tasks"
    _say(f"  {'configuration':<{w}}  {name:>15}  {'± SE':>6}  {'pairs':>5}  {'p pairs':>8}  {'p tasks':>8}  "
         f"{'p Wilcoxon':>10}  {'p Holm':>8}")

    def say(label: str, line) -> None:
        d = f"{line.delta:+.2f}" if line and line.delta is not None else "-"
        se = f"{line.se:.2f}" if line and line.se is not None else ""
        cells = [f"{p:.3g}" if p is not None else "" for p in
                 ((line.p_sign_flip, line.p_task_flip if line.scope != "task" else line.p_t, line.p_wilcoxon)
                  if line else (None, None, None))]
        holm = f"{line.p_holm:.3g}" if line and line.p_holm is not None else ""
        star = (" **" if line.significant_holm(cmp.alpha) else " *") if line and line.significant(cmp.alpha) else ""
        _say(f"  {label:<{w}}  {d:>15}  {se:>6}  {line.pairs if line else 0:>5}  {cells[0]:>8}  {cells[1]:>8}  "
             f"{cells[2]:>10}  {holm:>8}{star}")

    for m in cmp.matches:
        hl = m.line("overall", cmp.headline_name)
        say(m.a.label, hl)
        if hl is None or hl.delta is None:  # no complete mean: the tasks both sides have
            for line in m.lines:
                if line.scope == "task" and line.delta is not None:
                    say(f"  {line.name}", line)
        if m.like_for_like != "yes":
            _say(f"  {'':<{w}}  not like for like: {m.like_for_like[4:]}")
    _say(f"  (* every applicable test below {cmp.alpha:g}: a mean's pair-level and task-clustered sign-flip tests, a "
         "task's sign-flip and t-tests; p tasks of a task row is its t-test; ** also after Holm's correction over the "
         f"{len(cmp.matches)} configurations: p Holm)")
    if cmp.only_a:
        _say(f"  only in A: {', '.join(cmp.only_a)}")
    if cmp.only_b:
        _say(f"  only in B: {', '.join(cmp.only_b)}")
