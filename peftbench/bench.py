"""Speed and memory per method: train-step and eval throughput, peak memory, FLOPs per image.

Measured on random weights of the chosen architecture (the weights do not change the cost), at a
fixed batch size, after warm-up, as medians over timed steps. The linear probe is also measured
through cached features (one forward pass per image, then the head trains on the features), the way
the engine runs it, and compared with training it through the backbone over a whole protocol.
"""
from __future__ import annotations

import csv
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .backbone import create_backbone, image_size
from .engine import parameter_summary
from .method import get_method
from .optim import build_optimizer

COLUMNS = ["method", "backbone", "device", "batch_size", "img_size", "tokens", "train_step_ms", "train_images_per_s",
           "eval_images_per_s", "peak_memory_mb", "memory_kind", "gflops_forward_per_image",
           "gflops_train_per_image", "trainable_params", "tuned_total_pct", "train_time_vs_full", "amp", "compile",
           "torch"]


@dataclass
class BenchSettings:
    methods: list[str]
    backbone: str = "vit_base_patch16_224"
    batch_size: int = 64
    device: str = "cpu"
    num_classes: int = 100
    warmup: int = 2
    steps: int = 5
    compile: bool = False
    amp: bool | None = None  # bf16 autocast; None = on for CUDA
    sets: tuple[str, ...] = ()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def _median_time(fn, warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _train_step(model, forward, x, y, optimizer, device: torch.device, amp: bool):
    """One optimisation step of ``forward`` (the model, or a part of it) on a fixed batch."""

    def step():
        model.train()
        with _autocast(device, amp):
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

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
    from .sweep import parse_sets

    method = get_method(method_name)
    # the bench's --set values go to the methods that have the option (e.g. prompt_tokens)
    mine = [x for x in s.sets if x.split("=", 1)[0].rsplit(".", 1)[-1] in method.options
            and ("." not in x.split("=", 1)[0] or get_method(x.split("=", 1)[0].rsplit(".", 1)[0]) is method)]
    opts = method.parse_options(parse_sets(mine, [method])[method.name])
    opts, _ = method.resolve_options(opts, None)
    torch.manual_seed(0)
    model = method.build(create_backbone(s.backbone, pretrained=False), s.num_classes, opts)
    return method, model


def bench_method(method_name: str, s: BenchSettings) -> dict:
    device = torch.device(s.device)
    amp = (device.type == "cuda") if s.amp is None else s.amp
    method, model = build(method_name, s)
    params = parameter_summary(model)
    model.to(device)
    size = image_size(model.backbone)
    x = torch.randn(s.batch_size, 3, size, size, device=device)
    y = torch.randint(0, s.num_classes, (s.batch_size,), device=device)
    optimizer = build_optimizer(method.recipe.optimizer, model, 1e-3, 1e-4)
    forward = torch.compile(model) if s.compile else model

    train_step = _train_step(model, forward, x, y, optimizer, device, amp)

    @torch.no_grad()
    def eval_step():
        model.eval()
        with _autocast(device, amp):
            forward(x)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t_train = _median_time(train_step, s.warmup, s.steps, device)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated") if device.type == "cuda" \
        else (None, "n/a on cpu")
    t_eval = _median_time(eval_step, s.warmup, s.steps, device)
    model.eval()
    fwd_flops = _flops(lambda: forward(x))  # (the counter's module tracker needs grad mode on)
    train_flops = _flops(train_step)
    tokens = _tokens(model, x[:1])
    return {
        "method": method.name, "backbone": s.backbone, "device": _device_label(device), "batch_size": s.batch_size,
        "img_size": size, "tokens": tokens, "train_step_ms": round(t_train * 1000, 2),
        "train_images_per_s": round(s.batch_size / t_train, 2), "eval_images_per_s": round(s.batch_size / t_eval, 2),
        "peak_memory_mb": round(peak[0], 1) if peak[0] is not None else "", "memory_kind": peak[1],
        "gflops_forward_per_image": round(fwd_flops / s.batch_size / 1e9, 6),
        "gflops_train_per_image": round(train_flops / s.batch_size / 1e9, 6),
        "trainable_params": params["trainable"], "tuned_total_pct": round(params["tuned_total_pct"], 4),
        "amp": "bf16" if amp and device.type == "cuda" else "fp32", "compile": s.compile,
        "torch": torch.__version__,
    }


def _tokens(model, x) -> int:
    """Sequence length entering the blocks (prompts included), read with a forward hook."""
    seen = []
    handle = model.backbone.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    with torch.no_grad():
        model.eval()
        model(x)
    handle.remove()
    return seen[0]


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}t"


