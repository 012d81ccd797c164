"""Speed and memory per method: train-step and eval throughput, peak memory, FLOPs per image.

Measured on random weights of the chosen architecture (the weights do not change the cost), at a
fixed batch size, after warm-up, as medians over timed steps. The linear probe is also measured
through cached features (one forward pass per image, then the head trains on the features), the way
the engine runs it, and compared with training it through the backbone over a whole protocol.
``fuse`` adds a row per K for each fusable method: K configurations trained as one model
(peftbench.train.fused, variant ``fused-<K>``), whose images/s count configuration-images
(K × batch / fused step time), comparable with the method's own row.
"""
from __future__ import annotations

import csv
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._text import csv_cell
from ..backbones import create_backbone, image_size
from ..methods import get_method
from ..provenance import device_name
from ..sweep.plan import parse_sets
from ..train.build import parameter_summary
from ..train.fused import FusedModel
from ..train.loop import autocast, train_step
from ..train.optim import build_optimizer
from .peaks import mfu_pct, peak_tflops

COLUMNS = ["method", "variant", "backbone", "device", "precision", "compile", "batch_size", "img_size", "tokens",
           "train_step_ms", "train_images_per_s", "eval_images_per_s", "eval_vs_plain", "peak_memory_mb",
           "memory_kind", "gflops_forward_per_image", "gflops_train_per_image", "train_mfu_pct", "eval_mfu_pct",
           "trainable_params", "tuned_total_pct", "train_time_vs_full", "torch", "repeats", "train_spread_pct",
           "eval_spread_pct"]
# repeats: measurement rounds (the methods in order, then in reverse order, alternately: the baselines are measured
# first and last); each timing is the median over the rounds of each round's median step; *_spread_pct: the spread
# (max − min) / median of the round medians, or of the timed steps with one round: above SPREAD_WARN_PCT the
# machine was not steady (another job, frequency scaling) and the row says so in the log
SPREAD_WARN_PCT = 20.0
# variant: "" for the model as trained; "fused-<K>": K configurations trained as one model (images/s count
# configuration-images: K x batch per fused step); otherwise one of the model's inference variants
# ("merged": folded into a plain timm ViT; "compacted": pruned prompts removed), measured for inference
# only. eval_vs_plain: eval images/s relative to the plain backbone (the linear probe's merged model) in
# the same conditions.


