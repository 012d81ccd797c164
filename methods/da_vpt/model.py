"""DA-VPT's model: deep prompts with P class-guided ("proxy") prompts in the last d blocks, partial bias / LayerNorm
tuning, and the proxy-anchor loss that pulls each image towards the prompt of its class group (docs/methods/da-vpt.md).

Official code: Noahsark/DA-VPT@1a5ac60939bf (``models/vpt.py``, ``models/criterion.py``, ``model_creator.py``,
``train.py``); the line numbers below are of that commit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.layers.timm_parts import vit_stem
from peftbench.methods import TunedViT

# criterion.py defaults, never overridden by a config (params.py:31-34: loss_oproxy_{pos,neg}_{alpha,delta})
ALPHA = 32.0
DELTA_POS = 0.1
DELTA_NEG = -0.1
KMEANS_TOL = 1e-4  # model_creator.py:197 (cosine_kmeans: tol, max_iter)
KMEANS_ITERS = 20


class SplitQKVBias(nn.Module):
    """timm's fused ``attn.qkv`` Linear with its bias held as three (D,) parameters, so that the q, k and v biases train
    or stay frozen one by one (the official ``separate_qkv_params`` splits the Linear: attn.py:66-78). Same output."""

    def __init__(self, qkv: nn.Linear):
        super().__init__()
        dim = qkv.out_features // 3
        self.weight = qkv.weight
        bias = qkv.bias.detach() if qkv.bias is not None else torch.zeros(3 * dim, dtype=qkv.weight.dtype)
        self.q_bias, self.k_bias, self.v_bias = (nn.Parameter(b.clone(), requires_grad=False)
                                                 for b in bias.split(dim))
        self.in_features, self.out_features = qkv.in_features, qkv.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, torch.cat([self.q_bias, self.k_bias, self.v_bias]))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The q projection alone (the official ``attn._q``)."""
        dim = self.q_bias.shape[0]
        return F.linear(x, self.weight[:dim], self.q_bias)


def xavier_prompts(layers: int, length: int, dim: int) -> torch.Tensor:
    """``nn.init.xavier_uniform_`` of a (layers, length, D) tensor, divided by 8 (``init_divide_by8``: vpt.py:177-193):
    torch's fans of a 3-D tensor give U(±sqrt(6 / (D·(length + layers))) / 8)."""
    t = torch.empty(layers, length, dim)
    if t.numel():
        nn.init.xavier_uniform_(t)
    return t / 8.0


