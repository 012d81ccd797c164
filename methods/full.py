"""Full fine-tuning ("end2end", docs/methods/full.md): every parameter trained, backbone in train mode.

The VPT code's full fine-tuning has dropout 0.1 after the embeddings and inside the MLPs (attention
dropout 0); timm's ViT defaults to 0, so ``dropout`` (default 0.1) is set on those modules here.
Optimiser: the VPT code's AdamW quirk (``vpt-adamw``, see peftbench.train.optim).
"""
from peftbench.methods import FULL_FT_RECIPE, Method, Option, TunedViT, register_method


@register_method
class Full(Method):
    name = "full"
    aliases = ("end2end", "finetune", "full-finetune")
    description = "full fine-tuning: all backbone parameters + head (docs/methods/full.md)"
    recipe = FULL_FT_RECIPE
    options = {"dropout": Option(0.1, "dropout after the embeddings and in the MLPs (VPT code: 0.1)", min=0.0, max=1.0)}

    def build(self, backbone, num_classes, opts):
        model = TunedViT(backbone, num_classes)
        for p in backbone.parameters():
            p.requires_grad = True
        rate = float(opts["dropout"])
        backbone.pos_drop.p = rate
        for block in backbone.blocks:
            block.mlp.drop1.p = rate
            block.mlp.drop2.p = rate
        model.train_modules.append(backbone)
        return model
