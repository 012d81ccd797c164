"""A method's model on a timm backbone, for your own training loop (docs/api.md)."""
from __future__ import annotations

from typing import Any


def build_model(method: str, num_classes: int, backbone: str = "vit_base_patch16_224.orig_in21k", *,
                options: dict[str, Any] | None = None, checkpoint: str | None = None, pretrained: bool = True,
                task: str | None = None, seed: int | None = None):
    """``method``'s model (a :class:`peftbench.layers.tuned_vit.TunedViT`, a ``torch.nn.Module``) on
    ``backbone`` with a ``num_classes`` head: the backbone frozen, what the method trains with
    ``requires_grad``, exactly as ``peftbench run`` builds it.

    ``backbone``: a timm model name with its pretrained tag, or a preset (``demo-vit``); ``checkpoint``:
    local weights (.npz, .safetensors, .pth); ``pretrained=False``: random weights (no download).
    ``options``: the method's options (typed, checked: ``{"prompt_tokens": 10}``), per-task defaults
    resolved for ``task`` when given. ``seed``: seeds torch before building (the run's initialisation).

    The model's ``forward(images)`` returns logits for normalised images of the backbone's size
    (``peftbench.backbones.image_size(model.backbone)``; ImageNet mean and std as in peftbench's runs);
    train ``[p for p in model.parameters() if p.requires_grad]``; call ``model.train()``: only the modules
    the method trains switch to train mode. ``model.parameter_counts()`` gives the counts
    ``peftbench params`` prints."""
    from ..backbones import create_backbone
    from ..errors import SettingsError
    from ..methods import get_method
    from ..tasks import get_task

    m = get_method(method)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise SettingsError(f"num_classes {num_classes!r}: must be an integer >= 1")
    opts = m.parse_options({k: v for k, v in (options or {}).items()})
    opts, _ = m.resolve_options(opts, get_task(task) if task else None)
    if seed is not None:
        from ..train.build import seed_everything

        seed_everything(seed)
    m.check_backbone(backbone)
    net = create_backbone(backbone, checkpoint, pretrained=pretrained)
    return m.build(net, num_classes, dict(opts))


def load_pretrained(folder: str, checkpoint: str | None = None, device: str = "cpu"):
    """The trained model of a ``peftbench export`` folder (a hub download included), in eval mode, with the trained
    run's logits: the method rebuilt on its backbone with the exported options and the exported tensors loaded
    (:func:`peftbench.export.load_pretrained`). ``checkpoint``: the backbone's release file, for a model trained from
    one (MAE, MoCo-v3...). ``model.export_info`` holds its classes, input size and normalisation."""
    from ..export import load_pretrained as load

    return load(folder, checkpoint, device)


def publish(runs_dir: str = "runs", out: str | None = None, *, key: str | None = None, method: str | None = None,
            task: str | None = None, seed: int | None = None, push_to_hub: str | None = None, private: bool = False):
    """``peftbench export``: write a finished run (by key prefix, or method/task/seed) as a Hugging Face hub folder
    (:func:`peftbench.export.export_folder`) and, with ``push_to_hub="user/repo"``, upload it. Returns the
    :class:`peftbench.export.ExportedFolder`."""
    from ..export import export_folder
    from ..export import push_to_hub as push

    done = export_folder(runs_dir, out, key=key, method=method, task=task, seed=seed, repo=push_to_hub)
    if push_to_hub:
        push(done.folder, push_to_hub, private=private)
    return done
