"""LST's ladder on a timm ViT, its Fisher importance and the structural pruning that initialises it (docs/methods/lst.md;
ylsung/Ladder-Side-Tuning@1798e82, the encoder side network of ``seq2seq/third_party/models/t5/modeling_side_t5.py``
and ``bart/modeling_bart_encoder.py``, ``seq2seq/pruning/fisher.py``, ``seq2seq/pruning/pruning_methods.py``).

The frozen ViT runs as it is; the side network never feeds back into it, so nothing in the backbone needs a gradient
(it runs without an autograd graph: LST's memory saving). With d = D / r (r the reduction factor) and L' the side
layers (the official T5-base scripts: every block but 0, 4 and 8):

    s   = W_0 e + b_0                                     e: the embedded tokens (patches + CLS + positions)
    for every block i:  z_i = block_i(z_{i-1})            (frozen)
        if i in L':  g_i = σ(α_i / T);  s = g_i s + (1 − g_i)(W_i z_i + b_i);  s = side_block_i(s)
    logits = head( pool( U · LN_side(s) + c ) )

side_block_i is a ViT block of width d, the backbone's heads (head width D/(r·H)) and MLP width 4D/r; W_0, W_i: D → d
and U: d → D are N(0, 0.01²) with zero bias (the official ``_init_weights`` for its added Linear layers); α_i = 0
(``gate_alpha``), T = 0.1 (``gate_T``). The side blocks and LN_side start from the backbone's own weights, pruned by
:func:`prune_side_weights` with the Fisher information of :func:`fisher_importance` (``fisher-v2``).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.layers.timm_parts import vit_stem
from peftbench.methods import TunedViT

DOWN_STD = 0.01  # modeling_side_t5.py:797-802 (_init_weights of an added nn.Linear: N(0, 0.01²), bias 0)
# the Linear weights whose Fisher information chooses the kept rows (the embedding's and every block's)
BLOCK_WEIGHTS = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")
EMBED_WEIGHT = "patch_embed.proj.weight"


def default_side_layers(depth: int) -> list[int]:
    """The official T5-base ladder: every block but every fourth from the first (ladder_side_tuning_base.sh:19,
    ``encoder_side_layers=[1,2,3,5,6,7,9,10,11]``); other depths keep the rule (a generalisation)."""
    return [i for i in range(depth) if i % 4 != 0]


def parse_side_layers(raw: str, depth: int) -> list[int]:
    """``auto`` (:func:`default_side_layers`), ``all``, or 0-based blocks and ranges: ``1-3,5-7,9-11``."""
    if raw == "auto":
        return default_side_layers(depth)
    if raw == "all":
        return list(range(depth))
    out: set[int] = set()
    try:
        for part in str(raw).split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"lst: side_layers {raw!r} is not auto, all or a list of 0-based blocks like 1-3,5") from None
    bad = sorted(i for i in out if not 0 <= i < depth)
    if bad or not out:
        raise ValueError(f"lst: side_layers {raw!r} names blocks outside the backbone's 0..{depth - 1}")
    return sorted(out)


def _check(backbone: nn.Module, reduction: int) -> tuple[int, int, int]:
    """(D, heads, MLP width) of a backbone LST can ladder with factor ``reduction``; a one-line error otherwise."""
    from timm.models.vision_transformer import Block

    blocks = list(backbone.blocks)
    if not all(type(b) is Block for b in blocks):
        raise ValueError(f"lst: the side network copies timm's ViT Block; this backbone has {type(blocks[0]).__name__}")
    b0 = blocks[0]
    if not isinstance(b0.attn.q_norm, nn.Identity):
        raise ValueError("lst: a backbone with query/key norms is not supported (the pruning has no rule for them)")
    width, heads, hidden = backbone.embed_dim, b0.attn.num_heads, b0.mlp.fc1.out_features
    for what, n in (("width", width), ("MLP width", hidden)):
        if n % reduction:
            raise ValueError(f"lst: reduction {reduction} does not divide the backbone's {what} {n}")
    if (width // reduction) % heads:
        raise ValueError(f"lst: the side width {width // reduction} (width / reduction) is not a multiple of the "
                         f"backbone's {heads} heads")
    return width, heads, hidden


def side_block(block: nn.Module, width: int, heads: int, hidden: int) -> nn.Module:
    """A timm ViT block like ``block`` (its norms, activation, biases, layer scale, dropout rates) of width ``width``
    and MLP width ``hidden``."""
    from timm.models.vision_transformer import Block

    ls = getattr(block.ls1, "gamma", None)
    return Block(dim=width, num_heads=heads, mlp_ratio=hidden / width, qkv_bias=block.attn.qkv.bias is not None,
                 proj_bias=block.attn.proj.bias is not None, proj_drop=float(block.attn.proj_drop.p),
                 attn_drop=float(block.attn.attn_drop.p) if hasattr(block.attn.attn_drop, "p") else 0.0,
                 init_values=1.0 if ls is not None else None, act_layer=type(block.mlp.act),
                 norm_layer=functools.partial(type(block.norm1), eps=block.norm1.eps))


def _added_linear(n_in: int, n_out: int) -> nn.Linear:
    lin = nn.Linear(n_in, n_out)
    nn.init.normal_(lin.weight, std=DOWN_STD)
    nn.init.zeros_(lin.bias)
    return lin


class LSTModel(TunedViT):
    """The frozen ViT, the ladder (``first_down``, ``downs``, ``gates``, ``side``, ``side_norm``, ``up``) and the head."""

    def __init__(self, backbone: nn.Module, num_classes: int, reduction: int, side_layers: list[int],
                 gate_t: float, gate_alpha: float):
        super().__init__(backbone, num_classes)
        width, heads, hidden = _check(backbone, reduction)
        if backbone.global_pool not in ("token", "avg"):
            raise ValueError(f"lst: pooling {backbone.global_pool!r} is not supported (token or avg)")
        self.reduction, self.side_layers, self.gate_t = int(reduction), list(side_layers), float(gate_t)
        d = width // reduction
        self.first_down = _added_linear(width, d)
        self.downs = nn.ModuleDict({str(i): _added_linear(width, d) for i in side_layers})
        self.gates = nn.ParameterDict({str(i): nn.Parameter(torch.full((1,), float(gate_alpha))) for i in side_layers})
        self.side = nn.ModuleDict({str(i): side_block(backbone.blocks[i], d, heads, hidden // reduction)
                                   for i in side_layers})
        norm = backbone.norm
        self.side_norm = type(norm)(d, eps=norm.eps)
        self.up = _added_linear(d, width)
        self.train_modules += [self.first_down, self.downs, self.side, self.side_norm, self.up]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        with torch.no_grad():  # the backbone is frozen and reads nothing from the ladder: no graph through it
            z = vit_stem(bb, x)
        s = self.first_down(z)
        for i, block in enumerate(bb.blocks):
            with torch.no_grad():
                z = block(z)
            key = str(i)
            if key in self.side:
                g = torch.sigmoid(self.gates[key] / self.gate_t)
                s = self.side[key](g * s + (1 - g) * self.downs[key](z))
        h = self.up(self.side_norm(s))
        return h[:, 0] if bb.global_pool == "token" else h[:, bb.num_prefix_tokens:].mean(dim=1)

    def backbone_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head on the plain ViT's features (the Fisher pass: the pretrained model with the new head)."""
        bb = self.backbone
        return self.head(bb.forward_head(bb.forward_features(x), pre_logits=True))

    def side_state_names(self) -> dict[str, str]:
        """Side-network tensor -> the backbone tensor its pruned copy comes from (the Fisher job's artifact keys)."""
        names = {}
        for i in self.side_layers:
            for n, _ in self.side[str(i)].named_parameters():
                names[f"side.{i}.{n}"] = f"blocks.{i}.{n}"
        names.update({f"side_norm.{t}": f"norm.{t}" for t in ("weight", "bias")})
        return names