@dataclass
class BenchSettings:
    methods: list[str]
    backbone: str = "vit_base_patch16_224"
    batch_size: int = 64
    device: str = "cpu"
    num_classes: int = 100
    warmup: int = 2
    steps: int = 5
    compile: bool = False  # the first combination's (``compiles`` lists them all)
    precision: str = "fp32"  # fp32 | tf32 | bf16 | fp16: the first combination's (``precisions`` lists them all)
    sets: tuple[str, ...] = ()
    baseline: str = "full"  # train_time_vs_full is relative to this method
    precisions: tuple[str, ...] = ()  # one set of rows per precision x compile (default: (precision,))
    compiles: tuple[bool, ...] = ()  # (default: (compile,))
    variants: bool = True  # also measure each model's inference variants
    peak_tflops: float | None = None  # overrides bench/peaks.py for MFU
    fuse: tuple[int, ...] = ()  # one fused-<K> row per K for each fusable method (uncompiled combinations)
    repeats: int = 2  # measurement rounds, alternately in order and reversed (see COLUMNS)

    def combinations(self) -> list[tuple[str, bool]]:
        return [(p, c) for p in (self.precisions or (self.precision,)) for c in (self.compiles or (self.compile,))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread_pct(values: list[float]) -> float:
    """(max − min) / median, in %; 0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    med = statistics.median(values)
    return 100.0 * (max(values) - min(values)) / med if med > 0 else 0.0


def _median_time(fn, warmup: int, steps: int, device: torch.device) -> float:
    return _timed(fn, warmup, steps, device)[0]


def _timed(fn, warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(median seconds of the timed steps, their spread in %), after ``warmup`` untimed steps."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), spread_pct(times)


def load_warning(device: torch.device) -> str:
    """A warning line when the machine's 1-minute load average exceeds its cores (CPU timings then measure the other
    jobs too); empty otherwise, or where the load average is unknown."""
    import os

    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return ""
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may use (affinity, cgroups' cpusets)
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    if load > cores:
        return (f"warning: the load average {load:.1f} exceeds the {cores} cores: other work shares this machine and "
                f"the {device.type} timings are not reliable")
    return ""


def _train_step(model, forward, x, y, optimizer, device: torch.device, precision: str, hooks: bool = False):
    """One optimisation step of ``forward`` (the model, or a part of it) on a fixed batch; ``hooks``: with the model's
    per-step hooks, as the loop runs them (a method's extra loss, e.g. MoSA's second forward, and ``after_step``)."""
    extra = model.step_loss if hooks and model.has_step_hooks() else None
    count = [0]

    def step():
        model.train()
        train_step(forward, x, y, optimizer, device, precision, extra_loss=extra)
        if extra is not None:
            model.after_step(count[0])
            count[0] += 1

    return step


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    # torch's counter knows the CUDA attention kernels but not the CPU one: count it with the same formula
    aten = torch.ops.aten
    cpu_sdpa = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v),
    }
    counter = FlopCounterMode(display=False, custom_mapping=cpu_sdpa)
    with counter:
        fn()
    return counter.get_total_flops()


def build(method_name: str, s: BenchSettings):
    method = get_method(method_name)
    method.check_backbone(s.backbone)
    # the bench's --set values go to the methods that have the option (e.g. prompt_tokens), over the method's
    # own bench options (a typical selection for methods whose cost depends on one: Method.bench_options)
    opts = method.parse_options({**method.bench_options, **parse_sets(list(s.sets), [method], strict=False)[method.name]})
    opts, _ = method.resolve_options(opts, None)
    torch.manual_seed(0)
    model = method.build(create_backbone(s.backbone, pretrained=False), s.num_classes, opts)
    return method, model


def _peak(device: torch.device, precision: str, s: BenchSettings) -> float | None:
    if s.peak_tflops:
        return s.peak_tflops
    return peak_tflops(torch.cuda.get_device_name(device), precision) if device.type == "cuda" else None


def _eval_fn(forward, x, device: torch.device, precision: str):
    @torch.no_grad()
    def eval_step():
        with autocast(device, precision):
            forward(x)

    return eval_step


def bench_method(method_name: str, s: BenchSettings, precision: str | None = None,
                 compile: bool | None = None) -> list[dict]:
    """The method's row (train and eval) and one inference row per variant of its model."""
    precision = s.precision if precision is None else precision
    compile = s.compile if compile is None else compile
    device = torch.device(s.device)
    method, model = build(method_name, s)
    params = parameter_summary(model)
    model.to(device)
    size = image_size(model.backbone)
    x = torch.randn(s.batch_size, 3, size, size, device=device)
    y = torch.randint(0, s.num_classes, (s.batch_size,), device=device)
    optimizer = build_optimizer(method.recipe.optimizer, model, 1e-3, 1e-4)
    forward = torch.compile(model) if compile else model
    peak_tf = _peak(device, precision, s)
    step = _train_step(model, forward, x, y, optimizer, device, precision, hooks=True)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t_train, train_spread = _timed(step, s.warmup, s.steps, device)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated") if device.type == "cuda" \
        else (None, "n/a on cpu")
    model.eval()
    t_eval, eval_spread = _timed(_eval_fn(forward, x, device, precision), s.warmup, s.steps, device)
    fwd_flops = _flops(lambda: forward(x)) / s.batch_size  # (the counter's module tracker needs grad mode on)
    train_flops = _flops(step) / s.batch_size
    common = {"method": method.name, "backbone": s.backbone, "device": device_name(device), "precision": precision,
              "compile": compile, "batch_size": s.batch_size, "img_size": size, "torch": torch.__version__}
    rows = [{
        **common, "variant": "", "tokens": _tokens(model, x[:1]), "train_step_ms": round(t_train * 1000, 2),
        "train_images_per_s": round(s.batch_size / t_train, 2), "eval_images_per_s": round(s.batch_size / t_eval, 2),
        "peak_memory_mb": round(peak[0], 1) if peak[0] is not None else "", "memory_kind": peak[1],
        "gflops_forward_per_image": round(fwd_flops / 1e9, 6), "gflops_train_per_image": round(train_flops / 1e9, 6),
        "train_mfu_pct": mfu_pct(train_flops / 1e9, s.batch_size / t_train, peak_tf),
        "eval_mfu_pct": mfu_pct(fwd_flops / 1e9, s.batch_size / t_eval, peak_tf),
        "trainable_params": params["trainable"], "tuned_total_pct": round(params["tuned_total_pct"], 4),
        "repeats": 1, "train_spread_pct": round(train_spread, 1), "eval_spread_pct": round(eval_spread, 1),
    }]
    if not s.variants:
        return rows
    model.eval()
    for name, variant in model.inference_variants().items():
        variant = variant.to(device).eval()
        fwd = torch.compile(variant) if compile else variant
        t, spread = _timed(_eval_fn(fwd, x, device, precision), s.warmup, s.steps, device)
        flops = _flops(lambda: fwd(x)) / s.batch_size
        rows.append({**common, "variant": name, "tokens": _tokens(variant, x[:1]), "repeats": 1,
                     "eval_spread_pct": round(spread, 1),
                     "eval_images_per_s": round(s.batch_size / t, 2), "memory_kind": "",
                     "gflops_forward_per_image": round(flops / 1e9, 6),
                     "eval_mfu_pct": mfu_pct(flops / 1e9, s.batch_size / t, peak_tf),
                     "trainable_params": params["trainable"], "tuned_total_pct": round(params["tuned_total_pct"], 4)})
    return rows


