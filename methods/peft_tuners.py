"""LoRA and the other Hugging Face ``peft`` tuners that apply to a timm ViT's Linear layers.

One table, :data:`TUNERS` (name → config factory, description, options), and one
:class:`PeftTunerMethod` subclass registered per row, made programmatically at import time. Adding a
tuner is adding a row.

How a model is built: peft injects its layers into the timm backbone in place
(``peft.inject_adapter_in_model``; ``peft.get_peft_model`` for tuners whose state is shared between
layers, e.g. VeRA's random projections). The head is peftbench's own Linear (docs/methods/README.md §2 init,
trained and counted once; peft's ``modules_to_save`` is not used). Trainable: the parameters peft
marks trainable + the head. The backbone, the injected layers' frozen base layers included, stays in
eval mode; the injected layers and their dropout modules run in train mode while training.

``lora`` is the LoRA of NOAH and of the tables that copy it (docs/methods/peft_tuners.md): rank 8 on timm's fused
``qkv`` Linear of every block, ``lora_alpha`` = rank (scaling 1: NOAH has no α/r), dropout 0.1 on
the LoRA input, A kaiming-uniform(a=√5), B zeros: 36,864·r + 769·C parameters for ViT-B/16
(294,912 + head at r = 8). The other rows use peft's defaults unless stated, on the same ``qkv``
layers (``--set <tuner>.targets=qkv,proj,fc1,fc2`` widens them).

Recipe: NOAH's optimiser (AdamW, batch 64, warm-up 10, ``peftbench.methods.NOAH_RECIPE``) for the
VPT protocol's search; ``--protocol fixed`` runs NOAH's own fixed hyper-parameters. The demo
protocol uses LoRA's demo lr for every row unless the row sets its own ``demo_lr`` (chosen on val200:
``results/demo-hparam-search.csv``).

``peft`` is imported only when a model is built (``peftbench list`` stays fast); a row whose tuner
the installed peft lacks (older than its ``min_peft``) is not registered.
"""
from __future__ import annotations

import copy
import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from peftbench.errors import SettingsError, StoreError
from peftbench.layers.merge import is_plain_timm, plain_vit, wrap_module
from peftbench.methods import NOAH_RECIPE, Method, Option, TunedViT, register_method

ADAPTER_NAME = "default"


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tuner:
    """One peft tuner exposed as a method."""

    config: Callable[[dict[str, Any]], Any]  # resolved options -> peft.PeftConfig
    description: str
    options: dict[str, Option] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    min_peft: str = "0.15"  # first peft release that has the tuner (pyproject needs >= 0.15)
    demo_lr: float | None = None  # the demo protocol's base lr, when the shared one (LoRA's) does not suit
    # Method.fusable (docs/fused.md): False when peft's layer does not run under torch.func.vmap
    # (tests/test_fused.py trains every fusable row fused and separately)
    fusable: bool = True
    # the backbone families it tunes: a Swin block names its Linear layers as a ViT block does (attn.qkv, attn.proj,
    # mlp.fc1, mlp.fc2), so peft injects there alike (a generalisation: no paper's table has peft tuners on Swin);
    # ("vit",) for a row whose defaults need widths Swin-B's first stage lacks
    families: tuple[str, ...] = ("vit", "swin")
    # the model class (PeftTunedViT, or a subclass with per-step hooks: AdaLoRA's) and whether it keeps peft's tuner
    # object (the BaseTuner that injected the layers: AdaLoRA's rank allocator lives there)
    model: Any = None


def _targets(opts: dict[str, Any], key: str = "targets") -> list[str]:
    names = [t.strip() for t in str(opts[key]).split(",") if t.strip()]
    if not names:
        raise ValueError(f"option {key!r}: no layer names given")
    return names


def _alpha(opts: dict[str, Any]) -> float:
    return float(opts["rank"] if opts.get("alpha") in (None, "", "rank") else opts["alpha"])


def _peft():
    import peft

    return peft


TARGETS = Option("qkv", "comma-separated Linear layers to adapt (timm ViT: qkv, proj, fc1, fc2)")
ALPHA = Option(None, "scaling numerator alpha (scale alpha/rank); default: = rank, i.e. scale 1")


def _lora_options(rank: int = 8, dropout: float = 0.1) -> dict[str, Option]:
    return {
        "rank": Option(rank, "rank r of B·A", min=1),
        "alpha": ALPHA,
        "dropout": Option(dropout, "dropout on the LoRA input (NOAH: 0.1)", min=0.0, max=1.0),
        "targets": TARGETS,
    }


def _lycoris_options() -> dict[str, Option]:
    return {
        "rank": Option(8, "rank r of each factor", min=1),
        "alpha": ALPHA,
        "dropout": Option(0.0, "rank dropout (train mode only)", min=0.0, max=1.0),
        "targets": TARGETS,
    }


