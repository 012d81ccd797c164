"""The model card (``README.md``) of a ``peftbench export`` folder: the Hugging Face hub's metadata block
(``huggingface_hub.ModelCardData``: library, base model, tags, the result as ``model-index``) and a page saying what
the model is, how it was trained (the run's hyper-parameter card), how to load each file, and what to cite.

Every value comes from the run's record; text from a record is escaped for Markdown (:func:`peftbench._text.markdown`).
"""
from __future__ import annotations

from typing import Any

from ._text import markdown

LOADERS = {
    "peftbench": ("peftbench_model.safetensors + peftbench_config.json",
                  "import peftbench\nmodel = peftbench.load_pretrained(\"{folder}\")  # eval mode; model.export_info "
                  "holds classes, input size, mean/std"),
    "timm": ("model.safetensors + config.json (the method folded into a plain timm ViT)",
             "import timm\nmodel = timm.create_model(\"hf-hub:{repo}\", pretrained=True)  "
             "# or \"local-dir:<folder>\""),
    "peft": ("adapter_config.json + adapter_model.safetensors (a peft adapter; the classifier in modules_to_save)",
             "{base}\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base, \"{folder}\")"),
}
# the peft adapter's base model: timm's hub weights, else the backbone as peftbench builds it (a preset, a release file)
HUB_BASE = "import timm\nbase = timm.create_model(**{args}, pretrained=True)  # timm's hub weights"
OWN_BASE = ("from peftbench.backbones import create_backbone\nbase = create_backbone(\"{name}\"{checkpoint})\n"
            "base.reset_classifier({num_classes})")

PEFTBENCH_BIBTEX = """@software{peftbench,
  title = {peftbench: a benchmark harness for parameter-efficient fine-tuning of vision transformers},
  note = {version %s}
}"""


def _yaml_block(rec, info: dict, kinds: list[str], base_model: str | None) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    library = "timm" if "timm" in kinds else "peft" if "peft" in kinds else "peftbench"
    result = []
    if rec.top1 is not None:
        result = [EvalResult(task_type="image-classification", task_name="Image Classification",
                             dataset_type=f"{info['suite']}/{info['task']}", dataset_name=f"{info['suite']} {info['task']}",
                             dataset_split=str(info["eval_split"]), metric_type="accuracy", metric_value=round(rec.top1, 4),
                             metric_name=f"top-1 accuracy (%), {info['eval_split']} split")]
    data = ModelCardData(
        library_name=library, base_model=base_model, pipeline_tag="image-classification",
        tags=["peftbench", "parameter-efficient-fine-tuning", str(info["method"]), str(info["suite"]),
              *(k for k in ("peft", "timm") if k in kinds)],
        model_name=f"{info['config']}-{info['task']}-seed{info['seed']}", eval_results=result or None)
    return "---\n" + data.to_yaml() + "\n---\n"


def _table(rows: list[tuple[str, Any]]) -> str:
    out = ["| | |", "|---|---|"]
    for k, v in rows:
        out.append(f"| {markdown(k)} | {markdown(v)} |")
    return "\n".join(out)


def model_card(rec, info: dict, kinds: list[str], base_model: str | None = None, repo: str = "<repo>",
               timm_args: dict | None = None) -> str:
    """The card's text. ``kinds``: the model files the folder holds (peftbench, timm, peft); ``timm_args``: what
    ``timm.create_model`` builds the classifier the peft adapter loads onto from (peftbench.export.timm_config)."""
    from .methods import METHODS

    method = METHODS.get(info["method"]) if info["method"] in METHODS else None
    params = info.get("params") or {}
    hp = info.get("hparams") or {}
    eff = info.get("hparams_effective") or {}
    top1 = f"{rec.top1:.2f}" if rec.top1 is not None else "n/a"
    tuned = params.get("tuned")
    total = params.get("total")
    share = f"{100.0 * tuned / total:.3f} %" if tuned and total else "n/a"
    lines = [
        _yaml_block(rec, info, kinds, base_model),
        f"# {markdown(info['config'])} on {markdown(info['task'])} ({markdown(info['suite'])})",
        "",
        f"{markdown(method.description if method else info['method'])}, trained by "
        f"[peftbench](#citation) {markdown(info['peftbench_version'])} on the {markdown(info['task'])} task of the "
        f"{markdown(info['suite'])} suite ({info['num_classes']} classes) from the backbone "
        f"`{markdown(info['backbone'])}`. Top-1 accuracy on the {markdown(info['eval_split'])} split: **{top1} %** "
        f"(seed {info['seed']}).",
        "",
        "## Files and how to load them",
        "",
    ]
    base = (HUB_BASE.format(args=repr(timm_args or {"model_name": base_model.removeprefix("timm/"),
                                                           "num_classes": info["num_classes"]}))
            if base_model else
            OWN_BASE.format(name=info["backbone"], num_classes=info["num_classes"],
                            checkpoint=f", \"{info['checkpoint_file']}\"" if info.get("checkpoint_file") else ""))
    interpolation = (info.get("data_pipeline") or {}).get("interpolation", "bilinear")
    weights = (f"file sha256 {info['checkpoint_id']}..." if info.get("checkpoint_id") else
               f"timm's hub weights {base_model}" if base_model else "the preset's own (no pretrained file)")
    fmt = {"folder": "<folder>", "repo": repo, "base": base, "num_classes": info["num_classes"]}
    for kind in ("peftbench", "timm", "peft"):
        if kind in kinds:
            what, code = LOADERS[kind]
            lines += [f"- **{kind}**: {what}", "", "```python", code.format(**fmt), "```", ""]
    lines += [
        f"Images: resize to {info['image_size']} x {info['image_size']} ({markdown(interpolation)}), scale to [0, 1], "
        f"normalise with mean {info['mean']} and std {info['std']}.",
        "",
        "## What was trained",
        "",
        _table([("method", f"{info['method']} (version {info['method_version']})"),
                ("options", ", ".join(f"{k}={v}" for k, v in sorted(info["options"].items())) or "defaults"),
                ("tuned parameters (incl. head)", f"{tuned:,}" if tuned else "n/a"),
                ("total parameters", f"{total:,}" if total else "n/a"),
                ("tuned / total", share)]),
        "",
        "## Hyper-parameters (the run's card)",
        "",
        _table([("protocol", info["protocol"]), ("stage", info["stage"]),
                ("trained on / evaluated on", f"{info['train_split']} / {info['eval_split']}"), ("seed", info["seed"]),
                *((k, hp[k]) for k in sorted(hp)),
                *((f"effective {k}", eff[k]) for k in sorted(eff) if eff[k] != hp.get(k))]),
        "",
        "## Data pipeline",
        "",
        _table([(k, v) for k, v in sorted((info.get("data_pipeline") or {}).items())]),
        "",
        "## Provenance",
        "",
        _table([("run key", info["run"]), ("backbone weights", weights),
                ("code fingerprints", ", ".join(f"{k} {v}" for k, v in sorted((info.get("code") or {}).items()))),
                ("logit check", "every model file here was reloaded and gave the trained model's logits "
                                "(max |difference| within 1e-4 of the largest logit)")]),
        "",
        "## Citation",
        "",
        f"The method: see peftbench's `docs/methods/` page for `{markdown(info['method'])}` (its paper, official code and "
        "every departure from it). The harness:",
        "",
        "```bibtex",
        PEFTBENCH_BIBTEX % info["peftbench_version"],
        "```",
        "",
    ]
    return "\n".join(lines)
