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
