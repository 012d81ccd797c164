"""Keep the committed demo board (results/demo/) true to today's code.

    python scripts/refresh_demo.py --board-only   # rewrite results/demo/board/ from the records as they are (seconds)
    python scripts/refresh_demo.py                # retrain stale methods, finish incomplete ones, rewrite the board
    python scripts/refresh_demo.py --all          # retrain every method (about 2 hours on a 2-core CPU)
    python scripts/refresh_demo.py --no-train     # keep the store's JSON only and rewrite the board (after a sweep)
    python scripts/refresh_demo.py --missing-only # train only new methods (stale ones keep their records and banner)
    python scripts/refresh_demo.py --chunk 6      # (the default) stale methods retrained 6 at a time: an interruption
                                                  # (Ctrl-C or SIGTERM) keeps every finished chunk, and the board is
                                                  # rewritten after each chunk, so the folder can be committed then

results/demo/runs/ is a run store holding only JSON: every run record and the JSON artifacts of the pipelines'
jobs, plus the sweep file that made them (sweeps/demo-all.toml). A method is retrained as a whole (all its stages
on every task) when one of its counted records is stale — made by other method or engine code than the installed
one (peftbench.fingerprint) — or of another method version: its folder is set aside, ``peftbench run --config
<sweep> --methods ...`` trains it again through the store (restoring the old folder if that fails). A method
without a final run on some task (a new method, an interrupted sweep) is finished through the store, which keeps
its done runs. The trained weights are then deleted (nothing but JSON is committed).
Then ``peftbench leaderboard`` rewrites results/demo/board/, and board/MADE_WITH.json records the matplotlib version
that drew its figures (tests/test_committed_results.py regenerates the board byte for byte and compares).
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "results" / "demo"
RUNS = DEMO / "runs"
BOARD = DEMO / "board"
SWEEP = RUNS / "sweeps" / "demo-all.toml"
PEFTBENCH = [sys.executable, "-m", "peftbench"]


def _board():
    from peftbench.results.board import build_board, load_runs

    runs, skipped = load_runs(RUNS, lambda msg: None)
    return build_board(runs, "demo", None, skipped, warn=lambda msg: None)


def stale_methods() -> list[str]:
    """Methods of the sweep with a counted stale record or a record of another method version (a version bump changes
    the run keys): retrained from scratch."""
    from peftbench.methods import get_method

    board = _board()
    out = {str(r.spec["method"]) for r in board.runs if r.path in board.used and r.stale}
    out |= {str(r.spec["method"]) for r in board.runs
            if int(r.spec.get("method_version", 1)) != int(get_method(str(r.spec["method"])).version)}
    return sorted(out & set(methods_of_sweep()))


def incomplete_methods() -> list[str]:
    """Methods of the sweep without a counted final run on every task of the sweep (a new method, an interrupted
    sweep): the store resumes them, keeping what is done."""
    board = _board()
    done = {(str(r.spec["method"]), str(r.spec["task"])) for r in board.runs if r.path in board.used}
    tasks = sweep_field("tasks")
    return sorted(m for m in methods_of_sweep() if any((m, t) not in done for t in tasks))


def sweep_field(name: str):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    return tomllib.loads(SWEEP.read_text(encoding="utf-8"))[name]


def methods_of_sweep() -> list[str]:
    """The sweep's methods and every built-in method registered since (the board has every registered method)."""
    from peftbench.methods import METHODS

    builtin = {n for n, m in METHODS.items() if type(m).__module__.startswith("peftbench.methods.")}
    return sorted(set(sweep_field("methods")) | builtin)


def refuse_while_running() -> None:
    """A sweep writing into the store now (a live driver's journal): nothing is moved or deleted under it."""
    from peftbench.store.journal import live_journals

    live = live_journals(RUNS)
    if live:
        d = live[0]
        sys.exit(f"refresh_demo: a sweep is running in {RUNS} (pid {d.get('pid')} on {d.get('host')}): wait for it")


def portable_sweep() -> None:
    """The committed sweep files name no path of the machine that wrote them (runs_dir, data_root: each machine's own,
    given by refresh_demo's flags and peftbench's default data root)."""
    for sweep in sorted(SWEEP.parent.glob("*.toml")):
        lines = sweep.read_text(encoding="utf-8").splitlines()
        keep = [line for line in lines if not line.startswith(("runs_dir =", "data_root =", "# run it again exactly:"))]
        if keep != lines:
            sweep.write_text("\n".join(keep) + "\n", encoding="utf-8")


def prune_store() -> None:
    """Only JSON is committed: trained weights, checkpoints, leases and selections' tensors go; and so does every
    record of a (method, task) pair without its final run (an interrupted pipeline whose later stages would need the
    weights just deleted: it starts again whole when the sweep is finished)."""
    board = _board()
    done = {(str(r.spec["method"]), str(r.spec["task"])) for r in board.runs if r.path in board.used}
    for r in board.runs:
        # (failed and diverged records stay: the board shows them, and the store reruns them)
        if (str(r.spec["method"]), str(r.spec["task"])) not in done and r.status not in ("failed", "diverged"):
            key = Path(r.path).stem
            for f in (RUNS / r.path).parent.glob(f"{key}*"):
                f.unlink()
    for path in RUNS.rglob("*"):
        if path.is_file() and not path.name.endswith((".json", ".toml")):
            path.unlink()
    for d in ("leaderboard", ".peftbench", ".local", ".slurm", ".ray"):
        shutil.rmtree(RUNS / d, ignore_errors=True)


def settle_store() -> None:
    """The store as it is committed: JSON only (:func:`prune_store`) and a sweep file without this machine's paths."""
    prune_store()
    portable_sweep()