def bench_fused(method_name: str, s: BenchSettings, k: int, precision: str | None = None) -> dict:
    """K configurations of the method trained as one model (peftbench.train.fused) on one batch: the
    fused step's time, and configuration-images per second (K × batch / step time) for train and eval."""
    precision = s.precision if precision is None else precision
    device = torch.device(s.device)
    method, model = build(method_name, s)
    params = parameter_summary(model)
    size = image_size(model.backbone)
    fused = FusedModel(model.to(device))
    optimizers = [build_optimizer(method.recipe.optimizer, model, 1e-3, 1e-4)]
    for _ in range(k - 1):
        _, other = build(method_name, s)
        fused.add(other.to(device))
        optimizers.append(build_optimizer(method.recipe.optimizer, other, 1e-3, 1e-4))
    x = torch.randn(s.batch_size, 3, size, size, device=device)
    y = torch.randint(0, s.num_classes, (s.batch_size,), device=device)
    which = list(range(k))

    def step():
        fused.base.train()
        fused.train_step(x, y, optimizers, which, device, precision)

    @torch.no_grad()
    def eval_step():
        with autocast(device, precision):
            fused.forward(x, detach=True)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t_train = _median_time(step, s.warmup, s.steps, device)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated") if device.type == "cuda" \
        else (None, "n/a on cpu")
    fused.base.eval()
    t_eval = _median_time(eval_step, s.warmup, s.steps, device)
    images = k * s.batch_size
    fwd_flops = _flops(lambda: fused.forward(x)) / images
    train_flops = _flops(step) / images
    peak_tf = _peak(device, precision, s)
    return {"method": method.name, "variant": f"fused-{k}", "backbone": s.backbone, "device": device_name(device),
            "precision": precision, "compile": False, "batch_size": s.batch_size, "img_size": size,
            "tokens": _tokens(model, x[:1]), "train_step_ms": round(t_train * 1000, 2),
            "train_images_per_s": round(images / t_train, 2), "eval_images_per_s": round(images / t_eval, 2),
            "peak_memory_mb": round(peak[0], 1) if peak[0] is not None else "", "memory_kind": peak[1],
            "gflops_forward_per_image": round(fwd_flops / 1e9, 6), "gflops_train_per_image": round(train_flops / 1e9, 6),
            "train_mfu_pct": mfu_pct(train_flops / 1e9, images / t_train, peak_tf),
            "eval_mfu_pct": mfu_pct(fwd_flops / 1e9, images / t_eval, peak_tf),
            "trainable_params": params["trainable"], "tuned_total_pct": round(params["tuned_total_pct"], 4),
            "torch": torch.__version__}


