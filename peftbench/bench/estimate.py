"""Sweep planning: how many trainings a sweep needs and how long they take, from a bench table; and
what each choice costs (``--search grid | halving``, with and without fusing configurations)."""
from __future__ import annotations

import csv
import dataclasses
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..backbones import backbone_family, preset
from ..data.splits import split_size
from ..methods import get_method
from ..tasks import get_task
from ..train.loop import uses_cached_features
from .speed import read_table, table_path

TABLES = Path(str(resources.files("peftbench.bench") / "tables"))  # the bench tables shipped with the package


def _names(backbone: str) -> list[str]:
    """The names a bench table of ``backbone`` may carry: itself, its preset's timm name, and their architectures
    (``swin-b-in22k`` -> ``swin_base_patch4_window7_224.ms_in22k``, ``swin_base_patch4_window7_224``)."""
    p = preset(backbone)
    names = [backbone] + ([p.timm_name] if p is not None and not p.kwargs else [])
    return list(dict.fromkeys(names + [n.split(".")[0] for n in names]))


def find_table(backbone: str, given: Path | None) -> Path | None:
    """The bench table measured on ``backbone`` (GPU tables first), or the one given."""
    if given is not None:
        return given
    for name in _names(backbone):
        gpu_tables = sorted(TABLES.glob(f"bench-cuda-*-{name}.csv")) + [table_path(TABLES, "cuda", name)]
        for p in gpu_tables + [table_path(TABLES, "cpu", name)]:
            if p.is_file():
                return p
    return None


@dataclass
class Speeds:
    """The throughputs a cost estimate uses: a bench table measured on the backbone, or (none measured) one of a
    backbone of the same family scaled by the two backbones' forward FLOPs per image (``scale`` < 1: slower)."""

    rows: dict  # read_table's rows, images/s already scaled
    path: Path
    scale: float = 1.0
    measured_on: str = ""  # the table's backbone when scaled

    def describe(self) -> str:
        if self.scale == 1.0:
            return str(self.path)
        return (f"{self.path}, measured on {self.measured_on} and scaled x{self.scale:.3f} by forward FLOPs per image: "
                f"an estimate (`peftbench bench --backbone ...` measures it)")


def _table_backbone(path: Path) -> str:
    with open(path, newline="") as fh:
        return next((r["backbone"] for r in csv.DictReader(fh) if r.get("backbone")), "")


@lru_cache(maxsize=None)
def forward_gflops(backbone: str) -> float:
    """Forward GFLOPs per image of the frozen backbone at its resolution (built on the meta device: no memory)."""
    import torch

    from ..backbones import create_backbone, image_size
    from .speed import _flops

    with torch.device("meta"):
        model = create_backbone(backbone, pretrained=False)
        x = torch.empty(1, 3, image_size(model), image_size(model))
    with torch.no_grad():
        return _flops(lambda: model(x)) / 1e9


def speeds_for(backbone: str, given: Path | None) -> Speeds | None:
    """:class:`Speeds` for ``backbone``: its own bench table, else a shipped table of its family scaled by FLOPs
    (GPU tables first), else None."""
    path = find_table(backbone, given)
    if path is not None:
        return Speeds(read_table(path), path)
    family = backbone_family(backbone)
    candidates = sorted(TABLES.glob("bench-cuda-*.csv")) + sorted(TABLES.glob("bench-cpu-*.csv"))
    for cand in candidates:
        measured = _table_backbone(cand)
        if not measured or backbone_family(measured) != family:
            continue
        try:
            scale = forward_gflops(measured) / forward_gflops(backbone)
        except Exception:  # noqa: BLE001 - a backbone timm cannot build here: no estimate rather than no plan
            return None
        rows = {k: {**r, "train_images_per_s": float(r["train_images_per_s"]) * scale,
                    "eval_images_per_s": float(r["eval_images_per_s"]) * scale}
                for k, r in read_table(cand).items() if r.get("train_images_per_s") and r.get("eval_images_per_s")}
        return Speeds(rows, cand, scale, measured)
    return None