TUNERS: dict[str, Tuner] = {
    "lora": Tuner(
        lambda o: _peft().LoraConfig(r=int(o["rank"]), lora_alpha=_alpha(o), lora_dropout=float(o["dropout"]),
                                     target_modules=_targets(o)),
        "LoRA via peft: rank 8 on the fused qkv of every block, alpha = rank, dropout 0.1 (NOAH, docs/methods/peft_tuners.md)",
        {**_lora_options(), "init": Option("kaiming-zeros", "kaiming-zeros: peft's (A kaiming-uniform, B zeros: BA "
                                           "starts at 0); trunc-normal: what NOAH's ViT.init_weights redraws A and B "
                                           "to (std 0.02: BA starts non-zero)", choices=("kaiming-zeros", "trunc-normal"))},
        aliases=("lora-qkv",)),
    "dora": Tuner(
        lambda o: _peft().LoraConfig(r=int(o["rank"]), lora_alpha=_alpha(o), lora_dropout=float(o["dropout"]),
                                     target_modules=_targets(o), use_dora=True),
        "DoRA via peft: LoRA with a learned per-output magnitude (same qkv / rank 8 setting as lora)",
        _lora_options()),
    "loha": Tuner(
        lambda o: _peft().LoHaConfig(r=int(o["rank"]), alpha=_alpha(o), rank_dropout=float(o["dropout"]),
                                     target_modules=_targets(o)),
        "LoHa via peft: Hadamard product of two rank-r products on qkv",
        _lycoris_options(), fusable=False),  # an autograd.Function without vmap support
    "lokr": Tuner(
        lambda o: _peft().LoKrConfig(r=int(o["rank"]), alpha=_alpha(o), rank_dropout=float(o["dropout"]),
                                     target_modules=_targets(o)),
        "LoKr via peft: Kronecker product update (rank-r factor) on qkv",
        _lycoris_options()),
    "vera": Tuner(
        lambda o: _peft().VeraConfig(r=int(o["rank"]), vera_dropout=float(o["dropout"]),
                                     d_initial=float(o["d_initial"]), projection_prng_key=int(o["prng_key"]),
                                     target_modules=_targets(o)),
        "VeRA via peft: frozen shared random projections, trained scaling vectors, on qkv",
        {"rank": Option(256, "rank of the shared random projections", min=1),
         "dropout": Option(0.0, "dropout on the VeRA input", min=0.0, max=1.0),
         "d_initial": Option(0.1, "initial value of the d scaling vector"),
         "prng_key": Option(0, "seed of the shared random projections"),
         "targets": TARGETS}),
    "ia3": Tuner(
        lambda o: _peft().IA3Config(target_modules=_targets(o), feedforward_modules=_targets(o, "feedforward")),
        "IA3 via peft: learned rescaling of the qkv outputs and of the MLP hidden units (fc2 input)",
        {"targets": Option("qkv,fc2", "comma-separated Linear layers to rescale"),
         "feedforward": Option("fc2", "targets whose input (not output) is rescaled")}),
    "fourierft": Tuner(
        lambda o: _peft().FourierFTConfig(n_frequency=int(o["n_frequency"]), scaling=float(o["scaling"]),
                                          random_loc_seed=int(o["seed"]), target_modules=_targets(o)),
        "FourierFT via peft: n learned spectral coefficients per layer, on qkv",
        {"n_frequency": Option(1000, "learned Fourier coefficients per layer", min=1),
         "scaling": Option(150.0, "scale of the inverse-DFT update"),
         "seed": Option(777, "seed of the random frequency locations"),
         "targets": TARGETS}, fusable=False),  # index_put_ of the trained spectrum into a fresh tensor
    "boft": Tuner(
        lambda o: _peft().BOFTConfig(boft_block_size=int(o["block_size"]),
                                     boft_n_butterfly_factor=int(o["butterfly_factor"]),
                                     boft_dropout=float(o["dropout"]), target_modules=_targets(o)),
        "BOFT via peft: butterfly orthogonal fine-tuning (block size 4) on qkv",
        {"block_size": Option(4, "size of the orthogonal blocks (must divide the input width)", min=1),
         "butterfly_factor": Option(1, "number of butterfly factors", min=1),
         "dropout": Option(0.0, "multiplicative block dropout (train mode only)", min=0.0, max=1.0),
         "targets": TARGETS}),
    "oft": Tuner(
        lambda o: _peft().OFTConfig(r=int(o["blocks"]), oft_block_size=0, module_dropout=float(o["dropout"]),
                                    target_modules=_targets(o)),
        "OFT via peft: block-diagonal orthogonal rotation of the input (8 blocks) on qkv",
        {"blocks": Option(8, "number of orthogonal blocks (must divide the input width)", min=1),
         "dropout": Option(0.0, "multiplicative block dropout (train mode only)", min=0.0, max=1.0),
         "targets": TARGETS}, fusable=False),  # index_put_ of the trained blocks into a fresh tensor
    "hra": Tuner(
        lambda o: _peft().HRAConfig(r=int(o["rank"]), target_modules=_targets(o)),
        "HRA via peft: r Householder reflections of the weight, on qkv",
        {"rank": Option(8, "number of Householder reflections", min=1), "targets": TARGETS}),
    "randlora": Tuner(
        lambda o: _peft().RandLoraConfig(r=int(o["rank"]), randlora_alpha=float(o["alpha"]),
                                         randlora_dropout=float(o["dropout"]),
                                         projection_prng_key=int(o["prng_key"]), target_modules=_targets(o)),
        "RandLoRA via peft: full-rank update from shared random bases and learned scalings, on qkv",
        {"rank": Option(32, "rank of each random basis", min=1),
         "alpha": Option(640.0, "scaling (peft default 640 = 20·rank)"),
         "dropout": Option(0.0, "dropout on the RandLoRA input", min=0.0, max=1.0),
         "prng_key": Option(0, "seed of the shared random bases"),
         "targets": TARGETS},
        # demo_lr: LoRA's 0.04 does not learn (alpha/r = 20): demo-hparam-search.csv; not fusable: an
        # autograd.Function without vmap support
        min_peft="0.16", demo_lr=0.013, fusable=False),
    "shira": Tuner(
        lambda o: _peft().ShiraConfig(r=int(o["rank"]), random_seed=int(o["seed"]), target_modules=_targets(o)),
        "SHiRA via peft: sparse high-rank update, r·(in+out) trained weights per layer (LoRA-r budget), on qkv",
        {"rank": Option(8, "budget: r·(in + out) trained entries per layer, as LoRA rank r", min=1),
         "seed": Option(0, "seed of the random sparse mask"),
         "targets": TARGETS},
        min_peft="0.17", fusable=False),  # sparse tensors (no vmap)
    # the tuners peft added since (docs/methods/peft_tuners.md §5): LoRA-like budgets on qkv unless their maths
    # fixes the count otherwise
    "vblora": Tuner(
        lambda o: _peft().VBLoRAConfig(r=int(o["rank"]), num_vectors=int(o["num_vectors"]),
                                       vector_length=int(o["vector_length"]), topk=int(o["topk"]),
                                       vblora_dropout=float(o["dropout"]), target_modules=_targets(o)),
        "VB-LoRA via peft: LoRA factors composed from a shared bank of vectors (top-k mixture logits per sub-vector), "
        "on qkv",
        {"rank": Option(4, "rank r of the composed B·A", min=1),
         "num_vectors": Option(256, "vectors in the shared bank", min=1),
         "vector_length": Option(256, "length of a bank vector (must divide the layers' in and out widths)", min=1),
         "topk": Option(2, "bank vectors mixed per sub-vector", min=1),
         "dropout": Option(0.0, "dropout on the VB-LoRA input", min=0.0, max=1.0),
         "targets": TARGETS},
        # not fusable: data-dependent control flow in its top-k (no vmap); ViT only: vector_length 256 does not divide
        # the 128-wide first stage of Swin-B
        min_peft="0.15", fusable=False, families=("vit",)),
    "gralora": Tuner(
        lambda o: _peft().GraloraConfig(r=int(o["rank"]), alpha=_alpha(o), gralora_k=int(o["k"]),
                                        gralora_dropout=float(o["dropout"]), target_modules=_targets(o)),
        "GraLoRA via peft: the weight split into k x k blocks, each with its own rank-r/k LoRA (LoRA-r budget), on qkv",
        {"rank": Option(8, "total rank r (k must divide it)", min=1),
         "alpha": ALPHA,
         "k": Option(2, "blocks per side (must divide the in and out widths and r)", min=1),
         "dropout": Option(0.0, "dropout on the GraLoRA input", min=0.0, max=1.0),
         "targets": TARGETS},
        min_peft="0.19", fusable=False),  # in-place accumulation into the output (no vmap)
    "hira": Tuner(
        lambda o: _peft().HiraConfig(r=int(o["rank"]), hira_dropout=float(o["dropout"]), target_modules=_targets(o)),
        "HiRA via peft: Hadamard high-rank update W0 ⊙ (B·A) (LoRA-r budget), on qkv",
        {"rank": Option(8, "rank r of B·A", min=1),
         "dropout": Option(0.0, "dropout on the HiRA input", min=0.0, max=1.0),
         "targets": TARGETS},
        min_peft="0.20"),
    "delora": Tuner(
        lambda o: _peft().DeloraConfig(r=int(o["rank"]), delora_lambda=float(o["lambda"]),
                                       module_dropout=float(o["dropout"]), target_modules=_targets(o)),
        "DeLoRA via peft: LoRA with normalised rank-one terms and a learned bound lambda per layer, on qkv",
        {"rank": Option(8, "rank r of B·A", min=1),
         "lambda": Option(15.0, "initial bound lambda of the update's norm"),
         "dropout": Option(0.0, "dropout of whole rank-one terms (train mode only)", min=0.0, max=1.0),
         "targets": TARGETS},
        min_peft="0.18", fusable=False),  # in-place accumulation into the output (no vmap)
    "road": Tuner(
        lambda o: _peft().RoadConfig(variant=str(o["variant"]), group_size=int(o["group_size"]),
                                     target_modules=_targets(o)),
        "RoAd via peft: learned 2-D rotations (and scales) of pairs of output features, on qkv",
        {"variant": Option("road_1", "road_1: one angle and scale per pair; road_2 / road_4: two / four per pair",
                           choices=("road_1", "road_2", "road_4")),
         "group_size": Option(64, "features per rotation group (must divide the out width; even)", min=2),
         "targets": TARGETS},
        min_peft="0.18"),
    "miss": Tuner(
        lambda o: _peft().MissConfig(r=int(o["rank"]), mini_r=int(o["mini_r"]), miss_dropout=float(o["dropout"]),
                                     target_modules=_targets(o)),
        "MiSS via peft: one shared trained shard (r x out) expanded over the input width, on qkv",
        {"rank": Option(64, "shard rows r (must divide the in width)", min=1),
         "mini_r": Option(1, "mini rank of the shard (the miss-mini variant)", min=1),
         "dropout": Option(0.0, "dropout on the MiSS input", min=0.0, max=1.0),
         "targets": TARGETS},
        min_peft="0.17"),
    "c3a": Tuner(
        lambda o: _peft().C3AConfig(block_size=int(o["block_size"]), target_modules=_targets(o)),
        "C3A via peft: block-circulant update by circular convolution, one kernel per block, on qkv",
        {"block_size": Option(256, "circulant block size (must divide the in and out widths)", min=1),
         "targets": TARGETS},
        # not fusable: FFT-based circulant products (complex intermediates; no vmap); ViT only: block_size 256 does not
        # divide the 128-wide first stage of Swin-B
        min_peft="0.16", fusable=False, families=("vit",)),
    # GLoRA (Chavan et al., 2023, "One-for-All: Generalized LoRA"; Arnav0400/ViT-Slim GLoRA/): peft's GLoRA is one
    # configuration for every layer (no supernet, no evolutionary search): the official search space's paths, fixed
    "glora": Tuner(
        lambda o: _peft().GloraConfig(r=int(o["rank"]), config_A_B=str(o["config_a_b"]), config_C=str(o["config_c"]),
                                      config_D_E=str(o["config_d_e"]), target_modules=_targets(o)),
        "GLoRA via peft: W' = W0 + W0*A + B, b' = b0 + b0*D + E + W0*C with one fixed configuration of the paths (A, B, C "
        "rank-r, D, E scalars) on qkv; the official per-layer search is not peft's",
        {"rank": Option(8, "rank r of the low-rank paths", min=1),
         "config_a_b": Option("lora", "path of A and B", choices=("lora", "vector", "constant", "none")),
         "config_c": Option("lora", "path of C (the weight-to-bias prompt)", choices=("lora", "vector", "none")),
         "config_d_e": Option("constant", "path of D and E (the bias scale and shift)",
                              choices=("vector", "constant", "none")),
         "targets": TARGETS},
        min_peft="0.20"),
    "waveft": Tuner(
        lambda o: _peft().WaveFTConfig(n_frequency=int(o["n_frequency"]), scaling=float(o["scaling"]),
                                       wavelet_family=str(o["wavelet"]), random_loc_seed=int(o["seed"]),
                                       target_modules=_targets(o)),
        "WaveFT via peft: n learned wavelet coefficients per layer, the update their inverse DWT, on qkv",
        {"n_frequency": Option(2592, "learned wavelet coefficients per layer (peft's default)", min=1),
         "scaling": Option(25.0, "scale of the reconstructed update (peft's default)"),
         "wavelet": Option("db1", "wavelet family (peft's default: Haar, db1)"),
         "seed": Option(777, "seed of the random coefficient locations"),
         "targets": TARGETS},
        min_peft="0.18", demo_lr=0.004, fusable=False),  # demo_lr: LoRA's 0.04 does not learn (demo-hparam-search.csv);
    # not fusable: index_put_ of the coefficients into a fresh tensor (no vmap)
    "lily": Tuner(
        lambda o: _peft().LilyConfig(r=int(o["rank"]), stride_A=int(o["stride_a"]), num_B=int(o["num_b"]),
                                     scaling=float(o["scaling"]), target_modules=_targets(o)),
        "Lily via peft: low-rank A projectors shared by stride_a adjacent layers and num_b B experts shared by all, "
        "mixed per layer by a learned router, on qkv",
        {"rank": Option(32, "rank r of A and of the B experts (peft's default)", min=1),
         "stride_a": Option(1, "adjacent layers sharing one A (peft's default)", min=1),
         "num_b": Option(2, "B experts shared by all layers (peft's default)", min=1),
         "scaling": Option(1.0, "scale of the update (peft's default)"),
         "targets": TARGETS},
        min_peft="0.19", fusable=False),  # under torch.func its shared B experts get no gradient
    "psoft": Tuner(
        lambda o: _peft().PsoftConfig(r=int(o["rank"]), psoft_alpha=float(o["alpha"]),
                                      psoft_dropout=float(o["dropout"]), target_modules=_targets(o)),
        "PSOFT via peft: an orthogonal r x r rotation (and magnitudes) in the principal subspace of each weight, on qkv",
        {"rank": Option(32, "rank r of the principal subspace (peft's default)", min=1),
         "alpha": Option(32.0, "scaling numerator (peft's default)"),
         "dropout": Option(0.0, "dropout on the PSOFT input", min=0.0, max=1.0),
         "targets": TARGETS},
        min_peft="0.19"),
    "pvera": Tuner(
        lambda o: _peft().PveraConfig(r=int(o["rank"]), pvera_dropout=float(o["dropout"]),
                                      d_initial=float(o["d_initial"]), projection_prng_key=int(o["prng_key"]),
                                      target_modules=_targets(o)),
        "PVeRA via peft: VeRA's trained scaling vectors on frozen shared random projections, with a probabilistic "
        "(sampled while training) low-rank code, on qkv",
        {"rank": Option(256, "rank of the shared random projections (peft's default)", min=1),
         "dropout": Option(0.0, "dropout on the PVeRA input", min=0.0, max=1.0),
         "d_initial": Option(0.1, "initial value of the d scaling vector (peft's default)"),
         "prng_key": Option(0, "seed of the shared random projections"),
         "targets": TARGETS},
        min_peft="0.19"),
    "tinylora": Tuner(
        lambda o: _peft().TinyLoraConfig(r=int(o["rank"]), u=int(o["u"]), projection_seed=int(o["seed"]),
                                         tinylora_dropout=float(o["dropout"]), target_modules=_targets(o)),
        "TinyLoRA via peft: a u-long trained vector per layer projected by fixed random tensors into the rank-r SVD "
        "space of the frozen weight, on qkv",
        {"rank": Option(2, "rank r of the frozen SVD (peft's default)", min=1),
         "u": Option(64, "trained vector length per layer (peft's default)", min=1),
         "seed": Option(42, "seed of the fixed random projections"),
         "dropout": Option(0.0, "dropout on the TinyLoRA input", min=0.0, max=1.0),
         "targets": TARGETS},
        min_peft="0.19", fusable=False),  # under torch.func its trained vectors get no gradient
    "unilora": Tuner(
        lambda o: _peft().UniLoraConfig(r=int(o["rank"]), theta_d_length=int(o["length"]), proj_seed=int(o["seed"]),
                                        unilora_dropout=float(o["dropout"]), target_modules=_targets(o)),
        "Uni-LoRA via peft: every layer's LoRA factors (rank r) read from one shared trained vector through a fixed "
        "random index map, on qkv",
        {"rank": Option(4, "rank r of the LoRA factors (peft's default)", min=1),
         "length": Option(256, "length of the one shared trained vector (peft's default)", min=1),
         "seed": Option(42, "seed of the fixed index map"),
         "dropout": Option(0.0, "dropout on the Uni-LoRA input", min=0.0, max=1.0),
         "targets": TARGETS},
        min_peft="0.20", fusable=False),  # under torch.func its shared vector gets no gradient
    "deft": Tuner(
        lambda o: _peft().DeftConfig(r=int(o["rank"]), decomposition_method=str(o["decomposition"]),
                                     deft_dropout=float(o["dropout"]), target_modules=_targets(o)),
        "DEFT via peft: W' = (I - P_proj) W + Q_P R, a learned rank-r projection P (out x r) and injection R (r x in), "
        "the identity at the start, on qkv",
        {"rank": Option(8, "rank r of P and R (peft's default)", min=1),
         "decomposition": Option("relu", "relu: P_proj = P relu(P)^T; qr: an orthogonal projector (peft's default relu)",
                                 choices=("relu", "qr")),
         "dropout": Option(0.0, "dropout on the DEFT input", min=0.0, max=1.0),
         "targets": TARGETS},
        min_peft="0.20"),
    "beft": Tuner(
        lambda o: _peft().BeftConfig(target_modules=_targets(o)),
        "BEFT via peft: a trained bias added to each adapted layer's output (out entries per layer), on qkv",
        {"targets": TARGETS},
        min_peft="0.20"),
    "frod": Tuner(
        lambda o: _peft().FrodConfig(sparse_rate=float(o["sparse_rate"]), projection_prng_key=int(o["prng_key"]),
                                     frod_dropout=float(o["dropout"]), progressbar=False, target_modules=_targets(o)),
        "FRoD via peft: a joint decomposition of the same-named layers of all blocks, with a trained scaling vector and "
        "a sparse trained matrix (sparse_rate of the entries) per layer, on qkv",
        {"sparse_rate": Option(0.01, "share of a d_in x d_in matrix trained sparsely (peft's default)", min=0.0,
                               max=1.0),
         "prng_key": Option(0, "seed of the sparse pattern"),
         "dropout": Option(0.0, "dropout on the FRoD input", min=0.0, max=1.0),
         "targets": TARGETS},
        # not fusable: sparse tensors (no vmap); ViT only: its joint decomposition stacks the same-named layers of
        # all blocks, which Swin's stages give different widths
        min_peft="0.20", fusable=False, families=("vit",)),
    "peanut": Tuner(
        lambda o: _peft().PeanutConfig(r=int(o["rank"]), depth=int(o["depth"]), scaling=float(o["scaling"]),
                                       target_modules=_targets(o)),
        "PEANuT via peft: a small non-linear network of the frozen weight (A: out -> r, hidden layers, B: r -> out) "
        "gives each layer's update, on qkv",
        {"rank": Option(32, "hidden width r (peft's default)", min=1),
         "depth": Option(0, "hidden layers between A and B (peft's default)", min=0),
         "scaling": Option(1.0, "scale of the update (peft's default)"),
         "targets": TARGETS},
        min_peft="0.19"),
    "supertuning": Tuner(
        lambda o: _peft().SupertuningConfig(sparsity=float(o["sparsity"]), target_modules=_targets(o)),
        "Super-Tuning via peft: the largest-magnitude (1 - sparsity) share of each weight's entries trained, on qkv",
        {"sparsity": Option(0.99, "share of each weight left frozen (peft's default)", min=0.0, max=0.999999),
         "targets": TARGETS},
        min_peft="0.21", fusable=False),
    # AdaLoRA (Zhang et al., ICLR 2023): an SVD-shaped update P·Λ·Q per layer whose ranks are reallocated during
    # training (peft's RankAllocator, after every optimiser step) plus an orthogonality penalty on P and Q
    # (docs/methods/peft_tuners.md §6). peft needs the run's total steps at config time; peftbench gives them when
    # training starts (AdaLoraTunedViT.start_training), so the config is made with a placeholder here.
    "adalora": Tuner(
        lambda o: _peft().AdaLoraConfig(init_r=int(o["init_r"]), target_r=int(o["target_r"]),
                                        lora_alpha=float(o["alpha"]),
                                        lora_dropout=float(o["dropout"]), deltaT=int(o["delta_t"]),
                                        beta1=float(o["beta1"]), beta2=float(o["beta2"]),
                                        orth_reg_weight=float(o["orth_reg_weight"]), total_step=PLACEHOLDER_STEPS,
                                        target_modules=_targets(o)),
        "AdaLoRA via peft: SVD-shaped updates on qkv whose ranks are reallocated by importance during training "
        "(12 -> 8 on average), with an orthogonality penalty",
        {"init_r": Option(12, "initial rank of every layer (peft's default)", min=1),
         "target_r": Option(8, "average rank at the end of the allocation (peft's default; LoRA-8's budget)", min=1),
         "alpha": Option(8.0, "scaling numerator alpha (scale alpha / init_r; peft's default 8)", min=0.0),
         "dropout": Option(0.0, "dropout on the AdaLoRA input (peft's default)", min=0.0, max=1.0),
         "tinit": Option(0.1, "share of the run's optimiser steps before the ranks start to shrink (peft's tinit, "
                         "in steps there; unpublished for ViTs: our choice)", min=0.0, max=1.0),
         "tfinal": Option(0.2, "share of the run's steps trained with the final ranks fixed (peft's tfinal; "
                          "unpublished for ViTs: our choice)", min=0.0, max=1.0),
         "delta_t": Option(1, "steps between two reallocations (peft's deltaT)", min=1),
         "beta1": Option(0.85, "EMA of the sensitivity (peft's default)", min=0.0, max=1.0),
         "beta2": Option(0.85, "EMA of the uncertainty (peft's default)", min=0.0, max=1.0),
         "orth_reg_weight": Option(0.5, "weight of the orthogonality penalty on P and Q (peft's default)", min=0.0),
         "targets": TARGETS},
        # not fusable: per-step hooks (the rank allocator's state is per model)
        min_peft="0.15", fusable=False, model="AdaLoraTunedViT"),
}
PLACEHOLDER_STEPS = 1_000_000  # AdaLoRA's total_step until the run's is known (start_training)


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------