def whole_sweep(text: str, added: list[str]) -> str:
    """The board's sweep file ``text`` with ``added`` methods in its method list (its --set options kept); its
    description lines, which count one invocation's runs, replaced by what the file is."""
    lines = []
    for line in text.splitlines():
        if line.startswith("methods = "):
            methods = sorted(set(json.loads(line[len("methods = "):])) | set(added))
            line = "methods = " + json.dumps(methods)
        elif line.startswith(("# The resolved sweep", "# written by peftbench")):
            continue
        lines.append(line)
    head = ("# The demo board's sweep: every method on the demo suite (scripts/refresh_demo.py trains what is missing or "
            "stale through it and keeps its method list whole)")
    if lines and lines[0] != head:
        lines.insert(0, head)
    return "\n".join(lines) + "\n"


def retrain(methods: list[str], resume: list[str] = ()) -> None:
    """Train ``methods`` again from scratch (their folders set aside) and finish ``resume`` (the store keeps their
    finished runs), in one sweep. A method that ends incomplete gets its old folder back (if it had one); the others
    keep their new runs, even when the sweep as a whole failed or was interrupted."""
    todo = sorted(set(methods) | set(resume))
    if not todo:
        print("refresh_demo: every method is complete and made by the installed code")
        return
    aside = Path(tempfile.mkdtemp(prefix="refresh-demo-", dir=DEMO))
    for m in methods:
        if (RUNS / m).exists():
            shutil.move(str(RUNS / m), str(aside / m))
    print(f"refresh_demo: retraining {', '.join(methods) or 'nothing'}; finishing {', '.join(resume) or 'nothing'}",
          flush=True)
    code = 1
    whole = SWEEP.read_text(encoding="utf-8")
    try:
        code = subprocess.call([*PEFTBENCH, "run", "--config", str(SWEEP), "--runs-dir", str(RUNS), "--methods",
                                ",".join(todo), "--save-weights", "none"])
    finally:
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (a second kill must not stop the restore half-way)
        # the run rewrote the sweep file with the subset it trained (and only that subset's --set options): the
        # committed file stays the whole board's sweep, with the methods it gained
        SWEEP.write_text(whole_sweep(whole, todo), encoding="utf-8")
        unfinished = set(incomplete_methods())
        for m in methods:
            if m in unfinished and (aside / m).exists():
                shutil.rmtree(RUNS / m, ignore_errors=True)
                shutil.move(str(aside / m), str(RUNS / m))
        shutil.rmtree(aside, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    if code != 0:
        print(f"refresh_demo: the run ended with exit {code}; methods that did not finish keep their old records",
              file=sys.stderr)


def write_board() -> None:
    import matplotlib

    BOARD.mkdir(parents=True, exist_ok=True)
    code = subprocess.call([*PEFTBENCH, "leaderboard", "--runs-dir", str(RUNS), "--out", str(BOARD), "--suite", "demo",
                            "--force", "--quiet"])
    if code != 0:
        sys.exit(f"refresh_demo: the leaderboard failed (exit {code})")
    (BOARD / "MADE_WITH.json").write_text(json.dumps({"matplotlib": matplotlib.__version__}, indent=1) + "\n")
    print(f"refresh_demo: board written to {BOARD.relative_to(ROOT)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--board-only", action="store_true", help="only rewrite the board from the committed records")
    ap.add_argument("--all", action="store_true", help="retrain every method of the sweep")
    ap.add_argument("--missing-only", action="store_true",
                    help="train only the methods without a final run on every task (new methods); stale methods keep "
                         "their records, and the board its 'made by older code' banner")
    ap.add_argument("--chunk", type=int, default=6, metavar="N",
                    help="retrain stale methods N at a time, one sweep each (default 6: about 10 minutes on 2 CPU cores), "
                         "so that an interruption loses at most the chunk in progress (0: all in one sweep)")
    ap.add_argument("--no-train", action="store_true",
                    help="train nothing: keep the store's JSON (an interrupted pair's records dropped) and rewrite the "
                         "board")
    args = ap.parse_args()
    refuse_while_running()
    interrupted = False
    if not args.board_only:
        portable_sweep()  # (before training too: this machine's data root, not the one that wrote the file)
        if not args.no_train:
            stale = methods_of_sweep() if args.all else [] if args.missing_only else stale_methods()
            resume = [m for m in incomplete_methods() if m not in stale]
            size = args.chunk if args.chunk > 0 else max(1, len(stale))
            # (the sweep runs task by task, so a method is whole only at the end of its sweep: chunks of methods keep
            # what an interrupted refresh finished)
            chunks = [stale[i:i + size] for i in range(0, len(stale), size)] or [[]]
            # (a kill stops like Ctrl-C: the child sweep is stopped, the chunk in progress undone, the board rewritten,
            # exit 130; the run store survives its child being killed at any point)
            signal.signal(signal.SIGTERM, _interrupt)
            try:
                for i, chunk in enumerate(chunks):
                    if len(chunks) > 1:
                        print(f"refresh_demo: chunk {i + 1}/{len(chunks)}", flush=True)
                    retrain(chunk, resume if i == 0 else [])
                    if i + 1 < len(chunks):  # the store and the board whole after every chunk (safe to commit)
                        settle_store()
                        write_board()
            except KeyboardInterrupt:
                interrupted = True
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (the store and the board are made whole first)
                print("refresh_demo: interrupted; the methods of finished chunks keep their new records, the others "
                      "their old ones (run it again to go on)", file=sys.stderr, flush=True)
        settle_store()
    write_board()
    if interrupted:
        sys.exit(130)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
