"""``peftbench export``: publish a finished run, and ``peftbench.load_pretrained``: get it back.

A run is found by its key (or a unique prefix) or by ``method``/``task``/``seed`` (:func:`select_run`). Its model is
rebuilt on its backbone, its saved trained tensors (``<key>.final.safetensors``, kept by ``peftbench run`` for the runs
evaluated on the final split) are loaded, and one of two things is written:

* **a folder in the Hugging Face hub layout** (:func:`export_folder`, the default), what ``push_to_hub`` uploads:

  - ``peftbench_model.safetensors`` + ``peftbench_config.json``: the trained tensors (and the selection a data-dependent
    method loaded before training: GPS's, SCT's masks) and what rebuilds the model (method, options, backbone and its
    checkpoint's sha256, classes, input size and normalisation, the hyper-parameters, the result). Every method
    exports this way, prompt methods included; :func:`load_pretrained` reads it back;
  - ``model.safetensors`` + ``config.json`` in timm's hub format, when the method folds into a plain timm ViT (its
    ``merged`` model): ``timm.create_model("hf-hub:<repo>", pretrained=True)`` (or ``"local-dir:<folder>"``) loads it
    without peftbench;
  - ``adapter_config.json`` + ``adapter_model.safetensors``, when the method is one of peft's tuners: a peft adapter
    that ``peft.PeftModel.from_pretrained`` loads onto the timm backbone (the classifier in ``modules_to_save``);
  - ``README.md``: a model card (:mod:`peftbench.model_card`) with the hub's metadata block.

* **one plain timm file** (``--out <file>.safetensors``, :func:`export_run`): the merged weights + their timm config.

Before anything is kept, every written model is loaded back and its logits compared with the trained model's on a
random batch; a difference beyond the tolerance is an error, never a silent export. Nothing is unpickled: every file
is safetensors or JSON.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write_text, safe_component
from .backbones import checkpoint_id, image_size, preset
from .errors import PeftbenchError, StoreError
from .layers.merge import is_plain_timm
from .store import RunRecord, RunStatus, RunStore
from .store.checkpoints import write_tensors
from .train.build import build_model, copy_into, load_trainable, mean_std
from .train.env import Env

TOLERANCE = 1e-4  # max |logit difference| / max(1, max |logit|), float32 on the CPU
FORMAT = "peftbench-export/1"  # peftbench_config.json's "format": what load_pretrained reads
CONFIG = "peftbench_config.json"
WEIGHTS = "peftbench_model.safetensors"


class ExportError(PeftbenchError):
    pass


@dataclass
class Exported:
    weights: Path
    config: Path
    max_abs_diff: float
    variant: str


@dataclass
class ExportedFolder:
    folder: Path
    files: list[str]
    # model kind ("peftbench", "timm", "peft") -> max |logit difference| of its reloaded model vs the trained one
    diffs: dict[str, float] = field(default_factory=dict)
    key: str = ""


# ---------------------------------------------------------------------------------------------
# which run
# ---------------------------------------------------------------------------------------------


def find_run(store: RunStore, key: str) -> RunRecord:
    """The finished record whose key is ``key`` or starts with it (unique prefix, as git's short shas)."""
    return select_run(store, key=key)


def select_run(store: RunStore, key: str | None = None, method: str | None = None, task: str | None = None,
               seed: int | None = None) -> RunRecord:
    """The one record named by a key (or unique prefix) and/or ``method``, ``task``, ``seed``. With no key, only
    finished runs whose trained weights were kept are candidates (the runs there is something to export of); more
    than one is an error listing them with their key prefixes."""
    if not (key or method or task):
        raise ExportError("name the run: --run KEY (a prefix is enough; `peftbench status --all` lists them) or "
                          "--method M --task T [--seed S]")
    records = [rec for _, rec, _ in store.iter_records() if rec is not None]
    matches = [rec for rec in records
               if (not key or rec.key.startswith(key))
               and (method is None or rec.spec.get("method") == method)
               and (task is None or rec.spec.get("task") == task)
               and (seed is None or rec.spec.get("seed") == seed)]
    if not key:
        matches = [rec for rec in matches if rec.status == RunStatus.OK
                   and store.artifact_path(rec.run_spec, "final.safetensors").is_file()]
        # a pipeline's other test-split runs (e2vpt-prune's before_pruning) are there for comparison: the final stage
        # is the method's result
        if any(rec.spec.get("stage") == "final" for rec in matches):
            matches = [rec for rec in matches if rec.spec.get("stage") == "final"]
    what = " ".join(f"{k} {v}" for k, v in (("key", key), ("method", method), ("task", task), ("seed", seed))
                    if v is not None)
    if not matches:
        raise StoreError(f"no {'run' if key else 'finished run with kept weights'} with {what} in {store.root} "
                         f"(`peftbench status --all --runs-dir {store.root}` lists the runs and their keys)")
    if len({m.key for m in matches}) > 1:
        listed = "; ".join(f"{m.key[:10]} {m.run_spec.label()}" for m in sorted(matches, key=lambda r: r.key)[:6])
        raise StoreError(f"{what} names {len({m.key for m in matches})} runs in {store.root}: {listed}"
                         + (" ..." if len(matches) > 6 else "") + " (add --seed, or --run with a key prefix)")
    return matches[0]


def _trained_model(store: RunStore, rec: RunRecord):
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
    return model.eval(), weights


def _batch(model, seed: int) -> torch.Tensor:
    size = image_size(model.backbone)
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _check(what: str, key: str, expected: torch.Tensor, got: torch.Tensor) -> float:
    """max |got − expected|, or a one-line error when the shapes differ, a logit is not finite or the difference
    exceeds the tolerance (NaN never passes)."""
    if got.shape != expected.shape:
        raise ExportError(f"run {key}: the {what} gives logits of shape {tuple(got.shape)}, the trained model "
                          f"{tuple(expected.shape)}: not exported")
    diff = float((expected - got).abs().max())
    if not math.isfinite(diff) or not diff <= TOLERANCE * max(1.0, float(expected.abs().max())):
        raise ExportError(f"run {key}: the {what}'s logits differ from the trained model's by {diff:.3g} "
                          f"(tolerance {TOLERANCE:g}): not exported")
    return diff


# ---------------------------------------------------------------------------------------------
# one plain timm file (the merged model)
# ---------------------------------------------------------------------------------------------


def timm_config(spec, num_classes: int) -> dict:
    """What ``timm.create_model(**config)`` needs to rebuild the exported architecture."""
    p = preset(spec.backbone)
    name, kwargs = (p.timm_name, dict(p.kwargs)) if p else (spec.backbone.split(".")[0], {})
    return {"model_name": name, **kwargs, "num_classes": num_classes, "global_pool": "token"}


def _plain_variant(model, rec: RunRecord, variant: str):
    variants = model.inference_variants()
    if variant not in variants:
        have = ", ".join(sorted(variants)) or "none"
        raise ExportError(f"method {rec.run_spec.method!r} has no {variant!r} model (its inference variants: {have}): "
                          f"its update cannot be folded into a plain ViT (it adds tokens or non-linear modules)")
    plain = variants[variant].eval()
    if not is_plain_timm(plain):
        raise ExportError(f"the {variant!r} model of {rec.run_spec.method!r} is not a plain timm ViT: not exportable")
    return plain


def export_run(runs_dir: str | Path, key: str, out: str | Path | None = None, variant: str = "merged",
               seed: int = 0, rec: RunRecord | None = None) -> Exported:
    """The merged model as one plain timm file: ``<out>.safetensors`` + ``<out>.json`` (timm.create_model arguments)."""
    safe_component(variant, "--variant")  # it names the default output file
    store = RunStore(runs_dir)
    rec = rec or find_run(store, key)
    spec = rec.run_spec
    model, _ = _trained_model(store, rec)
    plain = _plain_variant(model, rec, variant)
    x = _batch(model, seed)
    with torch.no_grad():
        diff = _check(f"{variant} model", rec.key, model(x), plain(x))
    out = Path(out) if out else store.record_path(spec).parent / f"{rec.key}.{variant}.safetensors"
    if out.suffix != ".safetensors":
        raise ExportError(f"--out {out}: the file name must end in .safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in plain.state_dict().items()}
    meta = {"peftbench_run": rec.key, "method": spec.method, "task": spec.task, "variant": variant}
    write_tensors(out, state, meta, "the exported weights")  # a full disk, a read-only folder: one line naming the file
    config = out.with_suffix(".json")
    info = {**meta, "timm": timm_config(spec, int(plain.get_classifier().out_features)),
            "image_size": image_size(model.backbone), "mean": list(mean_std(spec)[0]), "std": list(mean_std(spec)[1]),
            "top1": rec.top1, "eval_split": spec.eval_split, "max_abs_logit_diff": diff,
            "load": "model = timm.create_model(**config['timm']); "
                    "model.load_state_dict(safetensors.torch.load_file(weights))"}
    _write_text(config, json.dumps(info, indent=1, sort_keys=True) + "\n", "the exported model's config")
    return Exported(out, config, diff, variant)


def _write_text(path: Path, text: str, what: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise StoreError(f"cannot write {what} {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------
# the hub folder
# ---------------------------------------------------------------------------------------------


def _saved_state(model, spec, store: RunStore) -> dict[str, torch.Tensor]:
    """What rebuilds the trained model on a freshly built one: its trained tensors, and the tensors its run loaded
    before training (``extras.init_state``: a selection's masks and indices)."""
    from safetensors import safe_open

    own = dict(model.named_parameters()) | dict(model.named_buffers())
    state = {k: v.detach() for k, v in model.trainable_state().items()}
    init_state = spec.extras.get("init_state")
    if init_state:
        path = Path(init_state)
        path = path if path.is_absolute() else store.record_path(spec).parent / path
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
        except (OSError, ValueError, RuntimeError) as exc:  # a missing file, safetensors' own errors
            raise ExportError(f"{path}: the selection run {spec.key} loaded cannot be read "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        for k in names:
            if k in own:
                state.setdefault(k, own[k].detach())
    return {k: v.cpu().contiguous() for k, v in sorted(state.items())}


def _num_classes(model) -> int:
    return int(model.head.out_features) if hasattr(model.head, "out_features") else int(model(
        _batch(model, 0)[:1]).shape[-1])


def _describe(rec: RunRecord, model, store: RunStore) -> dict[str, Any]:
    """peftbench_config.json: what :func:`load_pretrained` rebuilds the model from, and what the run was."""
    from ._version import __version__
    from .tasks import get_task

    spec = rec.run_spec
    mean, std = mean_std(spec)
    task = get_task(spec.task)
    return {
        "format": FORMAT, "peftbench_version": __version__, "run": rec.key,
        "method": spec.method, "method_version": spec.method_version, "config": spec.config or spec.method,
        "options": spec.options, "backbone": spec.backbone,
        # the backbone's weights file: a release file the user gave (--checkpoint; load_pretrained needs it again) or
        # the preset's own, identified by its sha256 prefix (the run key's checkpoint_id)
        "checkpoint_file": Path(spec.checkpoint).name if spec.checkpoint else None,
        "checkpoint_id": spec.checkpoint_id or checkpoint_id(spec.backbone, spec.checkpoint),
        "num_classes": _num_classes(model), "task": spec.task, "suite": spec.suite, "group": task.group,
        "image_size": image_size(model.backbone), "mean": list(mean), "std": list(std),
        "data_pipeline": rec.data_pipeline, "protocol": spec.protocol, "stage": spec.stage, "seed": spec.seed,
        "train_split": spec.train_split, "eval_split": spec.eval_split, "hparams": spec.hparams,
        "hparams_effective": rec.hparams_effective, "metrics": rec.metrics, "params": rec.params, "code": rec.code,
        "weights": WEIGHTS,
    }


def _timm_files(plain, folder: Path, info: dict) -> None:
    """timm's own hub format (``config.json`` + ``model.safetensors``, timm.models.save_for_hf)."""
    from timm.models import save_for_hf

    data = {"mean": tuple(info["mean"]), "std": tuple(info["std"]),
            "input_size": (3, info["image_size"], info["image_size"])}
    interpolation = (info.get("data_pipeline") or {}).get("interpolation")
    if interpolation in ("bilinear", "bicubic", "nearest"):
        data["interpolation"] = interpolation
    save_for_hf(plain, str(folder), safe_serialization=True, model_args={"num_classes": info["num_classes"]},
                data_config=data)


def _hub_base(spec) -> str | None:
    """The hub repository of the backbone's weights, when they are timm's hub weights (``timm/<name>.<tag>``)."""
    p = preset(spec.backbone)
    name = p.timm_name if p else spec.backbone
    return f"timm/{name}" if "." in name and not spec.checkpoint and not (p and p.weights) else None


def export_folder(runs_dir: str | Path, out: str | Path | None = None, *, key: str | None = None,
                  method: str | None = None, task: str | None = None, seed: int | None = None,
                  check_seed: int = 0, rec: RunRecord | None = None, repo: str | None = None) -> ExportedFolder:
    """Write the run's hub folder (module docstring) at ``out`` (default ``./export/<method>-<task>-s<seed>-<key10>``,
    outside the run store). The folder is written aside and moved into place only once every model in it reloads with
    the trained model's logits; an existing non-empty ``out`` is an error (nothing is overwritten). ``repo``: the hub
    repository it will be pushed to (the model card's loading lines name it)."""
    from .model_card import model_card

    store = RunStore(runs_dir)
    rec = rec or select_run(store, key=key, method=method, task=task, seed=seed)
    spec = rec.run_spec
    model, _ = _trained_model(store, rec)
    folder = Path(out) if out else Path("export") / safe_component(
        f"{spec.method}-{spec.task}-s{spec.seed}-{rec.key[:10]}", "the export folder")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ExportError(f"--out {folder}: exists and is not an empty folder (nothing is overwritten)")
    info = _describe(rec, model, store)
    x = _batch(model, check_seed)
    with torch.no_grad():
        expected = model(x)
    diffs: dict[str, float] = {}
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as exc:
        raise StoreError(f"cannot write the export folder {folder}: {exc.strerror or exc}") from None
    try:
        write_tensors(tmp / WEIGHTS, _saved_state(model, spec, store), {"peftbench_run": rec.key, "format": FORMAT},
                      "the exported weights")
        _write_text(tmp / CONFIG, json.dumps(info, indent=1, sort_keys=True, default=str) + "\n",
                    "the exported model's config")
        with torch.no_grad():
            diffs["peftbench"] = _check("reloaded model", rec.key, expected, load_pretrained(tmp, spec.checkpoint)(x))
        variants = model.inference_variants()
        if "merged" in variants and is_plain_timm(variants["merged"]):
            _timm_files(variants["merged"].eval(), tmp, info)
            import timm

            with torch.no_grad():
                reloaded = timm.create_model(f"local-dir:{tmp}", pretrained=True).eval()
                diffs["timm"] = _check("timm model", rec.key, expected, reloaded(x))
        adapter = model.peft_model()
        if adapter is not None:
            diffs["peft"] = _peft_files(adapter, tmp, spec, rec.key, expected, x)
        _write_text(tmp / "README.md", model_card(rec, info, sorted(diffs), base_model=_hub_base(spec),
                                                  repo=repo or "<repo>", timm_args=timm_config(spec, info["num_classes"])),
                    "the model card")
        if folder.exists():
            folder.rmdir()
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportedFolder(folder, sorted(p.name for p in folder.iterdir()), diffs, rec.key)


def _peft_files(adapter, folder: Path, spec, key: str, expected: torch.Tensor, x: torch.Tensor) -> float:
    """peft's own ``save_pretrained`` (adapter_config.json + adapter_model.safetensors), reloaded with
    ``PeftModel.from_pretrained`` onto a plain timm classifier built from the same backbone."""
    from peft import PeftModel

    with torch.no_grad():
        _check("peft model", key, expected, adapter(x))
    for cfg in adapter.peft_config.values():
        cfg.base_model_name_or_path = _hub_base(spec) or spec.backbone
    adapter.save_pretrained(str(folder), safe_serialization=True)
    (folder / "README.md").unlink(missing_ok=True)  # peft's stub card; ours is written next
    base = _backbone(spec.backbone, spec.checkpoint)
    base.reset_classifier(int(expected.shape[-1]))
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(base, str(folder)).eval()
        return _check("reloaded peft adapter", key, expected, loaded(x))


# ---------------------------------------------------------------------------------------------
# loading it back
# ---------------------------------------------------------------------------------------------


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{folder}: no {CONFIG} (not a folder written by `peftbench export`)") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ExportError(f"{path}: format {info.get('format') if isinstance(info, dict) else None!r} is not "
                          f"{FORMAT!r} (written by another peftbench version?)")
    for k, kind in (("method", str), ("backbone", str), ("num_classes", int), ("options", dict)):
        if not isinstance(info.get(k), kind):
            raise ExportError(f"{path}: field {k!r} is missing or not a {kind.__name__}")
    return info


def _numpy_state(state=None):
    """numpy's global generator state (get, or set when ``state`` is given)."""
    import numpy as np

    if state is None:
        return np.random.get_state()
    np.random.set_state(state)
    return state


def _backbone(name: str, checkpoint: str | None):
    """The pretrained backbone as a run gets it (``Env.backbone``: its own RNG seeded 0, so that a backbone without
    pretrained weights, a test's or a control's, is the same every time)."""
    from .backbones import create_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_backbone(name, checkpoint)


def load_pretrained(folder: str | Path, checkpoint: str | Path | None = None, device: str = "cpu") -> torch.nn.Module:
    """The model a ``peftbench export`` folder holds, in eval mode: the method built on its backbone with the exported
    options, then the exported tensors loaded (every one must exist in the model).

    ``checkpoint``: the backbone's weights file, for a backbone trained from a local release file (MAE, MoCo-v3...;
    its sha256 must equal the recorded one); hub backbones come from timm's cache (``HF_HUB_OFFLINE=1`` works once
    cached). The returned model has ``export_info`` (the config: classes, input size, mean/std)."""
    from safetensors.torch import load_file

    from .methods import METHODS
    from .train.build import seed_everything

    folder = Path(folder)
    info = _read_config(folder)
    if str(info.get("weights") or WEIGHTS) != WEIGHTS:
        raise ExportError(f"{folder / CONFIG}: weights {info.get('weights')!r}: an export's weights are {WEIGHTS!r} "
                          f"in its own folder")
    if ":" in info["backbone"].split("/")[0]:
        raise ExportError(f"{folder / CONFIG}: backbone {info['backbone']!r}: a preset or a timm name is expected, not "
                          f"a location (hf-hub:, local-dir:)")
    name = info["method"]
    if name not in METHODS:
        raise ExportError(f"{folder / CONFIG}: method {name!r} is not registered here (is its plugin installed?)")
    method = METHODS.get(name)
    if info.get("checkpoint_file") and checkpoint is None:
        raise ExportError(f"{folder}: its backbone {info['backbone']!r} was trained from the release file "
                          f"{info['checkpoint_file']!r}: pass it (checkpoint=PATH, or --checkpoint)")
    got = checkpoint_id(info["backbone"], str(checkpoint) if checkpoint else None)
    if info.get("checkpoint_id") and got != info["checkpoint_id"]:
        raise ExportError(f"{folder}: the backbone's weights file has sha256 {got}..., the model was trained on "
                          f"{info['checkpoint_id']}... (another file)")
    # the run's resolved options: the declared ones checked as a user's would be; what a pipeline adds for its later
    # stages (e2vpt-prune's mask) passes as it was built with
    extra = {k: v for k, v in info["options"].items() if k not in method.options}  # (plain JSON data, as recorded)
    opts = {**extra, **method.parse_options({k: v for k, v in info["options"].items() if k in method.options})}
    # (built as the run built it, seeded; the caller's random generators are left as they were)
    with torch.random.fork_rng(devices=[]):
        py_state, np_state = random.getstate(), _numpy_state()
        try:
            seed_everything(int(info.get("seed") or 0))
            backbone = _backbone(info["backbone"], str(checkpoint) if checkpoint else None)
            model = method.build(backbone, int(info["num_classes"]), opts)
        finally:
            random.setstate(py_state)
            _numpy_state(np_state)
    weights = folder / WEIGHTS
    try:
        state = load_file(str(weights))
    except FileNotFoundError:
        raise ExportError(f"{folder}: {weights.name} is missing") from None
    missing = sorted(set(model.trainable_state()) - set(state))
    if missing:
        raise ExportError(f"{weights}: lacks {len(missing)} trained tensor(s) of a {name!r} model: "
                          f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    try:
        copy_into(model, state, str(weights))
    except (ValueError, RuntimeError) as exc:
        raise ExportError(f"{weights}: does not fit a {name!r} model ({str(exc).splitlines()[0]})") from None
    model.export_info = info
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# the hub
# ---------------------------------------------------------------------------------------------


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, api=None) -> str:
    """Upload an export folder to the Hugging Face hub (``huggingface_hub.HfApi``: create the repository if needed,
    then one commit of the folder); returns the repository's URL. Errors (offline, no token, no rights) are one line."""
    folder = Path(folder)
    _read_config(folder)  # only what peftbench exported
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=f"peftbench export of run {_read_config(folder).get('run')}")
    except Exception as exc:  # hub errors: offline mode, authentication, a bad repo id
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(f"--push-to-hub {repo_id}: {type(exc).__name__}: {first}") from None
    return str(url)