def trained_epochs(spec) -> tuple[int, int]:
    """(first, stop) epoch a training spec trains: a rung run stops at ``hparams.stop_epoch`` and a run that
    continues a rung starts at the epoch it resumes from."""
    hp = spec.hparams
    stop = int(hp.get("stop_epoch") or hp["epochs"])
    start = int((getattr(spec, "resume_from", None) or {}).get("epoch") or 0)
    return start, stop


def evaluations(spec) -> int:
    """Evaluations of the eval split a training spec runs (:func:`peftbench.train.loop.evaluates`: every
    ``eval_every`` epochs, counted from epoch 0 with ``eval_first``, and after its last)."""
    start, stop = trained_epochs(spec)
    every = int(spec.hparams.get("eval_every") or 0)
    first = bool(spec.hparams.get("eval_first"))
    last_from = int(spec.hparams["epochs"]) - int(spec.hparams.get("eval_last") or 0)
    return sum(1 for e in range(start, stop)
               if e == stop - 1 or e >= last_from or (every and (e if first else e + 1) % every == 0))


def _sizes(s, data_root: dict) -> tuple[int | None, int | None]:
    task = get_task(s.task)
    root = data_root.get(s.task, getattr(s, "data_root", ""))
    return split_size(task, root, s.train_split), split_size(task, root, s.eval_split)


def image_steps(specs, contexts) -> tuple[int, set[str]]:
    """Training images × epochs of the training specs (what the search changes); what could not be counted."""
    data_root = {c.task.name: c.data_root for c in contexts}
    total, missing = 0, set()
    for s in specs:
        if s.job != "train":
            continue
        n_train, _ = _sizes(s, data_root)
        if n_train is None:
            missing.add(f"{s.task}:{s.train_split}")
            continue
        start, stop = trained_epochs(s)
        total += (stop - start) * n_train
    return total, missing


def _row(table: dict, s) -> dict | None:
    return table.get((s.method, s.hparams.get("precision", "fp32"))) or table.get(s.method)


def estimate_each(specs, contexts, table: dict[str, dict]) -> tuple[dict[str, float], list[str]]:
    """Per run key: the training + evaluation seconds of the spec (unfused) at the table's throughputs; also
    what could not be estimated (those specs have no entry). The sweep's ETA starts from these."""
    out, missing = {}, set()
    for s in specs:
        seconds, miss = estimate_seconds([s], contexts, table)
        if miss:
            missing.update(miss)
        else:
            out[s.key] = seconds
    return out, sorted(missing)


def estimate_seconds(specs, contexts, table: dict[str, dict], fused: dict | None = None,
                     fuse: int = 0) -> tuple[float, list[str]]:
    """Training + evaluation time of ``specs`` at the table's throughputs; also what could not be estimated.

    ``fuse`` K > 1 with ``fused`` (the table's ``fused-<K>`` rows, :func:`read_fused`): the runs that
    :func:`fusable_groups` puts together train at the fused row's configuration-images/s."""
    data_root = {c.task.name: c.data_root for c in contexts}
    total, missing = 0.0, set()
    for group in (fusable_groups(specs, fuse) if fuse > 1 else [[s] for s in specs]):
        s = group[0]
        row = _row(table, s)
        if row is None or s.job != "train":
            missing.add(s.method if row is None else f"{s.method}:{s.job}")
            continue
        n_train, n_eval = _sizes(s, data_root)
        if n_train is None:
            missing.add(f"{s.task}:{s.train_split}")
            continue
        if uses_cached_features(get_method(s.method), get_task(s.task)):
            # the engine computes the features once; the head's epochs on cached features are negligible
            total += len(group) * (n_train + (n_eval or 0)) / float(row["eval_images_per_s"])
            continue
        start, stop = trained_epochs(s)
        ips = float(row["train_images_per_s"])
        frow = _fused_row(fused or {}, s, len(group)) if len(group) > 1 else None
        if frow is not None:  # configuration-images per second of K fused configurations
            ips = float(frow["train_images_per_s"])
        total += len(group) * (stop - start) * n_train / ips
        total += len(group) * evaluations(s) * (n_eval or 0) / float(row["eval_images_per_s"])
    return total, sorted(missing)


# ---------------------------------------------------------------------------------------------
# fused configurations (--fuse K): which runs train together, and the bench rows that time them
# ---------------------------------------------------------------------------------------------

