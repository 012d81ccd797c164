"""``spt-lora`` and ``spt-adapter``: Sensitivity-aware visual Parameter-efficient fine-Tuning (He et al., ICCV 2023),
docs/methods/spt.md.

Stages (every one an ordinary run of the store, :meth:`_Spt.pipeline`):

1. ``sensitivity`` (job, no training): pretrained backbone + fresh head, train mode (stochastic depth 0.1),
   the first 16 batches of 32 images of train800 in file order, cross-entropy; per entry the sum over the
   batches of the squared gradient. The official budget sweep (τ = 0.02·j M, j = 1..79, per tensor
   structured / full vector / unstructured) gives one selection per target budget B ∈ {1.0, 0.8, 0.6, 0.4,
   0.2, 0.1, 0.05} M: the record holds their structure, ``<key>.selection-<B>.safetensors`` their entries.
2. ``search``: every (lr, wd) point × budget B ∈ {0.2, 0.4, 0.6, 0.8} (the author's per-task choice on
   validation data, ziplab/SPT#1) on train800 → val200; best last-epoch val top-1.
3. ``final``: the chosen budget and (lr, wd), every seed, train800val200 → test.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from peftbench._io import atomic_write
from peftbench.data.loader import batches
from peftbench.data.transforms import augmenter
from peftbench.errors import OptionError, PipelineError
from peftbench.methods import Method, Option, Recipe, register_method
from peftbench.sweep.stages import chosen, final_stage, job_stage, search_stage
from peftbench.train.engine import job_inputs, normalizer_for

from .model import STRUCTURED_INITS, SptModel, delta_layout, index_buffer_key
from .sensitivity import OPS, TARGET_BUDGETS, spt_tensors, sweep, unstructured_indices

SEARCH_BUDGETS = (0.2, 0.4, 0.6, 0.8)
DEMO_BUDGET = 0.4  # a reduced search (demo protocol): one budget
VIT_B_CANDIDATES = 85_056_000  # ViT-B/16 without patch embedding, position embedding and cls token
RELEASED = Path(__file__).with_name("released_masks.json")
# official schedule: absolute lr, warm-up from 1e-6, cosine to 1e-5 (timm CosineLRScheduler)
SCHEDULE = {"lr_scaling": False, "warmup_lr": 1e-6, "min_lr": 1e-5}
SPT_RECIPE = Recipe(optimizer="adamw", batch_size=64, epochs=100, warmup_epochs=10, lr_grid=(0.001,),
                    wd_grid=(0.0001,)).for_protocol("demo", lr=0.016, wd=0.0001, batch_size=64)
# demo lr: the best mean val200 top-1 of 0.001 (the official rate), 0.004, 0.016 over the five demo tasks, for
# SPT-LoRA and SPT-Adapter alike (results/demo-hparam-search.csv): the top of that grid
SELECTION_OPTIONS = ("low_rank_dim", "alpha", "beta", "drop_path", "sensitivity_batches", "sensitivity_batch_size")


def released_selection(ref: str, kind: str) -> dict:
    """``released:[lora:|adapter:]<task>@<budget>``: the shape of an official released mask
    (methods/spt/released_masks.json: structured matrices, vectors, entry counts; no entries)."""
    body = ref.split(":", 1)[1]
    key = body if body.startswith(("lora:", "adapter:")) else f"{kind}:{body}"
    data = json.loads(RELEASED.read_text())
    if key not in data["masks"]:
        known = sorted({k.split(":", 1)[1].split("@")[0] for k in data["masks"]})
        raise OptionError(f"option 'selection': no released SPT mask {key!r} (tasks: {', '.join(known)}; budgets "
                          f"{', '.join(map(str, SEARCH_BUDGETS))})")
    m, names = data["masks"][key], data["tensors"]
    flags = m["s"]
    structured = [f"blocks.{i // len(OPS)}.{OPS[i % len(OPS)]}" for i, f in enumerate(flags) if f == "1"]
    return {"structured": structured, "vectors": [names[i] for i in m["v"]],
            "unstructured": {names[i]: c for i, c in enumerate(m["u"]) if c}, "params": m["params"],
            "from": f"released mask {key} (ziplab/SPT, entries not shipped: counts and speed only)"}


def _selection(value, kind: str) -> dict | None:
    if value in (None, "", "none", "None"):
        return None
    if isinstance(value, str):
        if value.startswith("released:"):
            return released_selection(value, kind)
        raise OptionError(f"option 'selection': {value!r} is not 'released:<task>@<budget>' (the pipeline sets it)")
    return value


class _Spt(Method):
    kind = "lora"
    version = 2  # 2: selection artifacts name a wrapped Linear's deltas under ``.base`` (version 1's failed to load)
    fusable = True  # the search runs share one selection (frozen index buffers, stored once)
    recipe = SPT_RECIPE
    bench_options = {"selection": "released:cifar100@0.4"}  # a real selection's shape (docs/methods/spt.md §7)
    options = {
        "budget": Option("search", "parameter budget B in M (ViT-B/16 scale; search: chosen on val among 0.2, 0.4, "
                                   "0.6, 0.8; or one of 1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05)", type=float,
                         keywords=("search",)),
        "selection": Option(None, "the tuned entries (set by the pipeline; released:<task>@<B> builds a released "
                                  "mask's shape for `peftbench params` / `bench`)", type=str),
        "low_rank_dim": Option(8, "rank of the LoRA / adapter bottleneck", min=1),
        "alpha": Option(10.0, "a matrix is tuned structurally when its sensitive entries reach cost/alpha", min=0.0),
        "beta": Option(5.0, "a vector is tuned in full when its sensitive entries reach len/beta", min=0.0),
        "drop_path": Option(0.1, "stochastic depth of the backbone (sensitivity and training)", min=0.0, max=1.0),
        "structured_dropout": Option(0.1, "dropout on the structured modules' inputs (train mode)", min=0.0, max=1.0),
        "structured_drop_path": Option(0.1, "stochastic depth on the structured modules' outputs", min=0.0, max=1.0),
        "structured_init": Option("official", "official: trunc_normal(0.02) for every structured Linear (the official "
                                              "model re-initialises them); zero: LoRA B / adapter Up = 0",
                                  choices=STRUCTURED_INITS),
        "sensitivity_batches": Option(16, "batches of the sensitivity pass", min=1),
        "sensitivity_batch_size": Option(32, "batch size of the sensitivity pass", min=1),
    }

    def resolve_options(self, opts, task):
        opts = dict(opts)
        if opts["budget"] != "search" and float(opts["budget"]) not in TARGET_BUDGETS:
            raise OptionError(f"option 'budget': {opts['budget']!r} is not 'search' or one of "
                              f"{', '.join(map(str, TARGET_BUDGETS))}")
        _selection(opts.get("selection"), self.kind)  # checked before compute
        return opts, {}

    def build(self, backbone, num_classes, opts):
        return SptModel(backbone, num_classes, self.kind, _selection(opts.get("selection"), self.kind),
                        rank=int(opts.get("low_rank_dim", 8)), drop_path=float(opts.get("drop_path", 0.1)),
                        structured_dropout=float(opts.get("structured_dropout", 0.1)),
                        structured_drop_path=float(opts.get("structured_drop_path", 0.1)),
                        init=str(opts.get("structured_init", "official")))

    # -- the pipeline -----------------------------------------------------------------------
    def pipeline(self, ctx, protocol):
        opts = dict(ctx.options)
        if isinstance(opts.get("selection"), str) and opts["selection"].startswith("released:"):
            raise PipelineError("selection=released:... has no entries (counts and speed only); runs compute their own")
        sources = dict(ctx.option_sources)
        sources["schedule"] = "SPT: absolute lr, warm-up from 1e-6, cosine to 1e-5 (docs/methods/spt.md §4)"

        def spec(stage, role, hp, seed, **kw):
            return dataclasses.replace(ctx.spec(stage, role, hp, seed, **kw), option_sources=dict(sources))

        seed0 = ctx.seeds[0]
        job = spec("sensitivity", "search", {"batch_size": int(opts["sensitivity_batch_size"])}, seed0,
                   job="sensitivity", options={k: opts[k] for k in SELECTION_OPTIONS})
        records = yield from job_stage(ctx, [job], "sensitivity")
        if records is None:  # a dry run: placeholder selections
            selections = {str(b): {"structured": [], "vectors": [], "unstructured": {}} for b in TARGET_BUDGETS}
        elif not records[0].get("selections"):
            raise PipelineError(f"stage sensitivity did not finish: its record {job.key} has no selections")
        else:
            selections = records[0].get("selections")
        available = {float(b) for b in selections}
        if opts["budget"] != "search":
            budgets = (float(opts["budget"]),)
        elif protocol.reduced_search:
            budgets = (DEMO_BUDGET,)
            sources["budget"] = f"{protocol.name} protocol: reduced search, budget {DEMO_BUDGET} (full: {SEARCH_BUDGETS})"
        else:
            budgets = SEARCH_BUDGETS
        missing = [b for b in budgets if b not in available]
        budgets = tuple(b for b in budgets if b in available)
        if missing:
            sources["budget"] = f"no selection within the budget(s) {missing} (official sweep): searched {list(budgets)}"
        if not budgets:
            raise PipelineError(f"the sensitivity sweep met none of the budgets {missing}")

        def run_opts(b):
            return {**opts, "budget": b, "selection": {**selections[str(b)], "budget": b, "from": job.key}}

        def extras(b):
            return {"init_state": f"{job.key}.selection-{b}.safetensors"}

        base_s = {**protocol.base_hparams(ctx, "search"), **SCHEDULE}
        base_f = {**protocol.base_hparams(ctx, "final"), **SCHEDULE}
        grid = [(b, p) for b in budgets for p in protocol.search_points(ctx)]  # every budget x every (lr, wd)
        points = [p for _, p in grid]
        b_star, choice = grid[0][0], dict(points[0])
        if len(grid) > 1:
            best = yield from search_stage(ctx, points, base_s, lambda stage, hp, i: spec(
                stage, "search", hp, seed0, options=run_opts(grid[i][0]), extras=extras(grid[i][0])))
            b_star, choice = float(best.spec["options"]["budget"]), chosen(best)
        yield from final_stage(ctx, {**base_f, **choice}, lambda stage, hp, seed: spec(
            stage, "final", hp, seed, options=run_opts(b_star), extras=extras(b_star)))

    # -- stage 1 -----------------------------------------------------------------------------
    def run_job(self, job, spec, store, env):
        if job != "sensitivity":
            return super().run_job(job, spec, store, env)
        from safetensors.torch import save_file

        dev, task, model, params, data, size = job_inputs(spec, store, env)
        bs = int(spec.hparams["batch_size"])
        n = min(len(data), bs * int(spec.options["sensitivity_batches"]))
        order = torch.arange(n)  # the official SequentialSampler: file order, the first batches
        tensors = spt_tensors(model.backbone)
        timm_params = dict(model.backbone.named_parameters())
        names = sorted({t.param for t in tensors})
        flags = {p: timm_params[p].requires_grad for p in names}
        acc = {p: torch.zeros_like(timm_params[p]) for p in names}
        model.train()  # stochastic depth active, as the official model.train()
        num, losses = 0, []
        try:
            for p in names:
                timm_params[p].requires_grad_(True)
            # VTAB: no augmentation (the official --no_aug); a task that augments its training split (FGVC: stored
            # larger, cropped while training) gets its training augmentation
            for x, y, _ in batches(data.images, data.labels, order, bs, prepare=normalizer_for(spec, dev),
                                   augment=augmenter(task, size), device=dev):
                model.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x).float(), y)
                loss.backward()
                for p in names:
                    acc[p] += timm_params[p].grad.detach() ** 2
                num += 1
                losses.append(float(loss.detach()))
        finally:
            for p in names:
                timm_params[p].requires_grad_(flags[p])
            model.zero_grad(set_to_none=True)
        scores = [acc[t.param].reshape(-1)[t.offset:t.offset + t.numel].cpu() for t in tensors]
        scale = sum(t.numel for t in tensors) / VIT_B_CANDIDATES
        opts = spec.options
        best, tid, pos = sweep(scores, tensors, self.kind, int(opts["low_rank_dim"]), float(opts["alpha"]),
                               float(opts["beta"]), cls_params=model.backbone.cls_token.numel(), scale=scale)
        by_name = {t.name: t for t in tensors}
        selections, artifacts = {}, {}
        for budget, a in best.items():
            structure = {"structured": a.structured, "vectors": a.vectors, "unstructured": a.unstructured,
                         "params": round(a.budget, 6), "tau": a.tau}
            entries = unstructured_indices(a, tensors, tid, pos)
            state = {}
            for pname, plist in delta_layout(by_name, structure, timm_params).items():
                idx = [t.offset + (torch.arange(k) if full else entries[t.name]) for t, k, full in plist]
                state[index_buffer_key(pname, structure)] = torch.cat(idx).long().contiguous()
            name = f"selection-{budget}.safetensors"
            atomic_write(store.artifact_path(spec, name), lambda tmp, st=state: save_file(st, str(tmp)))
            selections[str(budget)] = structure
            artifacts[str(budget)] = f"{spec.key}.{name}"
        return {"status": "ok", "params": params, "selections": selections, "artifacts": artifacts,
                "sensitivity": {"num_images": n, "num_batches": num, "mean_loss": sum(losses) / max(1, num),
                                "scale": scale, "score": "sum over batches of (dL_b/dw)^2, L_b = mean cross-entropy"}}


@register_method
class SptLora(_Spt):
    name = "spt-lora"
    description = "SPT-LoRA: sensitivity-selected LoRA matrices + vectors + sparse entries (docs/methods/spt.md)"
    kind = "lora"


@register_method
class SptAdapter(_Spt):
    name = "spt-adapter"
    description = "SPT-Adapter: sensitivity-selected adapters + vectors + sparse entries (docs/methods/spt.md)"
    kind = "adapter"
