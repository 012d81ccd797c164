"""``gps``: Gradient-based Parameter Selection (Zhang et al., CVPR 2024), docs/methods/gps.md.

Stages (every one an ordinary run of the store, :meth:`Gps.pipeline`):

1. ``gradients`` (job, no training), one per training split the later stages use (train800 for the
   search, train800val200 for the final runs: the selection never sees the split it is evaluated on):
   pretrained backbone + fresh head, train mode (the method's stochastic depth active), one epoch over the
   shuffled training split (drop_last), two contrastive views per image, supervised contrastive loss on
   the final CLS feature, gradients summed over the batches; for every output row of every weight
   matrix the K columns of largest |gradient| → ``<key>.selection.safetensors`` (flat indices, loaded
   by the training runs with ``init_state``).
2. ``search``: the recipe's lr grid (Adam, weight decay 0, absolute rates) on train800 → val200, with
   the search selection; best last-epoch val top-1 (tie → smaller lr).
3. ``final``: the chosen lr, every seed, train800val200 → test, with the final selection.
"""
from __future__ import annotations

import json
from pathlib import Path

from peftbench._io import atomic_write, atomic_write_text
from peftbench.data.loader import batches, epoch_order
from peftbench.methods import Method, Option, PerTask, Recipe, per_task_row, register_method
from peftbench.sweep.stages import job_then_train
from peftbench.train.engine import job_inputs, normalizer_for

from .model import GpsModel, flat_index, top_k_per_row
from .selection import accumulate_gradients, contrastive_augment

SETTINGS_FILE = Path(__file__).with_name("settings.csv")
FALLBACK_K = 1
FALLBACK_DROP_PATH = 0.0
SELECTION = "selection.safetensors"
# absolute learning rates (the official scripts' values span 1e-4 .. 1e-2), Adam = AdamW with weight decay 0
LR_GRID = (0.01, 0.005, 0.003, 0.002, 0.001, 0.0005, 0.0003, 0.0001)
# the official schedule: warm-up from 1e-7, cosine to 1e-8, absolute rates (no batch/256 scaling)
SCHEDULE = {"lr_scaling": False, "warmup_lr": 1e-7, "min_lr": 1e-8}
GPS_RECIPE = Recipe(optimizer="adamw", batch_size=32, epochs=100, warmup_epochs=10, lr_grid=LR_GRID,
                    wd_grid=(0.0,)).for_protocol("demo", lr=0.008, wd=0.0, batch_size=32)
# demo lr: the best mean val200 top-1 of 0.0005, 0.002 (the official rate), 0.008 over the five demo tasks
# (results/demo-hparam-search.csv): the top of that grid
SELECTION_OPTIONS = ("K", "drop_path")


@register_method
class Gps(Method):
    name = "gps"
    fusable = True  # the search runs share one selection (frozen index buffers, stored once)
    aliases = ("gradient-based-parameter-selection",)
    description = ("GPS: K weights per output neuron selected by contrastive-loss gradients + all biases, sparse "
                   "fine-tuning (docs/methods/gps.md)")
    recipe = GPS_RECIPE
    options = {
        "K": Option("auto", "weights tuned per output neuron of every weight matrix (official --times_para; auto: the "
                            "released per-task value, docs/methods/gps.md §4; else 1)", type=int, min=1,
                    per_task=PerTask(SETTINGS_FILE, FALLBACK_K, column="K")),
        "drop_path": Option("auto", "stochastic depth of the backbone while selecting and training (auto: the released "
                                    "per-task value; else 0)", type=float, min=0.0, max=1.0,
                            per_task=PerTask(SETTINGS_FILE, FALLBACK_DROP_PATH, column="drop_path")),
        "task_batch_size": Option(True, "use the released per-task batch size (16/32/64) under the vpt protocol unless "
                                        "--batch-size is given"),
    }

    def build(self, backbone, num_classes, opts):
        return GpsModel(backbone, num_classes, int(opts["K"]), float(opts["drop_path"]))

    # -- the pipeline -----------------------------------------------------------------------
    def pipeline(self, ctx, protocol):
        opts = dict(ctx.options)
        sources = dict(ctx.option_sources)
        sel_opts = {k: opts[k] for k in SELECTION_OPTIONS}
        base_search = {**protocol.base_hparams(ctx, "search"), **SCHEDULE}
        base_final = {**protocol.base_hparams(ctx, "final"), **SCHEDULE}
        if opts.get("task_batch_size", True) and not protocol.reduced_search and not ctx.overrides.get("batch_size"):
            row = per_task_row(SETTINGS_FILE, ctx.task)
            if row.get("batch_size", "").strip():
                value = int(row["batch_size"])
                base_search["batch_size"] = base_final["batch_size"] = value
                sources["batch_size"] = f"{value}: methods/gps/settings.csv [{ctx.task.name}]: {row.get('source', '')}"
        sources["schedule"] = "GPS: absolute lr, warm-up from 1e-7, cosine to 1e-8 (docs/methods/gps.md §4)"
        yield from job_then_train(ctx, protocol.search_points(ctx), base_search, base_final, "gradients", SELECTION,
                                  sources, lambda role: {"batch_size": (base_search if role == "search" else base_final)[
                                      "batch_size"]}, job_options=sel_opts)

    # -- stage 1 -----------------------------------------------------------------------------
    def run_job(self, job, spec, store, env):
        if job != "gradients":
            return super().run_job(job, spec, store, env)
        from safetensors.torch import save_file

        dev, task, model, params, data, size = job_inputs(spec, store, env)
        n, bs = len(data), int(spec.hparams["batch_size"])
        order = epoch_order(spec.seed, 0, n)
        if n >= bs:
            order = order[: n - n % bs]  # the training loader drops the last incomplete batch
        norm = normalizer_for(spec, dev)
        stream = ((x, y) for x, y, _ in batches(data.images, data.labels, order, bs, prepare=lambda x: x.to(dev),
                                                 device=dev))
        weights = {}
        for pname, d in model.deltas.items():
            mname, tname = pname.rsplit(".", 1)
            module = model.backbone.get_submodule(mname)
            weights[pname] = getattr(module.parametrizations, tname).original
        model.train()  # backbone frozen parts in eval mode; the method's stochastic depth active
        grads, stats = accumulate_gradients(model, weights, stream, contrastive_augment(size), norm)
        names = model.index_buffer_names()
        state, per_tensor = {}, {}
        for pname, g in grads.items():
            rows, cols = model.shapes[pname]
            columns = top_k_per_row(g, model.K)
            state[names[pname]] = flat_index(columns, cols).cpu().contiguous()
            per_tensor[pname] = {"rows": rows, "columns": cols, "selected": int(columns.numel())}
        path = store.artifact_path(spec, SELECTION)
        atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"run": spec.key, "K": str(model.K)}))
        summary = {"task": spec.task, "run": spec.key, "K": model.K, "num_images": int(len(order)), **stats,
                   "rule": "top-K |sum_b dL_b/dW| per output row; L = supervised contrastive loss (tau 0.07) of two "
                           "views; biases in full; norms, embeddings frozen",
                   "tensors": per_tensor}
        atomic_write_text(store.artifact_path(spec, "selection.json"), json.dumps(summary, indent=1) + "\n")
        return {"status": "ok", "params": params, "selection": {k: v for k, v in summary.items() if k != "tensors"},
                "artifacts": {"selection": f"{spec.key}.{SELECTION}", "summary": f"{spec.key}.selection.json"}}