_FUSED = re.compile(r"^fused-(\d+)$")


def read_fused(path: Path) -> dict[tuple[str, int, str], dict]:
    """The table's ``fused-<K>`` rows by (method, K, precision): ``train_images_per_s`` is the total
    configuration-images per second (K × batch / step time) of K configurations trained together."""
    out: dict = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            m = _FUSED.match(row.get("variant") or "")
            if m and row.get("compile") != "True":
                out.setdefault((row["method"], int(m.group(1)), row.get("precision") or row.get("amp") or "fp32"), row)
    return out


def _fused_row(fused: dict, s, k: int) -> dict | None:
    """The fused row for ``k`` configurations: measured at k, else at the largest K < k (a group of fewer
    configurations than any measured K trains at the unfused speed)."""
    precision = s.hparams.get("precision", "fp32")
    ks = [kk for (m, kk, p) in fused if m == s.method and p == precision and kk <= k]
    return fused[(s.method, max(ks), precision)] if ks else None


def _fusable(method: str) -> bool:
    return bool(getattr(get_method(method), "fusable", False))


def fusable_groups(specs, fuse: int) -> list[list]:
    """The runs ``--fuse K`` trains together: the engine's own grouping (``peftbench.train.fused.plan_groups``)."""
    from ..train.fused import plan_groups

    return plan_groups(list(specs), fuse)


# ---------------------------------------------------------------------------------------------
# what each choice costs
# ---------------------------------------------------------------------------------------------


def _choices(contexts) -> list:
    from ..sweep.search import Search

    chosen = contexts[0].search
    grid = chosen if chosen.kind == "grid" else Search("grid")
    halving = chosen if chosen.kind == "halving" else Search("halving")
    return [grid, halving]


def print_costs(contexts, bench_table: Path | None, done: set[str] | frozenset = frozenset(),
                fuse: int | None = None, file=None) -> list[dict]:
    """Runs, image-steps and device-hours of the sweep for ``--search grid`` and ``halving``, each without
    and with fusing (K = ``fuse``, else the largest K of the table's fused rows). Returns the rows."""
    from ..sweep.drive import count_runs

    speeds = speeds_for(contexts[0].backbone, bench_table)
    path = speeds.path if speeds is not None else None
    table = speeds.rows if speeds is not None else None
    fused = read_fused(path) if path is not None and speeds is not None and speeds.scale == 1.0 else {}
    fuse = fuse if fuse and fuse > 1 else 0  # --fuse 1: no fusing
    k = fuse or max((key[1] for key in fused), default=0)
    methods = sorted({c.method.name for c in contexts})
    fusable = [m for m in methods if _fusable(m)]
    if not fusable:
        k = 0
    rows, no_data = [], []
    for search in _choices(contexts):
        specs = count_runs([dataclasses.replace(c, search=search) for c in contexts])
        if search == contexts[0].search:  # the sweep as asked: every run of it, done or not
            no_data = _missing_data(specs, contexts)
        todo = [s for s in specs if s.key not in done]
        steps, _ = image_steps(todo, contexts)
        search_steps, _ = image_steps([s for s in todo if s.stage.startswith("search")], contexts)
        for fz in ([0, k] if k > 1 else [0]):
            seconds = estimate_seconds(todo, contexts, table, fused, fz)[0] if table is not None else None
            rows.append({"search": search.describe(), "kind": search.kind, "fuse": fz, "runs": len(specs),
                         "to_run": len(todo), "search_image_steps": search_steps, "image_steps": steps,
                         "hours": None if seconds is None else seconds / 3600,
                         "chosen": search == contexts[0].search and fz == fuse})
    print("what each choice costs (of the runs to run; image-steps = training images x epochs; * = this command):",
          file=file)
    print(f"  {'search':<9} {'fuse':>4} {'runs':>7} {'to run':>7} {'search image-steps':>19} {'all image-steps':>16} "
          f"{'device-hours':>13}", file=file)
    if no_data:  # image-steps and hours of those tasks are not counted: the numbers would read as 0
        for r in rows:
            r["hours"] = None
    for r in rows:
        hours = ("unknown" if no_data else "-") if r["hours"] is None else f"{r['hours']:.2f}"
        steps = (f"{'unknown':>19} {'unknown':>16}" if no_data else
                 f"{r['search_image_steps'] / 1e6:>18.3f}M {r['image_steps'] / 1e6:>15.3f}M")
        print(f"{'*' if r['chosen'] else ' '} {r['kind']:<9} {r['fuse'] or '-':>4} {r['runs']:>7} {r['to_run']:>7} "
              f"{steps} {hours:>13}", file=file)
    grid, halving = (next(r for r in rows if r["kind"] == kind and not r["fuse"]) for kind in ("grid", "halving"))
    if halving["image_steps"] and halving["search_image_steps"]:
        print(f"  {halving['search']}: {grid['search_image_steps'] / halving['search_image_steps']:.2f}x fewer "
              f"image-steps in the search stages, {grid['image_steps'] / halving['image_steps']:.2f}x in all "
              "(docs/sweeps.md)", file=file)
    if no_data:
        print(f"  image-steps and device-hours: {_data_note(no_data, contexts)}", file=file)
    if path is None:
        print("  device-hours: no bench table for this backbone (`peftbench bench --backbone ...`)", file=file)
    elif speeds is not None and speeds.scale != 1.0:
        print(f"  device-hours: {speeds.describe()}", file=file)
    if not fusable:
        print(f"  fused: none of {', '.join(methods)} can be fused (Method.fusable)", file=file)
    elif speeds is not None and speeds.scale != 1.0:
        print("  fused: speed not measured on this backbone (fused rows are not scaled)", file=file)
    elif path is not None and k <= 1:
        print(f"  fused: speed not measured (no fused-<K> rows in {path}; `peftbench bench` with fusing adds them)",
              file=file)
    elif path is not None:
        timed = sorted({m for (m, kk, _) in fused if kk == k and m in methods})
        print(f"  fused (--fuse {k}): fused-{k} rows for {', '.join(timed) or 'none of these methods'}; "
              f"fusable methods: {', '.join(fusable) or 'none'}; other runs at their unfused speed", file=file)
    return rows


