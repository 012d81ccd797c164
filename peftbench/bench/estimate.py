"""Sweep planning: how many trainings a sweep needs and how long they take, from a bench table."""
from __future__ import annotations

from collections import Counter, defaultdict
from importlib import resources
from pathlib import Path

from ..data.splits import split_size
from ..methods import get_method
from ..tasks import get_task
from ..train.loop import uses_cached_features
from .speed import read_table, table_path

TABLES = Path(str(resources.files("peftbench.bench") / "tables"))  # the bench tables shipped with the package


def find_table(backbone: str, given: Path | None) -> Path | None:
    if given is not None:
        return given
    arch = backbone.split(".")[0]
    for name in (backbone, arch):
        gpu_tables = sorted(TABLES.glob(f"bench-cuda-*-{name}.csv")) + [table_path(TABLES, "cuda", name)]
        for p in gpu_tables + [table_path(TABLES, "cpu", name)]:
            if p.is_file():
                return p
    return None


def estimate_each(specs, contexts, table: dict[str, dict]) -> tuple[dict[str, float], list[str]]:
    """Per run key: the training + evaluation seconds of the spec at the table's throughputs; also what
    could not be estimated (those specs have no entry)."""
    data_root = {c.task.name: c.data_root for c in contexts}
    out, missing = {}, set()
    for s in specs:
        row = table.get((s.method, s.hparams.get("precision", "fp32"))) or table.get(s.method)
        if row is None or s.job != "train":
            missing.add(s.method if row is None else f"{s.method}:{s.job}")
            continue
        task = get_task(s.task)
        root = data_root.get(s.task, s.data_root)
        n_train = split_size(task, root, s.train_split)
        n_eval = split_size(task, root, s.eval_split)
        if n_train is None:
            missing.add(f"{s.task}:{s.train_split}")
            continue
        if uses_cached_features(get_method(s.method), task):
            # the engine computes the features once; the head's epochs on cached features are negligible
            out[s.key] = (n_train + (n_eval or 0)) / float(row["eval_images_per_s"])
            continue
        evals = 1 + (int(s.hparams["epochs"]) // int(s.hparams["eval_every"]) if s.hparams.get("eval_every") else 0)
        out[s.key] = (int(s.hparams["epochs"]) * n_train / float(row["train_images_per_s"])
                      + evals * (n_eval or 0) / float(row["eval_images_per_s"]))
    return out, sorted(missing)


def estimate_seconds(specs, contexts, table: dict[str, dict]) -> tuple[float, list[str]]:
    """Training + evaluation time of ``specs`` at the table's throughputs; also what could not be estimated."""
    each, missing = estimate_each(specs, contexts, table)
    return sum(each.values()), missing


def print_plan(specs, contexts, bench_table: Path | None, done: set[str] | frozenset = frozenset()) -> None:
    """The runs of a sweep per method, task and stage, and the device-hours of those not done yet
    (``done``: the keys of finished runs)."""
    todo = [s for s in specs if s.key not in done]
    counts = Counter((s.method, s.task, s.stage) for s in specs)
    left = Counter((s.method, s.task, s.stage) for s in todo)
    for (method, task, stage), n in sorted(counts.items()):
        rest = left.get((method, task, stage), 0)
        print(f"{method:<20} {task:<22} {stage:<14} {n:>5} runs" + (f"  ({n - rest} done)" if rest != n else ""))
    per_method = defaultdict(int)
    for s in specs:
        per_method[s.method] += 1
    print(f"total: {len(specs)} runs (" + ", ".join(f"{m} {n}" for m, n in sorted(per_method.items())) + ")"
          + f"; {len(specs) - len(todo)} done already, {len(todo)} to run")
    path = find_table(contexts[0].backbone, bench_table)
    if path is None:
        print("no bench table found for this backbone: run `peftbench bench --backbone ...` to get time estimates")
        return
    seconds, missing = estimate_seconds(todo, contexts, read_table(path))
    device = next(iter(read_table(path).values()))["device"]
    print(f"estimated compute for the {len(todo)} runs to run: {seconds / 3600:.1f} device-hours on {device} "
          f"(from {path})")
    if missing:
        print(f"  not estimated (not in the table): {', '.join(missing)}")