def _tokens(model, x) -> int:
    """Tokens per image entering the first transformer block (prompts included), read with forward hooks: the
    block's input (B, N, C), or a Swin block's (B, H, W, C); a model that runs the block's parts itself (the
    prompted Swin) is counted at the block's first norm, every call of it summed (window tokens + prompts)."""
    block = next(m for n, m in model.named_modules() if n == "blocks.0" or n.endswith(".blocks.0"))
    seen: list[int] = []
    normed: list[int] = []

    def count(t) -> int:
        return int(t[0].numel() // t.shape[-1])  # per image: every position before the channels

    norm1 = next(m for n, m in block.named_modules() if n == "norm1" or n.endswith(".norm1"))  # (a wrapped block's too)
    handles = [block.register_forward_pre_hook(lambda m, a: seen.append(count(a[0]))),
               norm1.register_forward_pre_hook(lambda m, a: normed.append(count(a[0])))]
    with torch.no_grad():
        model.eval()
        model(x)
    for h in handles:
        h.remove()
    return seen[0] if seen else sum(normed)


def cached_linear_probe(s: BenchSettings, epochs: int = 100, num_images: int = 1000) -> dict:
    """Linear probe over a whole protocol (``epochs`` × ``num_images``): through the backbone every
    epoch vs one feature pass then the head on cached features. Returns both times and the ratio."""
    device = torch.device(s.device)
    _, model = build("linear", s)
    model.to(device)
    size = image_size(model.backbone)
    x = torch.randn(s.batch_size, 3, size, size, device=device)
    y = torch.randint(0, s.num_classes, (s.batch_size,), device=device)
    optimizer = build_optimizer("sgd", model, 0.1, 0.0)

    @torch.no_grad()
    def features():
        model.eval()
        with autocast(device, s.precision):
            return model.features(x).float()

    t_backbone = _median_time(_train_step(model, model, x, y, optimizer, device, s.precision), s.warmup, s.steps,
                              device)
    t_features = _median_time(features, s.warmup, s.steps, device)
    head_step = _train_step(model, model.head, features(), y, optimizer, device, s.precision)
    t_head = _median_time(head_step, s.warmup, max(s.steps, 20), device)
    batches = num_images / s.batch_size
    through = epochs * batches * t_backbone
    cached = batches * t_features + epochs * batches * t_head
    return {"epochs": epochs, "num_images": num_images, "through_backbone_s": through, "cached_features_s": cached,
            "speedup": through / cached}


def combine_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One method's rows measured in several rounds (the same rows each time) → one set: each timing the median over
    the rounds, its spread over the rounds."""
    out = []
    for i, first in enumerate(rounds[0]):
        same = [r[i] for r in rounds]
        row = dict(first, repeats=len(rounds))
        for key in ("train_step_ms", "eval_images_per_s"):
            values = [float(r[key]) for r in same if r.get(key) not in (None, "")]
            if values:
                row[key] = round(statistics.median(values), 2)
                if len(values) > 1:  # (one round: the spread of its timed steps stays)
                    row[key.split("_")[0] + "_spread_pct"] = round(spread_pct(values), 1)
        if row.get("train_step_ms") not in (None, ""):
            ms = float(row["train_step_ms"])
            row["train_images_per_s"] = round(row["batch_size"] / (ms / 1000), 2)
            if first.get("train_mfu_pct") not in (None, ""):  # MFU scales with the throughput
                row["train_mfu_pct"] = round(float(first["train_mfu_pct"]) * float(first["train_step_ms"]) / ms, 2)
        if first.get("eval_mfu_pct") not in (None, "") and float(first["eval_images_per_s"]) > 0:
            row["eval_mfu_pct"] = round(float(first["eval_mfu_pct"]) * float(row["eval_images_per_s"])
                                        / float(first["eval_images_per_s"]), 2)
        out.append(row)
    return out


def run_bench(s: BenchSettings, log=print) -> list[dict]:
    rows = []
    device = torch.device(s.device)
    for line in filter(None, [load_warning(device)]):
        log(line)
    for precision, compile in s.combinations():
        block = []
        rounds: dict[str, list[list[dict]]] = {name: [] for name in s.methods}
        # the baselines (train_time_vs_full's, eval_vs_plain's) lead the order, so that alternate rounds measure them
        # first and last
        lead = [m for m in s.methods if get_method(m).name in (get_method(s.baseline).name, "linear")]
        methods = lead + [m for m in s.methods if m not in lead]
        for r in range(max(1, s.repeats)):
            order = methods if r % 2 == 0 else list(reversed(methods))
            for name in order:
                log(f"bench {name} on {s.backbone} ({s.device}, batch {s.batch_size}, {precision}"
                    f"{', compiled' if compile else ''}"
                    + (f", round {r + 1}/{s.repeats}" if s.repeats > 1 else "") + ") ...")
                rounds[name].append(bench_method(name, s, precision, compile))
        for name in s.methods:
            measured = combine_rounds(rounds[name])
            for r in measured:
                if r["variant"]:
                    log(f"  {r['variant']}: eval {r['eval_images_per_s']} img/s, {r['gflops_forward_per_image']} "
                        f"GFLOP/img, tokens {r['tokens']}")
                else:
                    log(f"  train {r['train_images_per_s']} img/s ({r['train_step_ms']} ms/step), eval "
                        f"{r['eval_images_per_s']} img/s, {r['gflops_train_per_image']} GFLOP/img train, "
                        f"tokens {r['tokens']}")
            block += measured
            if not compile and get_method(name).fusable:
                for k in s.fuse:
                    r = bench_fused(name, s, k, precision)
                    own = measured[0]["train_images_per_s"]
                    log(f"  fused-{k}: train {r['train_images_per_s']} configuration-images/s ({r['train_step_ms']} ms "
                        f"per fused step, {r['train_images_per_s'] / own:.2f} x one run's), eval {r['eval_images_per_s']}")
                    block.append(r)
            elif not compile and s.fuse:
                log(f"  (not fusable: no fused rows for {name})")
            for r in measured:
                worst = max(float(r.get("train_spread_pct") or 0), float(r.get("eval_spread_pct") or 0))
                if worst > SPREAD_WARN_PCT:
                    log(f"  warning: {name}{' ' + r['variant'] if r['variant'] else ''}: its timings spread by "
                        f"{worst:.0f} % (> {SPREAD_WARN_PCT:.0f} %): the machine was not steady; rerun it, or raise "
                        "--repeats / --steps")
        base = next((r for r in block if r["method"] == get_method(s.baseline).name and not r["variant"]), None)
        plain = next((r for r in block if r["method"] == "linear" and r["variant"] == "merged"), None)
        for r in block:
            if not r["variant"]:
                r["train_time_vs_full"] = round(r["train_step_ms"] / base["train_step_ms"], 3) if base else ""
            r["eval_vs_plain"] = round(r["eval_images_per_s"] / plain["eval_images_per_s"], 3) if plain else ""
        rows += block
    return rows


def table_path(out_dir: Path, device: str, backbone: str, gpu: str | None = None) -> Path:
    """Conditions in the file name, as timm's benchmark CSVs do: bench-cpu-<backbone>.csv, and
    bench-cuda-<gpu>-<backbone>.csv when the GPU's name is given (e.g. bench-cuda-h100-80gb-hbm3-...)."""
    dev = "cuda" if device.startswith("cuda") else "cpu"
    if dev == "cuda" and gpu:
        dev += "-" + re.sub(r"[^a-z0-9]+", "-", gpu.lower().replace("nvidia", "")).strip("-")
    return Path(out_dir) / f"bench-{dev}-{backbone.replace('/', '_')}.csv"


def write_table(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:  # text cells never read as a spreadsheet formula (peftbench._text.csv_cell)
            w.writerow({k: csv_cell(v) if isinstance(v, str) else v for k, v in ((k, r.get(k, "")) for k in COLUMNS)})


def read_table(path: Path) -> dict:
    """Training rows (variant "") by method and by (method, precision): uncompiled rows first, then the
    first row of each key (tables of the 0.1 bench call the precision column ``amp``)."""
    out: dict = {}
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if not r.get("variant")]
    for row in sorted(rows, key=lambda r: r.get("compile") == "True"):
        out.setdefault(row["method"], row)
        out.setdefault((row["method"], row.get("precision") or row.get("amp") or "fp32"), row)
    return out


@dataclass(frozen=True)
class Target:
    """A speed target as data: ``numerator``'s train step ≤ ``limit`` × ``denominator``'s."""

    numerator: str
    denominator: str
    limit: float
    same_tokens: bool = False  # the ratio is only fair when both see the same number of tokens


# the project's speed targets (README, "Speed and memory")
TARGETS = (
    Target("vpt-deep", "full", 0.75), Target("e2vpt", "full", 0.75), Target("adapter", "full", 0.75),
    Target("lora", "full", 0.75), Target("e2vpt", "vpt-deep", 1.1, same_tokens=True),
)
FUSED_TARGET = 1.5  # K configurations fused: at least this many times one run's images/s (issue 16)
MERGED_TARGET = 0.95  # a merged model runs at the plain backbone's speed (within timing noise)
PROBE_TARGET = 20.0  # cached-features linear probe at least this many times faster than through the backbone


def targets(rows: list[dict], probe: dict | None, table: tuple[Target, ...] = TARGETS) -> list[dict]:
    """The targets, as measured ratios (met or not)."""
    first = rows[0] if rows else {}
    same = [r for r in rows if (r.get("precision"), r.get("compile")) == (first.get("precision"), first.get("compile"))]
    by = {r["method"]: r for r in same if not r.get("variant")}
    out = []
    for t in table:
        if t.numerator in by and t.denominator in by:
            a, b = by[t.numerator], by[t.denominator]
            ratio = a["train_step_ms"] / b["train_step_ms"]
            note = "" if not t.same_tokens or a["tokens"] == b["tokens"] else " (token counts differ!)"
            out.append({"target": f"{t.numerator} train step <= {t.limit:g} x {t.denominator}{note}",
                        "measured": round(ratio, 3), "met": ratio <= t.limit})
    plain = next((r for r in same if r["method"] == "linear" and r.get("variant") == "merged"), None)
    for r in same:
        if plain and r.get("variant") == "merged" and r is not plain:
            ratio = r["eval_images_per_s"] / plain["eval_images_per_s"]
            out.append({"target": f"{r['method']} merged inference >= {MERGED_TARGET:g} x the plain backbone's images/s",
                        "measured": round(ratio, 3), "met": ratio >= MERGED_TARGET})
    for r in same:
        fused = r.get("variant") or ""
        if fused.startswith("fused-") and r["method"] in by:
            ratio = r["train_images_per_s"] / by[r["method"]]["train_images_per_s"]
            out.append({"target": f"{r['method']} {fused} train configuration-images/s >= {FUSED_TARGET:g} x one run's",
                        "measured": round(ratio, 3), "met": ratio >= FUSED_TARGET})
    if probe:
        out.append({"target": f"linear probe via cached features >= {PROBE_TARGET:g} x faster than through the backbone",
                    "measured": round(probe["speedup"], 1), "met": probe["speedup"] >= PROBE_TARGET})
    return out