def _version(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def installed_peft() -> str | None:
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return None


def _inject_here(config, backbone: nn.Module, keep: list | None = None) -> None:
    peft = _peft()
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
    if keep is not None:  # the tuner object stays with the model (AdaLoRA: its rank allocator)
        keep.append(tuner_cls(backbone, config, adapter_name=ADAPTER_NAME))
    elif getattr(tuner_cls, "uses_shared_state", False):
        # inject_adapter_in_model refuses tuners with state shared between layers; the layers keep
        # references to it (VeRA's projections), so the wrapper itself can be dropped
        peft.get_peft_model(backbone, config, adapter_name=ADAPTER_NAME)
    else:
        peft.inject_adapter_in_model(config, backbone, adapter_name=ADAPTER_NAME)


def inject(config, backbone: nn.Module, keep: list | None = None) -> nn.Module:
    """Inject the tuner of ``config`` into ``backbone``; returns the backbone to use (the same object,
    except during parameter counting on the meta device when the tuner cannot work there). ``keep``: a list that
    receives peft's tuner object."""
    if not any(p.is_meta for p in backbone.parameters()):
        _inject_here(config, backbone, keep)
        return backbone
    # Meta device (``peftbench params``): the helper tensors a tuner computes (permutations, masks)
    # are made on the CPU, peft then moves the adapter weights to the (meta) device of the base layer.
    probe = copy.deepcopy(backbone)
    try:
        with torch.device("cpu"):
            _inject_here(config, probe, keep)
        return probe
    except (NotImplementedError, RuntimeError):
        # the tuner needs real values: count on a CPU copy with uninitialised weights instead
        backbone = backbone.to_empty(device="cpu")
        with torch.device("cpu"):
            _inject_here(config, backbone, keep)
        return backbone


def _is_tuner_layer(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


class PeftTunedViT(TunedViT):
    """A timm ViT with peft layers injected + peftbench's head.

    ``train()`` keeps the backbone in eval mode; the injected layers' own flag (LoHa/LoKr rank and
    module dropout read it) and their dropout modules follow ``mode``; their frozen base layers stay
    in eval mode."""

    def __init__(self, backbone: nn.Module, num_classes: int, trainable: set[str]):
        super().__init__(backbone, num_classes)  # freezes every backbone parameter
        for n, p in backbone.named_parameters():
            if n in trainable:
                p.requires_grad = True
        self.tuner_layers: list[nn.Module] = [m for m in backbone.modules() if _is_tuner_layer(m)]
        for layer in self.tuner_layers:
            for name, sub in layer.named_modules():
                if name == "base_layer" or name.startswith("base_layer."):
                    continue
                if sub is not layer and "Dropout" in type(sub).__name__:
                    self.train_modules.append(sub)

    def train(self, mode: bool = True) -> "PeftTunedViT":
        super().train(mode)
        for layer in self.tuner_layers:
            layer.training = mode  # not recursive: the base layer stays in eval mode
        return self

    def peft_model(self) -> nn.Module | None:
        """The same model as peft builds it on a plain timm classifier: the tuner layers unwrapped to their base
        layers (no merge), the classifier created by timm (``reset_classifier``) holding this head and listed in
        ``modules_to_save``, then ``peft.get_peft_model`` with this model's config and every tensor of this
        backbone copied in by name (the injected layers are named alike, adapter ``default``)."""
        config = getattr(self, "peft_config", None)
        if config is None:
            return None
        peft = _peft()
        plain = copy.deepcopy(self.backbone)
        if "peft_config" in vars(plain):
            del plain.peft_config  # the injection's bookkeeping: peft would read it as a second adapter
        for name, module in list(plain.named_modules()):
            if _is_tuner_layer(module):
                wrap_module(plain, name, lambda m: m.get_base_layer())
        base = plain_vit(plain, self.head)
        classifier = next(n for n, m in base.named_modules() if m is base.get_classifier())
        config = copy.deepcopy(config)
        config.modules_to_save = [classifier]
        model = peft.get_peft_model(base, config, adapter_name=ADAPTER_NAME)
        inner = model.base_model.model
        target = dict(inner.named_parameters()) | dict(inner.named_buffers())
        source = dict(self.backbone.named_parameters()) | dict(self.backbone.named_buffers())
        with torch.no_grad():
            for key, value in source.items():
                if key in target:
                    target[key].copy_(value)
            saved = inner.get_submodule(classifier).modules_to_save[ADAPTER_NAME]
            saved.weight.copy_(self.head.weight)
            saved.bias.copy_(self.head.bias)
        return model.eval()

    def merged(self) -> nn.Module | None:
        """peft's own merge of every injected layer into its base layer (``BaseTunerLayer.merge``), the
        tuner layers then replaced by their base layers: a plain timm ViT. None when a tuner cannot merge."""
        backbone = copy.deepcopy(self.backbone)
        for name, module in list(backbone.named_modules()):
            if not _is_tuner_layer(module):
                continue
            try:
                with torch.no_grad():
                    module.merge(safe_merge=True)
            except (NotImplementedError, ValueError, AttributeError, TypeError):
                return None
            parent_name, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent_name) if parent_name else backbone, child, module.get_base_layer())
        if not is_plain_timm(backbone):
            return None
        return plain_vit(backbone, self.head)