def cached_linear_probe(s: BenchSettings, epochs: int = 100, num_images: int = 1000) -> dict:
    """Linear probe over a whole protocol (``epochs`` × ``num_images``): through the backbone every
    epoch vs one feature pass then the head on cached features. Returns both times and the ratio."""
    device = torch.device(s.device)
    amp = (device.type == "cuda") if s.amp is None else s.amp
    _, model = build("linear", s)
    model.to(device)
    size = image_size(model.backbone)
    x = torch.randn(s.batch_size, 3, size, size, device=device)
    y = torch.randint(0, s.num_classes, (s.batch_size,), device=device)
    optimizer = build_optimizer("sgd", model, 0.1, 0.0)

    @torch.no_grad()
    def features():
        model.eval()
        with _autocast(device, amp):
            return model.features(x).float()

    t_backbone = _median_time(_train_step(model, model, x, y, optimizer, device, amp), s.warmup, s.steps, device)
    t_features = _median_time(features, s.warmup, s.steps, device)
    head_step = _train_step(model, model.head, features(), y, optimizer, device, amp)
    t_head = _median_time(head_step, s.warmup, max(s.steps, 20), device)
    batches = num_images / s.batch_size
    through = epochs * batches * t_backbone
    cached = batches * t_features + epochs * batches * t_head
    return {"epochs": epochs, "num_images": num_images, "through_backbone_s": through, "cached_features_s": cached,
            "speedup": through / cached}


def run_bench(s: BenchSettings, log=print) -> list[dict]:
    rows = []
    for name in s.methods:
        log(f"bench {name} on {s.backbone} ({s.device}, batch {s.batch_size}) ...")
        rows.append(bench_method(name, s))
        r = rows[-1]
        log(f"  train {r['train_images_per_s']} img/s ({r['train_step_ms']} ms/step), eval {r['eval_images_per_s']}"
            f" img/s, {r['gflops_train_per_image']} GFLOP/img train, tokens {r['tokens']}")
    full = next((r for r in rows if r["method"] == "full"), None)
    for r in rows:
        r["train_time_vs_full"] = round(r["train_step_ms"] / full["train_step_ms"], 3) if full else ""
    return rows


def table_path(out_dir: Path, device: str, backbone: str) -> Path:
    """Conditions in the file name, as timm's benchmark CSVs do: results/bench-<device>-<backbone>.csv."""
    dev = "cuda" if device.startswith("cuda") else "cpu"
    return Path(out_dir) / f"bench-{dev}-{backbone.replace('/', '_')}.csv"


def write_table(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})


def read_table(path: Path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {row["method"]: row for row in csv.DictReader(fh)}


def targets(rows: list[dict], probe: dict | None) -> list[dict]:
    """The issue's targets, as measured ratios (met or not)."""
    by = {r["method"]: r for r in rows}
    out = []
    full = by.get("full")
    for m in ("vpt-deep", "e2vpt", "adapter", "lora"):
        if full and m in by:
            ratio = by[m]["train_step_ms"] / full["train_step_ms"]
            out.append({"target": f"{m} train step <= 0.75 x full", "measured": round(ratio, 3), "met": ratio <= 0.75})
    if "e2vpt" in by and "vpt-deep" in by:
        ratio = by["e2vpt"]["train_step_ms"] / by["vpt-deep"]["train_step_ms"]
        same = by["e2vpt"]["tokens"] == by["vpt-deep"]["tokens"]
        out.append({"target": "e2vpt train step <= 1.1 x vpt-deep" + ("" if same else " (token counts differ!)"),
                    "measured": round(ratio, 3), "met": ratio <= 1.1})
    if probe:
        out.append({"target": "linear probe via cached features >= 20 x faster than through the backbone",
                    "measured": round(probe["speedup"], 1), "met": probe["speedup"] >= 20})
    return out
