"""Partial-1 row of the VPT tables (VPT code ``partial-1``, docs/methods/partial.md).

Trainable: the last transformer block + the final LayerNorm + the head. The VPT code keeps the
encoder in eval mode for this transfer type (``froze_enc``), so no dropout runs in the trained block
either. Optimiser: the full fine-tuning recipe. Parameters for ViT-B/16: 7,089,408 + 769·C.
"""

from peftbench.methods import FULL_FT_RECIPE, Method, TunedViT, register_method


@register_method
class Partial1(Method):
    name = "partial-1"
    aliases = ("partial",)
    description = "Partial-1: last block + final norm + head (docs/methods/partial.md)"
    recipe = FULL_FT_RECIPE.for_protocol("demo", lr=0.02)  # chosen on val200 (results/demo-hparam-search.csv)
    blocks = 1  # the VPT code also has partial-2 / partial-4 (last 2 / 4 blocks)
    fusable = True  # the first blocks are shared, the last block stacked per configuration

    def build(self, backbone, num_classes, opts):
        model = TunedViT(backbone, num_classes)
        for module in (*backbone.blocks[-self.blocks:], backbone.norm):
            for p in module.parameters():
                p.requires_grad = True
        return model