def fisher_importance(model: LSTModel, samples, prepare) -> dict[str, torch.Tensor]:
    """Σ over ``samples`` (an iterable of one-image batches (x, y)) of the squared gradient of the cross entropy of
    the pretrained ViT with the model's head, for the patch embedding's and every block's Linear weights (float64
    sums; the model in eval mode: fisher.py:30-63 with ``grad_type="square"``, the model as ``from_pretrained`` left it)."""
    bb = model.backbone
    params = dict(bb.named_parameters())
    wanted = [EMBED_WEIGHT] + [f"blocks.{i}.{w}" for i in range(len(bb.blocks)) for w in BLOCK_WEIGHTS]
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for n in wanted:
        params[n].requires_grad_(True)
    sums = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in wanted}
    model.eval()
    try:
        for x, y in samples:
            grads = torch.autograd.grad(F.cross_entropy(model.backbone_logits(prepare(x)), y.to(params[EMBED_WEIGHT].device)),
                                        [params[n] for n in wanted])
            for n, g in zip(wanted, grads):
                sums[n] += g.double() ** 2
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(was[n])
    return sums


def kept_rows(importance: torch.Tensor, reduction: int) -> torch.Tensor:
    """The rows kept by the official L1 rule (Torch-Pruning/torch_pruning/prune/strategy.py:43-56, ``LNStrategy`` with
    p = 1, amount = 1 − 1/r): the round(amount·n) rows of smallest L1 norm are pruned, the rest kept in the order of
    ``select_weights`` (pruning_methods.py:108-112), ``list(set(range(n)) - set(pruned))``: CPython's set iteration
    order, *not* ascending once a kept index exceeds the small set's table. It is reproduced as it is: the order
    decides which channels form each side head. Ties at the boundary: the lower row is pruned first (a
    stable sort; the official unstable argsort leaves it open)."""
    n = importance.shape[0]
    l1 = importance.reshape(n, -1).abs().sum(dim=1)
    n_prune = round((1 - 1 / reduction) * n)
    pruned = torch.argsort(l1, stable=True)[:n_prune].tolist()
    return torch.tensor(list(set(range(n)) - set(pruned)), dtype=torch.long)


