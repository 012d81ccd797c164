"""``sct``: Salient Channel Tuning (docs/methods/sct.md), a method with stages (:meth:`Sct.pipeline`):

1. ``saliency`` (job, no training), one per training split the later stages use (train800 for the search,
   train800val200 for the final runs: the selection never sees the split it is evaluated on): the pretrained ViT
   (SCT modules off, eval mode) over the training split without augmentation, the class-aware channel saliency at
   the input of every block's ``norm2``, the K largest channels per block → ``<key>.selection.safetensors``
   (loaded by the training runs with ``init_state``) and ``<key>.selection.json``.
2. ``search``: the protocol's lr × wd grid on train800 → val200, with the search selection.
3. ``final``: the chosen point, every seed, train800val200 → test, with the final selection.
"""
from __future__ import annotations

import json

import torch

from peftbench._io import atomic_write, atomic_write_text
from peftbench.data.loader import batches
from peftbench.methods import Method, Option, noah_fixed_recipe, register_method
from peftbench.sweep.stages import job_then_train
from peftbench.train.engine import job_inputs, normalizer_for

from .model import SCTModel, saliency, top_channels

SELECTION = "selection.safetensors"
SALIENCY_BATCH = 50  # showlab/SCT@384cecb train_model_sct.py:214-219 (the no-augmentation loader, batch 50)
# The unified protocols train SCT as the NOAH-lineage adapters (AdamW, batch 64, 100 epochs, 10 warm-up).
# demo lr: the best mean val200 top-1 over the 5 demo tasks (results/demo-hparam-search.csv)
SCT_RECIPE = noah_fixed_recipe(demo_lr=0.04)


def channels_for(width: int, opts) -> int:
    """K: the option, or ``auto`` = width / 8 (the official 96 of 768: run_model_sct.sh:6, the paper's 1/8)."""
    return max(1, width // 8) if opts["channels"] == "auto" else int(opts["channels"])


@register_method
class Sct(Method):
    name = "sct"
    description = ("SCT: a K x K linear map on the K most salient channels of the residual stream after every "
                   "attention, channels chosen on the training split (docs/methods/sct.md)")
    version = 1
    recipe = SCT_RECIPE
    options = {
        "channels": Option("auto", "K channels tuned per block (auto: width / 8, the official 96 on ViT-B)", type=int,
                           min=1, keywords=("auto",)),
    }

    def build(self, backbone, num_classes, opts):
        model = SCTModel(backbone, num_classes, channels_for(backbone.embed_dim, opts))
        return model.train_inserted([blk.linear for blk in model.sct_blocks()])

    # -- the pipeline -----------------------------------------------------------------------
    def pipeline(self, ctx, protocol):
        yield from job_then_train(ctx, protocol.search_points(ctx), protocol.base_hparams(ctx, "search"),
                                  protocol.base_hparams(ctx, "final"), "saliency", SELECTION, dict(ctx.option_sources),
                                  lambda role: {"batch_size": SALIENCY_BATCH})

    # -- stage 1 -----------------------------------------------------------------------------
    def run_job(self, job, spec, store, env):
        if job != "saliency":
            return super().run_job(job, spec, store, env)
        from safetensors.torch import save_file

        dev, task, model, params, data, size = job_inputs(spec, store, env)
        norm = normalizer_for(spec, dev)
        order = torch.arange(len(data))  # every image once, in file order (the score is a sum: the order is moot)
        stream = ((x, y) for x, y, _ in batches(data.images, data.labels, order, int(spec.hparams["batch_size"]),
                                                 prepare=lambda x: x.to(dev), device=dev))
        scores, classes = saliency(model, stream, norm)
        chosen_channels = top_channels(scores, model.channels)
        state = {name: chosen_channels[i].contiguous() for i, name in enumerate(model.index_buffer_names())}
        path = store.artifact_path(spec, SELECTION)
        atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"run": spec.key, "K": str(model.channels)}))
        summary = {"task": spec.task, "run": spec.key, "K": model.channels, "num_images": len(data),
                   "classes": len(classes),
                   "rule": "per block, the K largest of mean_c sqrt(sum over the images of class c and the patch tokens "
                           "of h^2), h the input of norm2 of the pretrained ViT; ties to the lower channel",
                   "channels": {str(i): c.tolist() for i, c in enumerate(chosen_channels)}}
        atomic_write_text(store.artifact_path(spec, "selection.json"), json.dumps(summary, indent=1) + "\n")
        return {"status": "ok", "params": params,
                "selection": {k: v for k, v in summary.items() if k != "channels"},
                "artifacts": {"selection": f"{spec.key}.{SELECTION}", "summary": f"{spec.key}.selection.json"}}
