"""``lst``: Ladder Side-Tuning on a ViT (docs/methods/lst.md), a method with stages (:meth:`Lst.pipeline`):

1. ``fisher`` (job, no training), one per training split the later stages use (train800 for the search,
   train800val200 for the final runs): the pretrained ViT with a fresh head, in eval mode, over the first
   ``fisher_samples`` images of the split (one image per step, no augmentation), the summed squared gradients of its
   Linear weights; the backbone pruned by them to the side network's widths → ``<key>.side.safetensors`` (the side
   blocks' and side norm's initial weights, loaded by the training runs with ``init_state``) and ``<key>.side.json``.
2. ``search``: the protocol's lr × wd grid on train800 → val200, with the search split's side network.
3. ``final``: the chosen point, every seed, train800val200 → test, with the final split's side network.

The official code tunes T5, BART and CLIP-T5 (ylsung/Ladder-Side-Tuning@1798e82); V-PETL Bench prints a ViT row without
code. This is the paper's ladder on a ViT, a declared generalisation: the official side network's maths, gates,
down-sampling, initialisation and pruning, with the ViT's layers in the places of T5's.
"""
from __future__ import annotations

import json

import torch

from peftbench._io import atomic_write, atomic_write_text
from peftbench.data.loader import batches, epoch_order
from peftbench.methods import Method, Option, noah_fixed_recipe, register_method
from peftbench.sweep.stages import JOB_SEES, job_then_train
from peftbench.train.engine import job_inputs, normalizer_for

from .model import LSTModel, fisher_importance, parse_side_layers, prune_side_weights

SIDE = "side.safetensors"
SOURCE = "ylsung/Ladder-Side-Tuning@1798e82"
# The unified protocols train LST as the NOAH-lineage side modules (AdamW, batch 64, 100 epochs, 10 warm-up).
# demo lr: the best mean val200 top-1 over the 5 demo tasks (results/demo-hparam-search.csv)
LST_RECIPE = noah_fixed_recipe(demo_lr=0.064)


@register_method
class Lst(Method):
    name = "lst"
    description = ("LST: a ladder side network (the ViT pruned to width D/r by Fisher information) fed by gated "
                   "down-projections of the frozen blocks' outputs, no backward through the backbone "
                   "(docs/methods/lst.md)")
    version = 1
    recipe = LST_RECIPE
    options = {
        "reduction": Option(8, "r: the side network's width is D / r (official T5-base scripts: 8)", min=1),
        "side_layers": Option("auto", "blocks with a side block, 0-based (auto: all but every fourth from 0, the "
                                      "official 1-3,5-7,9-11 on 12 blocks; all; or a list like 1-3,5)", type=str),
        "gate_t": Option(0.1, "gate temperature T: g = sigmoid(alpha / T) (official gate_T 0.1)", min=1e-6),
        "gate_alpha": Option(0.0, "initial gate parameter alpha (official gate_alpha 0: g = 0.5)"),
        "fisher_samples": Option(1024, "images of the training split whose Fisher information prunes the backbone "
                                       "into the side network (official samples_for_fisher 1024)", min=1),
    }

    def build(self, backbone, num_classes, opts):
        layers = parse_side_layers(str(opts["side_layers"]), len(backbone.blocks))
        return LSTModel(backbone, num_classes, int(opts["reduction"]), layers, float(opts["gate_t"]),
                        float(opts["gate_alpha"]))

    # -- the pipeline -----------------------------------------------------------------------
    def pipeline(self, ctx, protocol):
        # the Fisher pass also sees a head initialised as the training runs' heads
        yield from job_then_train(ctx, protocol.search_points(ctx), protocol.base_hparams(ctx, "search"),
                                  protocol.base_hparams(ctx, "final"), "fisher", SIDE, dict(ctx.option_sources),
                                  lambda role: {"batch_size": 1}, sees=(*JOB_SEES, "head_init"))

    # -- stage 1 -----------------------------------------------------------------------------
    def run_job(self, job, spec, store, env):
        if job != "fisher":
            return super().run_job(job, spec, store, env)
        from safetensors.torch import save_file

        dev, task, model, params, data, size = job_inputs(spec, store, env)
        norm = normalizer_for(spec, dev)
        n = min(len(data), int(spec.options["fisher_samples"]))
        # fisher.py:125-131: a shuffled batch-1 loader, its first num_samples images (the sum is order-free up to
        # rounding; the order is the run's first epoch's)
        order = epoch_order(spec.seed, 0, len(data))[:n]
        samples = ((x, y) for x, y, _ in batches(data.images, data.labels, order, 1, prepare=lambda x: x.to(dev),
                                                  device=dev))
        importance = fisher_importance(model, samples, norm)
        state = side_from_importance(model, importance)
        path = store.artifact_path(spec, SIDE)
        atomic_write(path, lambda tmp: save_file({k: v.cpu() for k, v in state.items()}, str(tmp),
                                                 metadata={"run": spec.key, "reduction": str(model.reduction)}))
        summary = {"task": spec.task, "run": spec.key, "reduction": model.reduction, "num_images": n,
                   "side_layers": model.side_layers,
                   "rule": "fisher-v2: Fisher information (summed squared gradients, one image per step) of the "
                           "pretrained ViT with a fresh head; per Linear the round((1-1/r)n) rows of smallest L1 "
                           "importance over the kept inputs pruned (q, k, v: the product of their importances)",
                   "tensors": {k: list(v.shape) for k, v in state.items()}}
        atomic_write_text(store.artifact_path(spec, "side.json"), json.dumps(summary, indent=1) + "\n")
        return {"status": "ok", "params": params,
                "selection": {k: v for k, v in summary.items() if k != "tensors"},
                "artifacts": {"side": f"{spec.key}.{SIDE}", "summary": f"{spec.key}.side.json"}}


def side_from_importance(model: LSTModel, importance: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The side network's initial tensors from an importance dict (what the job saves; tests and notebooks)."""
    pruned = prune_side_weights(model.backbone, importance, model.reduction)
    return {name: pruned[src].contiguous() for name, src in model.side_state_names().items()}
