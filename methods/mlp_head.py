"""MLP-3 row of the VPT tables (VPT code ``src/models/mlp.py`` with ``MODEL.MLP_NUM 2``, docs/methods/mlp_head.md).

Backbone frozen (eval mode); the head is the VPT code's ``MLP``: ``hidden_layers`` times
[Linear(D, D) (kaiming-normal fan_out weight), ReLU, BatchNorm1d(D), Dropout(0.1)], then
``last_layer`` = Linear(D, C) with the usual head init (docs/methods/README.md §2). Linear-probe recipe. The features
depend on nothing trained, so the engine caches them (``frozen_features``).

Parameters for ViT-B/16: hidden layers 2·(768·768 + 768 + 2·768) = 1,184,256, + 769·C for the last
layer (reported as ``head``; the hidden layers count as ``trainable_without_head``, as docs/methods/README.md §4 writes
the formula). Weight decay: all but ``last_layer.bias``.
"""

from torch import nn

from peftbench.methods import LINEAR_RECIPE, Method, Option, TunedViT, make_head, register_method


class MlpHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, hidden_layers: int = 2, dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(hidden_layers):
            fc = nn.Linear(dim, dim)
            nn.init.kaiming_normal_(fc.weight, a=0, mode="fan_out")
            layers += [fc, nn.ReLU(), nn.BatchNorm1d(dim)]
            if dropout != 0:
                layers.append(nn.Dropout(dropout))
        self.projection = nn.Sequential(*layers)
        self.last_layer = make_head(dim, num_classes)

    def forward(self, x):
        return self.last_layer(self.projection(x))


class MlpHeadModel(TunedViT):
    def no_weight_decay(self) -> set[str]:
        return {"head.last_layer.bias"}

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        last = sum(p.numel() for p in self.head.last_layer.parameters() if p.requires_grad)
        counts["trainable_without_head"] = counts["trainable"] - last
        counts["head"] = last
        return counts


@register_method
class Mlp3(Method):
    name = "mlp-3"
    aliases = ("mlp",)
    description = "MLP-3: frozen backbone, 3-layer MLP head with BatchNorm and dropout (docs/methods/mlp_head.md)"
    # the linear probe's recipe; demo lr chosen on val200 (results/demo-hparam-search.csv)
    recipe = LINEAR_RECIPE.for_protocol("demo", lr=0.1)
    frozen_features = True
    fusable = True
    options = {
        "hidden_layers": Option(2, "hidden Linear-ReLU-BatchNorm-Dropout layers before the last Linear (MLP-3: 2)", min=0),
        "dropout": Option(0.1, "dropout after each hidden layer (VPT code: 0.1)", min=0.0, max=1.0),
    }

    def build(self, backbone, num_classes, opts):
        dim = backbone.num_features
        head = MlpHead(dim, num_classes, int(opts["hidden_layers"]), float(opts["dropout"]))
        return MlpHeadModel(backbone, num_classes, head=head)
