"""GLoRA's layer and model as the official code builds them (Arnav0400/ViT-Slim@0fed674 GLoRA/layer.py, utils.py:6-20;
docs/methods/glora_search.md).

Every Linear of every block (qkv, proj, fc1, fc2: ``set_glora`` wraps every ``nn.Linear`` but the head) computes

    y = x (W + W ⊙ A + B)ᵀ + b + b ⊙ D + E + W C

with each of A, B (out × in), C (in × 1), D, E (out) one of its *paths*: ``lora`` (A = A_d A_u of rank r), ``vector``
(the first column of A_d: one value per row), ``constant`` (A_d[0, 0]), ``none`` (0). A configuration of a layer picks
one path per term (A, B: 4 choices, C: 3 without the constant, D, E: 3 without LoRA: 432 in all). The supernet holds
every path at full size and draws one configuration per layer per forward while it trains (``random.choice`` in
``forward``); a fixed configuration holds only its own tensors (what a retrained subnet trains), with the official
count: LoRA out·r + in·r (C: in·r + r), vector out (C: in), constant 1, none 0.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.methods import TunedViT

AB = ("lora", "vector", "constant", "none")  # layer.py:9 (config_A_B, in this order)
C_PATHS = ("lora", "vector", "none")  # layer.py:10
DE = ("constant", "none", "vector")  # layer.py:11
TERMS = "ABCDE"
CHOICES = {"A": AB, "B": AB, "C": C_PATHS, "D": DE, "E": DE}
# every configuration, in the official nesting order (layer.py:12-19): random.choice draws from this list
CONFIGS = [(a, b, c, d, e) for a in AB for b in AB for c in C_PATHS for d in DE for e in DE]
LETTER = {"lora": "L", "vector": "v", "constant": "c", "none": "n"}
PATH = {v: k for k, v in LETTER.items()}
LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # named_modules order within a block
Config = tuple  # (A, B, C, D, E) path names


def encode(configs) -> str:
    """``LLvcn,nnnnn,...``: five letters per layer (L lora, v vector, c constant, n none), layers comma-separated."""
    return ",".join("".join(LETTER[p] for p in cfg) for cfg in configs)


def decode(text: str, layers: int) -> list[Config]:
    parts = [p for p in str(text).replace(" ", "").split(",") if p]
    if len(parts) != layers:
        raise ValueError(f"glora-search: paths has {len(parts)} layer configurations, the backbone {layers} "
                         f"(4 per block: qkv, proj, fc1, fc2)")
    out = []
    for i, part in enumerate(parts):
        cfg = tuple(PATH.get(ch, "?") for ch in part)
        if len(part) != 5 or any(p not in CHOICES[t] for p, t in zip(cfg, TERMS)):
            raise ValueError(f"glora-search: paths layer {i}: {part!r} is not five letters A B C D E from "
                             f"A/B: L v c n, C: L v n, D/E: c n v")
        out.append(cfg)
    return out


def config_count(cfg: Config, n_in: int, n_out: int, rank: int) -> int:
    """The official count of one layer's configuration (evolution_utils.py:67-103)."""
    total = 0
    for term, path in zip(TERMS, cfg):
        rows, cols = (n_in, 1) if term == "C" else (n_out, n_in)
        if path == "lora":
            total += rows * rank + cols * rank
        elif path == "vector":
            total += rows
        elif path == "constant":
            total += 1
    return total


