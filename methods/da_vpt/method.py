"""``da-vpt``: DA-VPT (docs/methods/da-vpt.md), a method with stages (:meth:`DaVpt.pipeline`):

1. ``mapping`` (job, no training), one per training split the later stages use, and only when the task has at least
   as many classes as proxy prompts: the pretrained ViT in eval mode over 10 images of every class of the training
   split, each class's mean final CLS feature, then the cosine k-means of those means with k = P → the class-to-prompt
   mapping and the centroids, ``<key>.mapping.safetensors`` (loaded by the training runs with ``init_state``) and
   ``<key>.mapping.json`` (model_creator.py:519-595, Dataset/mapping_sampler.py).
2. ``search``: the protocol's lr × wd grid on train800 → val200, with the search split's mapping.
3. ``final``: the chosen point, every seed, train800val200 → test, with the final split's mapping.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from peftbench._io import atomic_write, atomic_write_text
from peftbench.methods import Method, Option, PerTask, Recipe, register_method
from peftbench.sweep.stages import job_then_train
from peftbench.train.engine import job_inputs, normalizer_for

from .model import DaVptViT, cosine_kmeans, update_class_means

SETTINGS = Path(__file__).with_name("settings.csv")
MAPPING = "mapping.safetensors"
SAMPLES_PER_CLASS = 10  # params.py:43 (init_sample_per_class)
MAPPING_BATCH = 32  # model_creator.py:547-552 (the mapping loader: args.batch_size, 32 in every vitb config)
TRAINED = ("bias_q", "bias_v", "bias_fc2", "bias_norm2", "bias_proj", "norm1")
# The official loop (every vitb config): AdamW, batch 32, 100 epochs, 10 warm-up, per-task lr in {5e-5, 5e-4, 1e-3,
# 5e-3, 1e-2} and wd in {0 .. 10}. The unified protocols search the three common lrs (1e-3, 5e-3, 1e-2 at batch 32 =
# base 0.008, 0.04, 0.08) x three common wds; the demo protocol: wd 1e-4, batch 64 as the other AdamW methods, and
# lr 0.04, the best mean val200 top-1 of 0.01, 0.04, 0.16 over the 5 demo tasks (results/demo-hparam-search.csv).
DA_VPT_RECIPE = Recipe(optimizer="adamw", batch_size=32, epochs=100, warmup_epochs=10, lr_grid=(0.008, 0.04, 0.08),
                       wd_grid=(0.01, 0.05, 0.5)).for_protocol("demo", lr=0.04, wd=0.0001, batch_size=64)


def _per_task(column: str, fallback, why: str) -> PerTask:
    return PerTask(SETTINGS, fallback, column=column, fallback_reason=why)


COMMON = "task without a vitb config: the most common value of the 16 vitb VTAB configs"


@register_method
class DaVpt(Method):
    name = "da-vpt"
    description = ("DA-VPT: deep prompts whose last blocks' prompts are class-group proxies pulled towards their "
                   "classes' features by a proxy-anchor loss (k-means class mapping), with bias and LayerNorm tuning "
                   "(docs/methods/da-vpt.md)")
    version = 1
    recipe = DA_VPT_RECIPE
    options = {
        "proxies": Option("auto", "P class-guided prompts per guided block (proxy_prompt_len; a task with fewer "
                          "classes gets one per class)", type=int, min=1,
                          per_task=_per_task("proxies", 10, "task without a vitb config: params.py's default")),
        "guided": Option("auto", "d: the last d blocks hold the guided prompts (from proxy_prompt_start_idx)",
                         type=int, min=1, per_task=_per_task("guided", 1, COMMON)),
        "prompts": Option("auto", "L prompts in each other block (num_prompts)", type=int, min=0,
                          per_task=_per_task("prompts", 20, COMMON)),
        "w_patch": Option("auto", "weight of the image-token proxy-anchor loss (vpt_loss_weight)", type=float, min=0.0,
                          per_task=_per_task("w_patch", 0.01, COMMON)),
        "w_cls": Option("auto", "weight of the CLS-query proxy-anchor loss (cls_loss_weight)", type=float, min=0.0,
                        per_task=_per_task("w_cls", 0.01, COMMON)),
        "scale": Option("auto", "scale of the cosine similarities (loss_vpt_scale_ratio)", type=float, min=0.0,
                        per_task=_per_task("scale", 5.0, COMMON)),
        "dynamic_from": Option("auto", "re-cluster the classes at the end of every epoch from this one (0: never; "
                               "dynamic_kmeans)", type=int, min=0, per_task=_per_task("dynamic_from", 1, COMMON)),
        "cls": Option("auto", "train the CLS token (train_cls)", type=bool, per_task=_per_task("cls", True, COMMON)),
        "bias_k": Option("auto", "train the key biases", type=bool, per_task=_per_task("bias_k", False, COMMON)),
        # the same in every vitb config
        "bias_q": Option(False, "train the query biases (every vitb config: false)"),
        "bias_v": Option(True, "train the value biases (every vitb config: true)"),
        "bias_fc2": Option(True, "train the MLPs' fc2 biases (every vitb config: true)"),
        "bias_norm2": Option(True, "train norm2's biases (every vitb config: true)"),
        "bias_proj": Option(True, "train attn.proj's and the patch embedding's biases (every vitb config: true)"),
        "norm1": Option(True, "train norm1's weights and biases (norm_norm1; every vitb config: true)"),
    }

    @staticmethod
    def trained(opts) -> dict[str, bool]:
        return {**{k: bool(opts[k]) for k in TRAINED}, "bias_k": bool(opts["bias_k"]), "cls": bool(opts["cls"])}

    def build(self, backbone, num_classes, opts):
        if getattr(backbone, "global_pool", "token") != "token" or getattr(backbone, "num_prefix_tokens", 1) != 1:
            raise ValueError("da-vpt: the backbone must pool the CLS token and have no register tokens (as the "
                             "official ViT-B/16)")
        return DaVptViT(backbone, num_classes, proxies=int(opts["proxies"]), guided=int(opts["guided"]),
                        prompts=int(opts["prompts"]), w_patch=float(opts["w_patch"]), w_cls=float(opts["w_cls"]),
                        scale=float(opts["scale"]), dynamic_from=int(opts["dynamic_from"]), train=self.trained(opts),
                        seed=torch.initial_seed())

    # -- the pipeline -----------------------------------------------------------------------
    def pipeline(self, ctx, protocol):
        # one prompt per class: the mapping is the identity, no job (train.py:337-339, model_creator.py:104-106)
        clustered = ctx.task.num_classes >= int(ctx.options["proxies"])
        yield from job_then_train(ctx, protocol.search_points(ctx), protocol.base_hparams(ctx, "search"),
                                  protocol.base_hparams(ctx, "final"), "mapping", MAPPING, dict(ctx.option_sources),
                                  lambda role: {"batch_size": MAPPING_BATCH}, run_job=clustered)

    # -- stage 1 -----------------------------------------------------------------------------
    def run_job(self, job, spec, store, env):
        if job != "mapping":
            return super().run_job(job, spec, store, env)
        from safetensors.torch import save_file

        dev, task, model, params, data, size = job_inputs(spec, store, env)
        norm = normalizer_for(spec, dev)
        g = torch.Generator().manual_seed(int(spec.seed))
        chosen = class_samples(data.labels, task.num_classes, SAMPLES_PER_CLASS, g)
        means = class_means(model, data.images, data.labels, chosen, norm, dev, int(spec.hparams["batch_size"]))
        centroids, assignment = cosine_kmeans(means, model.num_proxies, None, g)
        used = len(assignment.unique())
        state = {"mapping": assignment, "centroids": centroids.float().cpu().contiguous(),
                 "has_centroids": torch.tensor(int(used > 1)), "mapped": torch.tensor(1)}
        path = store.artifact_path(spec, MAPPING)
        atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"run": spec.key}))
        summary = {"task": spec.task, "run": spec.key, "proxies": model.num_proxies, "images": len(chosen),
                   "prompts_used": used, "mapping": assignment.tolist(),
                   "rule": f"{SAMPLES_PER_CLASS} images per class of the training split, the pretrained ViT's mean "
                           "final CLS feature per class, cosine k-means (layer norm, 20 rounds) with k = P"}
        atomic_write_text(store.artifact_path(spec, "mapping.json"), json.dumps(summary, indent=1) + "\n")
        return {"status": "ok", "params": params, "mapping": {k: v for k, v in summary.items() if k != "mapping"},
                "artifacts": {"mapping": f"{spec.key}.{MAPPING}", "summary": f"{spec.key}.mapping.json"}}


def class_samples(labels: torch.Tensor, num_classes: int, per_class: int, g: torch.Generator) -> torch.Tensor:
    """mapping_sampler.py:33-55: for each class in order, ``per_class`` of its images drawn without replacement (all of
    them, repeated, plus a random rest when it has fewer); the indices, class by class."""
    out = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) == 0:
            continue
        whole, rest = divmod(per_class, len(idx))
        picked = [idx] * whole + [idx[torch.randperm(len(idx), generator=g)[:rest]]]
        draw = torch.cat(picked)
        if whole:
            draw = draw[torch.randperm(len(draw), generator=g)]
        out.append(draw)
    return torch.cat(out)


@torch.no_grad()
def class_means(model: DaVptViT, images: torch.Tensor, labels: torch.Tensor, chosen: torch.Tensor, norm, dev,
                batch_size: int) -> torch.Tensor:
    """The pretrained ViT (no prompts: models/vit.py:65-87) in eval mode over ``chosen`` in batches; each class's
    running mean of the final normed CLS feature (criterion.py:78-88)."""
    vit = model.backbone
    was = model.training
    model.eval()
    means = torch.zeros(model.mapping.shape[0], vit.embed_dim, dtype=model.head.weight.dtype, device=dev)
    counts = torch.zeros(model.mapping.shape[0], dtype=torch.long, device=dev)
    try:
        for i in range(0, len(chosen), batch_size):
            take = chosen[i:i + batch_size]
            x = norm(images[take].to(dev)).to(vit.patch_embed.proj.weight.dtype)
            f = vit.forward_head(vit.forward_features(x), pre_logits=True).to(means.dtype)
            update_class_means(means, counts, f, labels[take].to(dev))
    finally:
        model.train(was)
    return means