@torch.no_grad()
def cosine_kmeans(data: torch.Tensor, k: int, centroids: torch.Tensor | None, generator: torch.Generator,
                  tol: float = KMEANS_TOL, max_iter: int = KMEANS_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """model_creator.py:196-256 (``cosine_kmeans``, ``kmeans_norm = layer``): the classes' mean features (C, D), rows
    of zeros (classes not seen) left out; the others layer-normalised without affine; centroids a random subset of k of
    them (or ``centroids``: warm start); then up to ``max_iter`` rounds of cosine-argmax assignment and mean update
    (an empty cluster keeps its centroid), stopping when the centroids moved less than ``tol`` in summed L2 norm
    (the assignment is then the one to the unmoved centroids). Zero rows get random clusters. Returns (centroids,
    assignment of every class). The random draws use ``generator`` (the official: torch's global RNGs)."""
    zero = (data == 0).all(dim=1)
    rows = data[~zero]
    rows = F.layer_norm(rows, rows.shape[1:])
    if centroids is None:
        if rows.shape[0] < k:
            raise ValueError(f"k-means: {rows.shape[0]} classes with features, fewer than k = {k}")
        centroids = rows[torch.randperm(rows.shape[0], generator=generator)[:k]]
    assignment = torch.zeros(rows.shape[0], dtype=torch.long)
    for _ in range(max_iter):
        assignment = F.cosine_similarity(rows[:, None], centroids[None, :], dim=2).argmax(dim=1)
        moved = torch.stack([rows[assignment == i].mean(dim=0) if bool((assignment == i).any()) else centroids[i]
                             for i in range(k)])
        if torch.norm(centroids - moved, dim=1).sum() < tol:
            break
        centroids = moved
    zero = zero.cpu()
    out = torch.empty(data.shape[0], dtype=torch.long)
    out[~zero] = assignment.cpu()
    out[zero] = torch.randint(k, (int(zero.sum()),), generator=generator)
    return centroids, out


@torch.no_grad()
def update_class_means(means: torch.Tensor, counts: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> None:
    """criterion.py:78-88: fold a batch into each class's running mean (``means`` (C, D) and ``counts`` (C,), in
    place), in the official update order: mean = (mean · n + Σ batch) / (n + m)."""
    for label in labels.unique():
        mask = labels == label
        c = int(label)
        means[c] = (means[c] * counts[c] + features[mask].to(means.dtype).sum(0)) / (counts[c] + mask.sum())
        counts[c] += mask.sum()


def masked_logsumexp(sims: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """criterion.py:568-585 over the batch (dim 0, proxy-anchor): log(1 + Σ_{b: mask} exp(sims_b)) per proxy, and 0 for
    a proxy without any masked entry. (1, P)."""
    sims = sims.masked_fill(~mask, torch.finfo(sims.dtype).min)
    sims = torch.cat([sims, torch.zeros(1, sims.shape[1], dtype=sims.dtype, device=sims.device)], dim=0)
    out = torch.logsumexp(sims, dim=0, keepdim=True)
    return out.masked_fill(~mask.any(dim=0, keepdim=True), 0)


def proxy_anchor(features: torch.Tensor, prompts: torch.Tensor, groups: torch.Tensor, scale: float) -> torch.Tensor:
    """criterion.py:501-565 (``ml_patch_forward``; ``ml_cls_forward`` is the same with other features): S = scale ·
    cos(features_b, prompt_p); mean over the P prompts of log(1 + Σ_{b in p} exp(−α(S − δ⁺))) plus the mean of
    log(1 + Σ_{b not in p} exp(α(S − δ⁻))); ``groups``: each image's prompt (its class's, through the mapping)."""
    wide = torch.promote_types(torch.promote_types(features.dtype, prompts.dtype), torch.float32)  # (fp16 / bf16 in)
    f = F.normalize(features.to(wide), dim=-1)
    p = F.normalize(prompts.to(wide), dim=-1) * scale
    sims = f.mm(p.T)  # (B, P)
    same = groups[:, None] == torch.arange(prompts.shape[0], device=groups.device)[None, :]
    pos = masked_logsumexp(-ALPHA * (sims - DELTA_POS), same)
    neg = masked_logsumexp(ALPHA * (sims - DELTA_NEG), ~same)
    return pos.mean() + neg.mean()


class DaVptViT(TunedViT):
    """The frozen ViT with deep prompts: ``proxies`` class-guided prompts in each of the last ``guided`` blocks and
    ``prompts`` plain ones in the others (replaced at every block, after the CLS token, no position embedding, no
    dropout: vpt.py:334-364), the chosen biases and LayerNorms of the ViT trained in place, and the head.

    While training, the guided blocks keep their input x_l and the q projection of its CLS token, and
    :meth:`step_loss` adds (1/d) Σ_l [w_patch · PA(mean of x_l's image tokens) + w_cls · PA(q_CLS)] to the cross
    entropy, PA the proxy-anchor loss of those features against the layer's raw prompts, each image assigned the prompt
    of its class (``mapping``). From epoch ``dynamic_from`` on (0: never), the classes' mean final features of each
    epoch's training forwards re-cluster the classes at the epoch's end, warm-started (train.py:121-125,187-195)."""

    def __init__(self, backbone: nn.Module, num_classes: int, *, proxies: int, guided: int, prompts: int,
                 w_patch: float, w_cls: float, scale: float, dynamic_from: int, train: dict[str, bool], seed: int = 0):
        super().__init__(backbone, num_classes)
        depth, dim = len(backbone.blocks), backbone.embed_dim
        if not 1 <= guided <= depth:
            raise ValueError(f"guided={guided}: the backbone has {depth} blocks (1 to {depth} guided blocks)")
        self.all_classes = num_classes < proxies  # train.py:337-339: one prompt per class then
        self.num_proxies = num_classes if self.all_classes else int(proxies)
        self.guided = list(range(depth - guided, depth))
        self.num_prompts = int(prompts)
        self.w_patch, self.w_cls, self.scale = float(w_patch), float(w_cls), float(scale)
        self.dynamic_from = int(dynamic_from)
        self.seed = int(seed)
        self.proxy_prompts = nn.Parameter(xavier_prompts(len(self.guided), self.num_proxies, dim))
        self.other_prompts = nn.Parameter(xavier_prompts(depth - len(self.guided), self.num_prompts, dim))
        trained: list[nn.Parameter] = []
        for block in backbone.blocks:
            block.attn.qkv = SplitQKVBias(block.attn.qkv)
            qkv = block.attn.qkv
            trained += [p for flag, p in (("bias_q", qkv.q_bias), ("bias_k", qkv.k_bias), ("bias_v", qkv.v_bias))
                        if train[flag]]
            if train["bias_fc2"]:
                trained.append(block.mlp.fc2.bias)
            if train["bias_norm2"]:
                trained.append(block.norm2.bias)
            if train["bias_proj"]:
                trained.append(block.attn.proj.bias)
            if train["norm1"]:
                trained += [block.norm1.weight, block.norm1.bias]
        if train["bias_proj"]:  # the official name test on "proj.bias" also matches the patch embedding's
            trained.append(backbone.patch_embed.proj.bias)
        if train["cls"]:
            trained.append(backbone.cls_token)
        for p in trained:
            p.requires_grad_(True)
        # the class -> prompt mapping (identity with one prompt per class; else the k-means job's, loaded with
        # init_state), the warm-start centroids, and the epoch's running class means
        self.register_buffer("mapping", torch.arange(num_classes) if self.all_classes
                             else torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("centroids", torch.zeros(self.num_proxies, dim))
        self.register_buffer("has_centroids", torch.zeros((), dtype=torch.long))
        self.register_buffer("class_mean", torch.zeros(num_classes, dim))
        self.register_buffer("class_count", torch.zeros(num_classes, dtype=torch.long))
        # 1 once a mapping is in place (the identity, or the job's file sets it): training without one would send
        # every class to prompt 0
        self.register_buffer("mapped", torch.tensor(int(self.all_classes)))
        self._collect = False
        self._guided: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._cls: torch.Tensor | None = None

    # -- the forward --------------------------------------------------------------------------------------------
    def layer_prompts(self, layer: int) -> torch.Tensor:
        first = self.guided[0]
        return self.proxy_prompts[layer - first] if layer >= first else self.other_prompts[layer]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.backbone
        x = vit_stem(vit, x)
        n = vit.num_prefix_tokens
        tokens = x.shape[1] - n
        batch = x.shape[0]
        keep = self.training and (self.w_patch != 0 or self.w_cls != 0)
        self._guided = []
        for i, block in enumerate(vit.blocks):
            prompts = self.layer_prompts(i)
            x = torch.cat([x[:, :n], prompts.to(x.dtype).unsqueeze(0).expand(batch, -1, -1), x[:, x.shape[1] - tokens:]],
                          dim=1)
            if keep and i >= self.guided[0]:
                self._guided.append((i, x, prompts))
            x = block(x)
        out = vit.forward_head(vit.norm(x), pre_logits=True)
        self._cls = out.detach() if self.training else None
        return out

    # -- the extra loss and the re-clustering (TunedViT's per-step hooks) -------------------------------------------
    def guided_loss(self, labels: torch.Tensor) -> torch.Tensor:
        """(1/d) Σ over the guided blocks of w_patch · PA(patch mean) + w_cls · PA(q of CLS) (vpt.py:366-380,
        criterion.py:406-433, 530: the patch branch reads the block input's image tokens, whatever ``patch_type``)."""
        groups = self.mapping[labels]
        n = self.backbone.num_prefix_tokens
        total = None
        for i, x, prompts in self._guided:
            block = self.backbone.blocks[i]
            term = None
            if self.w_patch != 0:
                patch = x[:, n + self.num_proxies:].mean(dim=1)
                term = self.w_patch * proxy_anchor(patch, prompts, groups, self.scale)
            if self.w_cls != 0:
                q_cls = block.attn.qkv.query(block.norm1(x[:, 0].to(block.norm1.weight.dtype)))
                cls_term = self.w_cls * proxy_anchor(q_cls, prompts, groups, self.scale)
                term = cls_term if term is None else term + cls_term
            total = term if total is None else total + term
        assert total is not None
        return total / len(self.guided)

    def start_training(self, total_steps: int) -> None:
        """(Called by the loop before the first step.) Training a clustered model with the extra loss needs the
        mapping job's file: without it every class would share prompt 0."""
        if not int(self.mapped) and (self.w_patch != 0 or self.w_cls != 0):
            raise ValueError("da-vpt: no class-to-prompt mapping loaded: the pipeline's `mapping` job writes it and the "
                             "training runs load it (extras init_state = <job key>.mapping.safetensors)")

    def step_loss(self, y: torch.Tensor) -> torch.Tensor | None:
        labels = y if y.dim() == 1 else y.argmax(dim=-1)  # (soft targets: their largest class)
        if self._collect and self._cls is not None:
            update_class_means(self.class_mean, self.class_count, self._cls, labels)
        loss = self.guided_loss(labels) if self._guided else None
        self._guided, self._cls = [], None
        return loss

    def recluster(self, epoch: int) -> None:
        """train.py:187-195, vpt.py:275-287 at the end of epoch ``epoch``: k-means of this epoch's class means,
        warm-started from the centroids; the mapping changes only when it uses more than one prompt (else the
        centroids are dropped and the next round starts from a random subset)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        start = self.centroids if int(self.has_centroids) else None
        centroids, mapping = cosine_kmeans(self.class_mean, self.num_proxies, start, g)
        if len(mapping.unique()) > 1:
            self.mapping.copy_(mapping.to(self.mapping.device))
            self.centroids.copy_(centroids)
            self.has_centroids.fill_(1)
        else:
            self.has_centroids.fill_(0)

    def dynamic(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) collects class means and re-clusters at its end (train.py:121-125)."""
        return self.dynamic_from > 0 and epoch >= self.dynamic_from and not self.all_classes

    def start_epoch(self, epoch: int, epochs: int) -> None:
        if epoch > 0 and self.dynamic(epoch - 1):
            self.recluster(epoch - 1)
        self.class_mean.zero_()
        self.class_count.zero_()
        self._collect = self.dynamic(epoch)

    def step_state(self) -> dict[str, torch.Tensor]:
        return {"mapping": self.mapping, "centroids": self.centroids, "has_centroids": self.has_centroids,
                "class_mean": self.class_mean, "class_count": self.class_count}

    def load_step_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        missing = sorted(set(self.step_state()) - set(state))
        if missing:
            raise ValueError(f"{where}: no DA-VPT clustering state ({', '.join(missing)}) in the checkpoint")
        with torch.no_grad():
            for name, value in state.items():
                getattr(self, name).copy_(value)


def trained_count(depth: int, dim: int, guided: int, proxies: int, prompts: int, train: dict[str, bool]) -> int:
    """The trained tensors without the head (docs/methods/da-vpt.md): D·(d·P + (L_depth − d)·L) + D·[cls] +
    L_depth·D·(bias_q + bias_k + bias_v + bias_fc2 + bias_norm2 + bias_proj) + D·[bias_proj] + L_depth·2D·[norm1]."""
    biases = sum(bool(train[k]) for k in ("bias_q", "bias_k", "bias_v", "bias_fc2", "bias_norm2", "bias_proj"))
    return (dim * (guided * proxies + (depth - guided) * prompts) + dim * train["cls"] + depth * dim * biases
            + dim * train["bias_proj"] + depth * 2 * dim * train["norm1"])

