"""Linear probe (docs/methods/linear.md): frozen backbone in eval mode, CLS feature after the final norm → Linear head.

Trainable: the head only (769·C for ViT-B/16). The features depend on nothing trained, so the engine
computes them once and trains the head on cached features.
"""
from peftbench.methods import LINEAR_RECIPE, Method, TunedViT, register_method


@register_method
class Linear(Method):
    name = "linear"
    aliases = ("linear-probe",)
    description = "linear probe: frozen backbone, trained Linear head (docs/methods/linear.md)"
    recipe = LINEAR_RECIPE  # SGD, batch 1024, 100 epochs, warm-up 10, VPT lr x wd grid
    frozen_features = True
    fusable = True
    families = ("vit", "swin")  # Swin: the average of the final tokens after the final norm (timm's own pooling)

    def build(self, backbone, num_classes, opts):
        return TunedViT(backbone, num_classes)