def prune_side_weights(backbone: nn.Module, importance: dict[str, torch.Tensor], reduction: int) -> dict[str, torch.Tensor]:
    """The backbone's weights pruned to the side network's widths as ``pruning_without_residual`` (version 2, one
    pass) prunes T5 (pruning_methods.py:394-562), in the ViT's order: the embedding's kept channels (the rows of the
    patch embedding's importance: T5's ``shared.weight`` rule) → every block: norm1 → q, k, v (inputs: the previous
    kept channels; outputs: the L1 rule on the product of the three importances) → proj → norm2 → fc1 → fc2 → the
    final norm. The residual stream is not kept consistent across a block (the official "without residual"): each
    Linear picks its own output rows. Biases and layer scales follow their layer's kept rows. Returns backbone names
    (``blocks.<i>.<...>``, ``norm.<...>``) → pruned tensors."""
    p = {n: t.detach() for n, t in backbone.named_parameters()}
    imp = importance
    keep = kept_rows(imp[EMBED_WEIGHT], reduction).to(p[EMBED_WEIGHT].device)
    out: dict[str, torch.Tensor] = {}

    def vec(name, idx):
        if name in p:
            out[name] = p[name][idx].clone()

    for i in range(len(backbone.blocks)):
        pre = f"blocks.{i}."
        vec(pre + "norm1.weight", keep)
        vec(pre + "norm1.bias", keep)
        w, im = p[pre + "attn.qkv.weight"], imp[pre + "attn.qkv.weight"]
        ws, ims = w.chunk(3), [t[:, keep.to(t.device)] for t in im.chunk(3)]
        rows = kept_rows(ims[0] * ims[1] * ims[2], reduction).to(w.device)
        out[pre + "attn.qkv.weight"] = torch.cat([t[rows][:, keep] for t in ws])
        if pre + "attn.qkv.bias" in p:
            out[pre + "attn.qkv.bias"] = torch.cat([t[rows] for t in p[pre + "attn.qkv.bias"].chunk(3)])
        keep = rows
        for lin, after in (("attn.proj", ("ls1.gamma", "norm2.weight", "norm2.bias")), ("mlp.fc1", ()),
                           ("mlp.fc2", ("ls2.gamma",))):
            w, im = p[f"{pre}{lin}.weight"], imp[f"{pre}{lin}.weight"]
            rows = kept_rows(im[:, keep.to(im.device)], reduction).to(w.device)
            out[f"{pre}{lin}.weight"] = w[rows][:, keep].clone()
            vec(f"{pre}{lin}.bias", rows)
            keep = rows
            for name in after:
                vec(pre + name, keep)
    vec("norm.weight", keep)
    vec("norm.bias", keep)
    return out