class GLoRALinear(nn.Module):
    """A frozen Linear (``base``) with GLoRA's five terms; ``config`` None: the supernet (every path, full size)."""

    def __init__(self, base: nn.Linear, rank: int, config: Config | None = None):
        super().__init__()
        self.base, self.rank, self.fixed = base, int(rank), config
        n_out, n_in = base.out_features, base.in_features
        full = config is None
        paths = config or ("lora", "lora", "lora", "vector", "vector")
        for term, path in zip("AB", paths[:2]):  # layer.py:21-22: (out, r) zeros and (r, in) zeros
            self._pair(term, path, n_out, n_in, full)
        self._pair("C", paths[2], n_in, 1, full)  # layer.py:23: shape (in, 1)
        for term, path in zip("DE", paths[3:]):  # layer.py:24-25: zeros(out)
            size = n_out if full or path == "vector" else 1 if path == "constant" else 0
            self.register_parameter(term, nn.Parameter(torch.zeros(size)) if size else None)
        for term in "ABC":  # layer.py:27-29, in this order
            up = getattr(self, term + "u")
            if up is not None:
                nn.init.xavier_uniform_(up)
        self.config: Config | None = config

    def _pair(self, term: str, path: str, rows: int, cols: int, full: bool) -> None:
        if full or path == "lora":
            down, up = torch.zeros(rows, self.rank), torch.zeros(self.rank, cols)
        elif path == "vector":
            down, up = torch.zeros(rows, 1), None
        elif path == "constant":
            down, up = torch.zeros(1, 1), None
        else:
            down = up = None
        self.register_parameter(term + "d", nn.Parameter(down) if down is not None else None)
        self.register_parameter(term + "u", nn.Parameter(up) if up is not None else None)

    def _path(self, path: str, down, up):
        """prepare_path (layer.py:31-54): the term's value under ``path`` (0 for none)."""
        if up is not None and path == "lora":
            return down[:, :self.rank] @ up[:self.rank, :]
        if path == "vector":
            return down[:, 0:1] if down.dim() == 2 else down
        if path == "constant":
            return down[0, 0] if down.dim() == 2 else down[0]
        return 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg is None:
            raise RuntimeError("glora-search: the supernet layer has no configuration (GLoRAViT sets one per forward)")
        w, b = self.base.weight, self.base.bias
        a = self._path(cfg[0], self.Ad, self.Au)
        bb = self._path(cfg[1], self.Bd, self.Bu)
        c = self._path(cfg[2], self.Cd, self.Cu)
        d = self._path(cfg[3], self.D, None)
        e = self._path(cfg[4], self.E, None)
        weight = w + w * a + bb  # layer.py:70
        bias = (b + b * d + e) if b is not None else e  # layer.py:71-74
        prompt = (w @ c).squeeze() if torch.is_tensor(c) else 0.0  # layer.py:75 (C none: 0)
        return F.linear(x, weight, bias + prompt)


    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """A plain Linear with this configuration's weight W + W ⊙ A + B and bias b + b ⊙ D + E + W C."""
        w, b = self.base.weight, self.base.bias
        cfg = self.config
        a, bb, c = (self._path(cfg[i], getattr(self, t + "d"), getattr(self, t + "u")) for i, t in enumerate("ABC"))
        d, e = self._path(cfg[3], self.D, None), self._path(cfg[4], self.E, None)
        out = nn.Linear(self.base.in_features, self.base.out_features, device=w.device, dtype=w.dtype)
        out.weight.copy_(w + w * a + bb)
        bias = (b + b * d + e) if b is not None else e
        out.bias.copy_(bias + ((w @ c).squeeze() if torch.is_tensor(c) else 0.0) + torch.zeros_like(out.bias))
        return out


class GLoRAViT(TunedViT):
    """The frozen ViT with a :class:`GLoRALinear` in place of every block Linear, and the head. ``configs``: one
    fixed configuration per layer; None: the supernet, which draws one per layer per forward while training."""

    def __init__(self, backbone: nn.Module, num_classes: int, rank: int, configs: list[Config] | None,
                 seed: int = 0):
        super().__init__(backbone, num_classes)
        wrapped = []
        i = 0
        for block in backbone.blocks:
            for path in LINEARS:
                parent, name = block.get_submodule(path.rsplit(".", 1)[0]), path.rsplit(".", 1)[1]
                layer = GLoRALinear(getattr(parent, name), rank, configs[i] if configs is not None else None)
                setattr(parent, name, layer)
                wrapped.append(layer)
                i += 1
        self.glora_layers = wrapped
        self.rank = int(rank)
        self.supernet = configs is None
        self._rng = random.Random(seed)
        for layer in wrapped:  # (created after TunedViT froze the backbone: trainable; their base Linear stays frozen)
            assert all(p.requires_grad for p in layer.parameters(recurse=False))

    def set_configs(self, configs) -> None:
        """Run one configuration per layer (the search's ``set_config``, evolution_utils.py:62-66)."""
        for layer, cfg in zip(self.glora_layers, configs, strict=True):
            layer.config = tuple(cfg)

    def draw(self) -> list[Config]:
        """One random configuration per layer, in forward order (the supernet's ``random.choice`` per forward)."""
        return [self._rng.choice(CONFIGS) for _ in self.glora_layers]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # the supernet draws while training, and in eval mode before anything set a configuration (the official layer
        # draws whenever no eval_config is set); the search sets one (set_configs) before scoring
        if self.supernet and (self.training or self.glora_layers[0].config is None):
            self.set_configs(self.draw())
        return super().features(x)

    def count(self, configs) -> int:
        """The official count of a configuration of every layer (evolution_utils.py:105-114), head excluded."""
        return sum(config_count(cfg, layer.base.in_features, layer.base.out_features, self.rank)
                   for layer, cfg in zip(self.glora_layers, configs, strict=True))

    def merged(self) -> nn.Module | None:
        """Every layer folded into a plain Linear under its configuration (a supernet: under the last one set)."""
        import copy

        from peftbench.layers.merge import plain_vit, replace_wrappers

        if any(layer.config is None for layer in self.glora_layers):
            return None
        backbone = copy.deepcopy(self.backbone)
        replace_wrappers(backbone, GLoRALinear, lambda m: m.fold())
        return plain_vit(backbone, self.head)

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        if self.supernet and all(layer.config is not None for layer in self.glora_layers):
            counts["tuned"] = self.count([layer.config for layer in self.glora_layers]) + counts["head"]
        return counts
