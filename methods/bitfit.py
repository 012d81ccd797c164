"""BitFit / "Bias" row of the VPT tables (VPT code ``tinytl-bias``, docs/methods/bitfit.md).

Trainable: every backbone parameter whose name contains "bias" (attention, MLP, patch embedding and
LayerNorm biases) + the head; the backbone stays in eval mode. Optimiser: the full fine-tuning recipe
(the VPT code's AdamW quirk). Parameters for ViT-B/16: 102,912 + 769·C.

On Swin (a generalisation: VPT's tinytl-bias raises on Swin as released) the same bias vectors of every Linear,
LayerNorm and the patch embedding; Swin's relative-position bias tables are attention parameters, not bias vectors,
and stay frozen.
"""

from peftbench.methods import FULL_FT_RECIPE, Method, TunedViT, register_method


@register_method
class BitFit(Method):
    name = "bitfit"
    aliases = ("bias", "tinytl-bias")
    description = "BitFit: every backbone bias (incl. LayerNorm) + head (docs/methods/bitfit.md)"
    recipe = FULL_FT_RECIPE.for_protocol("demo", lr=0.08)  # chosen on val200 (results/demo-hparam-search.csv)
    fusable = True  # the frozen weights are shared, the biases stacked per configuration
    families = ("vit", "swin")

    def build(self, backbone, num_classes, opts):
        model = TunedViT(backbone, num_classes)
        for n, p in backbone.named_parameters():
            p.requires_grad = "bias" in n and "relative_position_bias_table" not in n
        return model