class AdaLoraTunedViT(PeftTunedViT):
    """AdaLoRA through peft, trained as peft's documentation and ``AdaLoraModel.forward`` do it
    (docs/methods/peft_tuners.md §6): the loss is the cross entropy plus ``orth_reg_weight`` times the mean over P and
    Q matrices of ||P·Pᵀ − I||_F (:meth:`step_loss`, peft's formula), and after every optimiser step, its gradients
    still in place, ``AdaLoraModel.update_and_allocate(step)`` updates the importance scores and masks the least
    important singular values to the step's budget (:meth:`after_step`). The allocator's averages and the rank
    pattern are checkpointed (:meth:`step_state`), so a resumed run continues bit for bit."""

    def __init__(self, backbone: nn.Module, num_classes: int, trainable: set[str], tuner, opts: dict[str, Any]):
        super().__init__(backbone, num_classes, trainable)
        object.__setattr__(self, "_tuner", tuner)  # (not a submodule: it wraps this backbone)
        self.tinit_share, self.tfinal_share = float(opts["tinit"]), float(opts["tfinal"])
        self.init_r, self.target_r = int(opts["init_r"]), int(opts["target_r"])

    def _config(self):
        return self._tuner.peft_config[ADAPTER_NAME]

    def start_training(self, total_steps: int) -> None:
        config = self._config()
        config.total_step = int(total_steps)
        config.tinit = int(self.tinit_share * total_steps)
        config.tfinal = int(self.tfinal_share * total_steps)
        if config.tinit >= config.total_step - config.tfinal:
            raise SettingsError(f"adalora: tinit {self.tinit_share} and tfinal {self.tfinal_share} leave no step of "
                                f"rank allocation in a run of {total_steps} steps (make tinit + tfinal smaller)")

    def step_loss(self, y: torch.Tensor) -> torch.Tensor | None:
        weight = self._config().orth_reg_weight
        if weight == 0:
            return None
        total, count = 0, 0
        for n, p in self.backbone.named_parameters():
            if ("lora_A" in n or "lora_B" in n) and ADAPTER_NAME in n:
                cov = p @ p.T if "lora_A" in n else p.T @ p
                total = total + torch.norm(cov - torch.eye(*cov.size(), dtype=cov.dtype, device=cov.device), p="fro")
                count += 1
        return weight * total / count if count else None

    def after_step(self, step: int) -> None:
        self._tuner.update_and_allocate(step)

    def step_state(self) -> dict[str, torch.Tensor]:
        alloc = self._tuner.rankallocator
        out = {}
        for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            out.update({f"{kind}/{n}": t.detach().clone() for n, t in getattr(alloc, kind).items()})
        for n, keep in (self._config().rank_pattern or {}).items():
            out[f"rank_pattern/{n}"] = torch.tensor([bool(k) for k in keep], dtype=torch.uint8)
        return out

    def load_step_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        alloc = self._tuner.rankallocator
        if not any(k.startswith("exp_avg_ipt/") for k in state):
            raise StoreError(f"{where}: the checkpoint has no AdaLoRA allocator state (written by older peftbench?); "
                             "delete it to train the run from epoch 0")
        alloc.reset_ipt()
        pattern = {}
        for key, value in state.items():
            kind, _, name = key.partition("/")
            if kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                getattr(alloc, kind)[name] = value.clone()
            elif kind == "rank_pattern":
                pattern[name] = [bool(v) for v in value.tolist()]
        if pattern:
            self._config().rank_pattern = pattern

    def parameter_counts(self) -> dict[str, int]:
        """``tuned``: the final budget AdaLoRA trains to, target_r triplets (a column of P, a singular value, a row of
        Q) per adapted layer on average, plus the head; ``trainable`` holds all init_r triplets (the masked ones stay
        in the model as zeros)."""
        out = super().parameter_counts()
        budget = 0
        for layer in self.tuner_layers:
            base = layer.get_base_layer()
            budget += self.target_r * (base.in_features + base.out_features + 1)
        out["tuned"] = budget + out["head"]
        return out