def _missing_data(specs, contexts) -> list[str]:
    """The tasks whose training split's size is unknown here (their data is not at the data root): their cost cannot
    be estimated."""
    _, missing = image_steps(specs, contexts)
    return sorted({m.split(":")[0] for m in missing})


def _data_note(tasks: list[str], contexts) -> str:
    suites = sorted({c.suite.name for c in contexts if c.task.name in tasks})
    roots = sorted({str(c.data_root) for c in contexts if c.task.name in tasks})
    return (f"the data of {len(tasks)} task(s) is not in {', '.join(roots)} ({', '.join(tasks)}), and the split sizes "
            f"decide the cost: `peftbench data prepare --suite {suites[0] if suites else '...'}` says how to get it")


def print_plan(specs, contexts, bench_table: Path | None, done: set[str] | frozenset = frozenset(),
               on_gpu: bool = False) -> None:
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
    speeds = speeds_for(contexts[0].backbone, bench_table)
    if speeds is None:
        print("no bench table found for this backbone: run `peftbench bench --backbone ...` to get time estimates")
        return
    seconds, missing = estimate_seconds(todo, contexts, speeds.rows)
    device = next(iter(speeds.rows.values()))["device"]
    no_data = _missing_data(todo, contexts)
    if no_data and len(no_data) == len({s.task for s in todo if s.job == "train"}):
        print(f"estimated compute for the {len(todo)} runs to run: unknown: {_data_note(no_data, contexts)}")
    else:
        print(f"estimated compute for the {len(todo)} runs to run: {seconds / 3600:.1f} device-hours on {device} "
              f"(from {speeds.describe()})" + (f"; without the tasks whose data is missing: {_data_note(no_data, contexts)}"
                                               if no_data else ""))
    if on_gpu and str(device).startswith("cpu"):
        print("  (the runs train on GPUs, these hours are the CPU table's: a GPU is many times faster; "
              "`peftbench bench --device cuda` on the GPU node measures its table, which the dry-run then reads)")
    missing = [m for m in missing if m.split(":")[0] not in no_data]
    if missing:
        print(f"  not estimated (not in the table): {', '.join(missing)}")
