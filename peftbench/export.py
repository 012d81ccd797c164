"""``peftbench export``: a finished run's trained model as a plain timm ViT (safetensors + its timm config).

The run's model is rebuilt on its backbone, its saved trained tensors (``<key>.final.safetensors``,
kept by ``peftbench run`` for the runs evaluated on the final split) are loaded, and the method's
``merged`` variant (``TunedViT.inference_variants``) folds the update into the backbone's weights.
Before anything is written the merged model's logits are compared with the unmerged model's on a
random batch; a difference beyond the tolerance is an error, never a silent export.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ._io import atomic_write_text, safe_component
from .backbones import image_size, preset
from .errors import PeftbenchError, StoreError
from .layers.merge import is_plain_timm
from .store import RunRecord, RunStatus, RunStore
from .store.checkpoints import write_tensors
from .train.build import build_model, load_trainable, mean_std
from .train.env import Env

TOLERANCE = 1e-4  # max |logit difference| / max(1, max |logit|), float32 on the CPU


class ExportError(PeftbenchError):
    pass


@dataclass
class Exported:
    weights: Path
    config: Path
    max_abs_diff: float
    variant: str


def find_run(store: RunStore, key: str) -> RunRecord:
    """The finished record whose key is ``key`` or starts with it (unique prefix, as git's short shas)."""
    matches = [rec for _, rec, _ in store.iter_records() if rec is not None and rec.key.startswith(key)]
    if not matches:
        raise StoreError(f"no run with key {key!r} in {store.root} (`peftbench status --runs-dir {store.root}` lists them)")
    if len({m.key for m in matches}) > 1:
        raise StoreError(f"key {key!r} is ambiguous in {store.root}: " + ", ".join(sorted({m.key for m in matches})[:5]))
    return matches[0]


def timm_config(spec, num_classes: int) -> dict:
    """What ``timm.create_model(**config)`` needs to rebuild the exported architecture."""
    p = preset(spec.backbone)
    name, kwargs = (p.timm_name, dict(p.kwargs)) if p else (spec.backbone.split(".")[0], {})
    return {"model_name": name, **kwargs, "num_classes": num_classes, "global_pool": "token"}


def export_run(runs_dir: str | Path, key: str, out: str | Path | None = None, variant: str = "merged",
               seed: int = 0) -> Exported:
    safe_component(variant, "--variant")  # it names the default output file
    store = RunStore(runs_dir)
    rec = find_run(store, key)
    spec = rec.run_spec
    if rec.status != RunStatus.OK:
        raise ExportError(f"run {rec.key} is {rec.status}, not a finished run: nothing to export")
    weights = store.artifact_path(spec, "final.safetensors")
    if not weights.is_file():
        raise ExportError(f"run {rec.key} ({spec.label()}) has no saved weights ({weights.name} is missing): it was "
                          f"trained with --save-weights none, or is not a final-split run; rerun it with "
                          f"`peftbench run ... --save-weights all` after moving its record away")
    model = build_model(spec, Env(device="cpu"), store)
    load_trainable(model, weights)
    model.eval()
    variants = model.inference_variants()
    if variant not in variants:
        have = ", ".join(sorted(variants)) or "none"
        raise ExportError(f"method {spec.method!r} has no {variant!r} model (its inference variants: {have}): its "
                          f"update cannot be folded into a plain ViT (it adds tokens or non-linear modules)")
    plain = variants[variant].eval()
    if not is_plain_timm(plain):
        raise ExportError(f"the {variant!r} model of {spec.method!r} is not a plain timm ViT: not exportable")
    size = image_size(model.backbone)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, size, size, generator=g)
    with torch.no_grad():
        a, b = model(x), plain(x)
    diff = float((a - b).abs().max())
    if diff > TOLERANCE * max(1.0, float(a.abs().max())):
        raise ExportError(f"run {rec.key}: the merged model's logits differ from the trained model's by {diff:.3g} "
                          f"(tolerance {TOLERANCE:g}): not exported")
    out = Path(out) if out else store.record_path(spec).parent / f"{rec.key}.{variant}.safetensors"
    if out.suffix != ".safetensors":
        raise ExportError(f"--out {out}: the file name must end in .safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in plain.state_dict().items()}
    meta = {"peftbench_run": rec.key, "method": spec.method, "task": spec.task, "variant": variant}
    write_tensors(out, state, meta, "the exported weights")  # a full disk, a read-only folder: one line naming the file
    config = out.with_suffix(".json")
    info = {**meta, "timm": timm_config(spec, int(plain.head.out_features)), "image_size": size,
            "mean": list(mean_std(spec)[0]), "std": list(mean_std(spec)[1]),
            "top1": rec.top1,
            "eval_split": spec.eval_split, "max_abs_logit_diff": diff,
            "load": "model = timm.create_model(**config['timm']); "
                    "model.load_state_dict(safetensors.torch.load_file(weights))"}
    try:
        atomic_write_text(config, json.dumps(info, indent=1, sort_keys=True) + "\n")
    except OSError as exc:
        raise StoreError(f"cannot write the exported model's config {config}: {exc.strerror or exc}") from None
    return Exported(out, config, diff, variant)