class PeftTunerMethod(Method):
    """A method that injects one peft tuner (a row of :data:`TUNERS`)."""

    tuner: ClassVar[str] = ""
    recipe = NOAH_RECIPE

    def build(self, backbone, num_classes, opts):
        row = TUNERS[self.tuner]
        have = installed_peft()
        if have is None or _version(have) < _version(row.min_peft):
            raise RuntimeError(f"method {self.name!r} needs peft >= {row.min_peft} (installed: {have or 'none'})")
        config = row.config(opts)
        keep: list | None = [] if row.model is not None else None
        backbone = inject(config, backbone, keep)
        if opts.get("init") == "trunc-normal":  # NOAH's ViT.init_weights: every Linear, LoRA's A and B too
            with torch.no_grad():
                for name, module in backbone.named_modules():
                    if isinstance(module, nn.Linear) and (".lora_A." in f".{name}." or ".lora_B." in f".{name}."):
                        nn.init.trunc_normal_(module.weight, std=0.02)
        for module in backbone.modules():  # peft's bookkeeping parameters (AdaLoRA's ranknum) never train; on the meta
            if _is_tuner_layer(module):    # device peft's move to the base layer's device leaves them trainable
                for attr in (getattr(module, n, None) for n in getattr(module, "other_param_names", ())):
                    if isinstance(attr, nn.ParameterDict):
                        for p in attr.values():
                            p.requires_grad_(False)
        trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}  # what peft marked
        if not trainable:
            raise ValueError(f"method {self.name!r}: peft found no layer named {opts.get('targets')!r} to adapt")
        if row.model is None:
            model = PeftTunedViT(backbone, num_classes, trainable)
        else:
            model = globals()[row.model](backbone, num_classes, trainable, keep[0] if keep else None, opts)
        model.peft_config = config  # what peft_model() rebuilds the model from, as peft would
        return model


def _register_all() -> list[type[PeftTunerMethod]]:
    have = installed_peft()
    made = []
    for name, row in TUNERS.items():
        if have is not None and _version(have) < _version(row.min_peft):
            continue
        cls_name = "Peft" + "".join(part.capitalize() for part in name.replace("-", "_").split("_"))
        cls = type(cls_name, (PeftTunerMethod,), {
            "name": name, "tuner": name, "aliases": row.aliases, "description": row.description,
            "options": dict(row.options), "__module__": __name__, "__qualname__": cls_name,
            "recipe": NOAH_RECIPE if row.demo_lr is None else NOAH_RECIPE.for_protocol("demo", lr=row.demo_lr),
            "fusable": row.fusable, "families": row.families,
        })
        globals()[cls_name] = cls  # importable by name (pickling)
        register_method(cls)
        made.append(cls)
    return made


REGISTERED = _register_all()
