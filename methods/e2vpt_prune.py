"""E^2VPT with prompt pruning + rewinding (``e2vpt-prune``): spec §3.2, as the official code runs it
(``tune_vtab_PruningRewind_CVK.py`` / ``tune_fgvc_PruningRewind.py``).

Masks (spec §3.2): a token mask ρ ∈ R^P and a segment ("piece") mask ∈ R^{P×16}, both initialised to
1, shared by the visual prompts of all layers, applied after prompt dropout:
``prompt[k, d] · seg[k, s(d)] · tok[k]`` with s(d) = d mod 16 (``interleaved``, the code's
``repeat((1, D/16))`` layout, default) or s(d) = ⌊d / (D/16)⌋ (``contiguous``, the paper's "equal
segments"). Before pruning the masks are trainable (17·P extra parameters); after pruning the model
multiplies them by a fixed 0/1 pattern and they are frozen.

The pipeline (:meth:`E2vptPrune.pipeline`), every run an ordinary run of the store:

A. ``search``         lr × wd grid, train800 → val200, masks present and trainable; best last-epoch
                      val top-1 (tie → smaller lr).
B. ``before_pruning`` the chosen (lr, wd) once more on the search splits; saves the initial and final
                      trainable tensors (``<key>.init.safetensors``, ``<key>.final.safetensors``).
C. ``importance``     (job, no training) stage-B weights, model in eval mode, one pass over the
                      training split: per batch b the mean cross-entropy L_b, backward, the gradients
                      of the masks. Scores, both written (``<key>.scores.json``):
                      ``abs`` (paper, default)  S_k = (1/|batches|) Σ_b |∂L_b/∂ρ_k|
                      ``signed`` (official code) S_k = (1/|batches|) Σ_b ∂L_b/∂ρ_k
                      (same for every (token, segment) entry of the segment mask).
D. candidates         n_tok(q) = ⌊P·q/100⌋, q = 10..90, capped at P−1 (the loop stops at the cap);
                      n_seg from {1,3,4,6,8,9,11,12}; the n_tok lowest-score tokens are pruned (nested
                      sets), and for every token independently its n_seg lowest-score segments.
                      All candidates of both score modes: ``<key>.masks.json`` of the stage-C run.
E. ``rewind``         every (n_tok, n_seg): fixed 0/1 masks (frozen), fresh random init (code default;
                      seed = first seed + 1, so it is not the stage-A/B init) or the stage-B initial
                      weights (``rewind_init=saved``), trained with the stage-A (lr, wd) on
                      train800 → val200; best last-epoch val top-1, tie → larger n_tok (then larger
                      n_seg).
F. ``final``          the chosen masks, every seed, train800val200 → test.

The mask of a rewind/final run is part of its options (``options["mask"]``: pruned tokens, pruned
segments per token, counts, score mode, and the stage-C record it came from), hence of its key and
of its readable JSON record. Stages A–C carry only the options that change them, so changing
``score`` or ``rewind_init`` reruns only stages E–F.

Under the ``demo`` protocol the grids are smaller (2-point lr search, 2 token counts × 2 segment
counts); the run records say so in ``option_sources``.

Parameter counts (spec §3.3): ``tuned`` = trainable − (layers) × (zero entries of the P×D mask); the
extra keys ``pruned_prompt_entries`` / ``kept_prompt_entries`` say how many prompt entries the masks
zero / keep (soft masking: nothing is physically removed), ``mask_values`` the 17·P mask entries.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.method import Option, OptionError, register_method
from peftbench.protocols import PipelineError, select_best, usable

from .e2vpt import (E2VPT_OPTIONS, FALLBACK_KV_TOKENS, FALLBACK_PROMPT_TOKENS, E2vpt, E2vptModel, _as_count,
                    _length, resolve_prompt_lengths, fgvc_context)

SEGMENTS = 16  # CLS_TOKEN_P_PIECES_NUM
MIN_KEEP_TOKENS = 1  # MIN_NUMBER_CLS_TOKEN
MIN_KEEP_SEGMENTS = 4  # MIN_NUMBER_CLS_TOKEN_PIECE
LEVELS = tuple(range(10, 100, 10))  # q = 10, 20, ..., 90 (%)
DEMO_TOKEN_LEVELS = (30, 60)  # demo protocol: 2 token counts (3 and 6 of P = 10)
DEMO_SEGMENT_LEVELS = (25, 50)  # demo protocol: 2 segment counts (4 and 8 of 16)
DEMO_LR_FACTORS = (1.0, 0.5)  # demo protocol: 2-point search around the recipe's demo lr
LAYOUTS = ("interleaved", "contiguous")
SCORE_MODES = ("abs", "signed")
REWIND_INITS = ("fresh", "saved")
FRESH_SEED_OFFSET = 1
# the options that change stages A-C (the rest only matter from stage E on)
MODEL_OPTIONS = ("prompt_tokens", "kv_tokens", "share_kv", "dropout", "kv_init", "segment_layout", "train_masks")


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------


def segment_index(dim: int, segments: int = SEGMENTS, layout: str = "interleaved") -> torch.Tensor:
    """(dim,) segment of every channel: ``interleaved`` d mod R (code), ``contiguous`` ⌊d / (dim/R)⌋."""
    if dim % segments:
        raise ValueError(f"prompt width {dim} is not divisible into {segments} segments")
    d = torch.arange(dim)
    if layout == "interleaved":
        return d % segments
    if layout == "contiguous":
        return d // (dim // segments)
    raise ValueError(f"unknown segment layout {layout!r} (known: {', '.join(LAYOUTS)})")


def dense_mask(token_mask: torch.Tensor, segment_mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(P, D) mask: entry [k, d] = token_mask[k] · segment_mask[k, index[d]]."""
    return token_mask[:, None] * segment_mask[:, index]


def pattern_tensors(pattern: dict, tokens: int, segments: int = SEGMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """The 0/1 keep tensors (P,), (P, R) of a pruning pattern."""
    keep_tok = torch.ones(tokens)
    keep_seg = torch.ones(tokens, segments)
    for k in pattern["pruned_tokens"]:
        keep_tok[k] = 0.0
    for k, segs in enumerate(pattern["pruned_segments"]):
        for j in segs:
            keep_seg[k, j] = 0.0
    return keep_tok, keep_seg


def zero_entries_per_layer(pattern: dict | None, tokens: int, dim: int, segments: int = SEGMENTS) -> int:
    """Zero entries of the (P, D) mask (spec §3.3: D·n_tok + (P − n_tok)·n_seg·D/R for a uniform n_seg)."""
    if pattern is None:
        return 0
    pruned = set(pattern["pruned_tokens"])
    per_seg = dim // segments
    zeros = dim * len(pruned)
    for k, segs in enumerate(pattern["pruned_segments"]):
        if k not in pruned:
            zeros += len(set(segs)) * per_seg
    return zeros


def check_pattern(pattern: dict, tokens: int, segments: int = SEGMENTS) -> None:
    toks = pattern.get("pruned_tokens")
    segs = pattern.get("pruned_segments")
    if not isinstance(toks, list) or not isinstance(segs, list) or len(segs) != tokens:
        raise ValueError(f"a pruning mask needs pruned_tokens and {tokens} pruned_segments lists")
    if any(not 0 <= int(k) < tokens for k in toks):
        raise ValueError(f"pruned token index out of range 0..{tokens - 1}: {toks}")
    if any(not 0 <= int(j) < segments for s in segs for j in s):
        raise ValueError(f"pruned segment index out of range 0..{segments - 1}")


def first_pattern(tokens: int, n_tok: int, n_seg: int) -> dict:
    """A pattern with given counts: tokens 0..n_tok−1 and segments 0..n_seg−1 of every token (for
    parameter counts and experiments with fixed counts; the pipeline chooses by importance)."""
    return {"n_tok": n_tok, "n_seg": n_seg, "pruned_tokens": list(range(n_tok)),
            "pruned_segments": [list(range(n_seg)) for _ in range(tokens)], "from": "fixed counts (first indices)"}


class E2vptPruneModel(E2vptModel):
    """:class:`E2vptModel` with the token and segment masks of the pruning pipeline.

    * ``pattern=None``: soft masks, trainable iff ``train_masks`` (stages A, B, C).
    * ``pattern`` given: masks frozen (they stay at 1.0) and multiplied by the fixed 0/1 keep pattern
      (stages E, F): the kept entries are exactly 1.0.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, prompt_tokens: int, kv_tokens: int,
                 share_kv: bool = True, dropout: float = 0.1, kv_init: str = "kaiming",
                 segment_layout: str = "interleaved", train_masks: bool = True, pattern: dict | None = None):
        super().__init__(backbone, num_classes, prompt_tokens, kv_tokens, share_kv, dropout, kv_init)
        P, D = self.num_prompts, backbone.embed_dim
        self.segments = SEGMENTS
        self.segment_layout = segment_layout
        self.register_buffer("segment_index", segment_index(D, SEGMENTS, segment_layout), persistent=False)
        self.prompt_token_mask = nn.Parameter(torch.ones(P))
        self.prompt_segment_mask = nn.Parameter(torch.ones(P, SEGMENTS))
        self.pattern = pattern
        if pattern is not None:
            check_pattern(pattern, P)
            keep_tok, keep_seg = pattern_tensors(pattern, P)
            self.register_buffer("keep_tokens", keep_tok, persistent=False)
            self.register_buffer("keep_segments", keep_seg, persistent=False)
            train_masks = False
        else:
            self.keep_tokens = self.keep_segments = None
        self.prompt_token_mask.requires_grad = bool(train_masks)
        self.prompt_segment_mask.requires_grad = bool(train_masks)

    def prompt_mask(self) -> torch.Tensor:
        """(P, D) multiplier of the visual prompts (every layer)."""
        tok, seg = self.prompt_token_mask, self.prompt_segment_mask
        if self.keep_tokens is not None:
            tok, seg = tok * self.keep_tokens, seg * self.keep_segments
        return dense_mask(tok, seg, self.segment_index)

    def transform_prompts(self, prompts: torch.Tensor) -> torch.Tensor:
        return prompts * self.prompt_mask().to(prompts.dtype)

    def prompt_layers(self) -> int:
        if self.num_prompts == 0:
            return 0
        return len(self.backbone.blocks) if self.deep_prompt_embeddings is not None else 1

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        P, D = self.num_prompts, self.backbone.embed_dim
        zeros = self.prompt_layers() * zero_entries_per_layer(self.pattern, P, D, self.segments)
        counts["tuned"] = counts["trainable"] - zeros  # spec §3.3 (soft masking)
        counts["pruned_prompt_entries"] = zeros
        counts["kept_prompt_entries"] = self.prompt_layers() * P * D - zeros
        counts["mask_values"] = P * (1 + self.segments)
        return counts


# ---------------------------------------------------------------------------------------------
# importance scores and candidate masks
# ---------------------------------------------------------------------------------------------


def mask_importance(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Importance of the token / segment mask entries from their loss gradients (spec §3.1, §3.2).

    ``model`` has ``prompt_token_mask`` (P,) and ``prompt_segment_mask`` (P, R) and maps images to
    logits. For every batch b: L_b = mean cross-entropy, g_b = ∂L_b/∂mask. Returns per mask
    ``abs`` = mean_b |g_b| (paper: S_k = E |∂L/∂ρ_k|, estimated per batch) and ``signed`` = mean_b g_b
    (official code), plus the number of batches. The caller sets the mode (eval for stage C).
    """
    tok, seg = model.prompt_token_mask, model.prompt_segment_mask
    flags = (tok.requires_grad, seg.requires_grad)
    tok.requires_grad_(True)
    seg.requires_grad_(True)
    acc = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in
           (("token_abs", tok), ("token_signed", tok), ("segment_abs", seg), ("segment_signed", seg))}
    n = 0
    try:
        for x, y in batches:
            logits = model(x)
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            loss = F.cross_entropy(logits, y)
            g_tok, g_seg = torch.autograd.grad(loss, [tok, seg])
            g_tok, g_seg = g_tok.detach().double().cpu(), g_seg.detach().double().cpu()
            acc["token_abs"] += g_tok.abs()
            acc["token_signed"] += g_tok
            acc["segment_abs"] += g_seg.abs()
            acc["segment_signed"] += g_seg
            n += 1
    finally:
        tok.requires_grad_(flags[0])
        seg.requires_grad_(flags[1])
    if n == 0:
        raise ValueError("no batches to compute importance scores from")
    return {
        "token": {"abs": (acc["token_abs"] / n).tolist(), "signed": (acc["token_signed"] / n).tolist()},
        "segment": {"abs": (acc["segment_abs"] / n).tolist(), "signed": (acc["segment_signed"] / n).tolist()},
        "num_batches": n,
    }


def prune_counts(total: int, levels: Iterable[int], min_keep: int) -> list[int]:
    """⌊total·q/100⌋ for the levels q, capped at total − min_keep; the loop stops at the cap; unique."""
    cap = total - min_keep
    out: list[int] = []
    if cap < 0:
        return out
    for q in levels:
        n = total * q // 100
        if n >= cap:
            if cap not in out:
                out.append(cap)
            break
        if n not in out:
            out.append(n)
    return out


def token_counts(prompt_tokens: int, demo: bool = False) -> list[int]:
    return prune_counts(prompt_tokens, DEMO_TOKEN_LEVELS if demo else LEVELS, MIN_KEEP_TOKENS)


def segment_counts(demo: bool = False) -> list[int]:
    return prune_counts(SEGMENTS, DEMO_SEGMENT_LEVELS if demo else LEVELS, MIN_KEEP_SEGMENTS)


def pruning_order(scores: list[float]) -> list[int]:
    """Indices by ascending score (lowest first; ties → lower index first)."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))


def make_pattern(token_scores: list[float], segment_scores: list[list[float]], n_tok: int, n_seg: int) -> dict:
    """Prune the n_tok lowest-score tokens, and for every token its n_seg lowest-score segments."""
    return {
        "n_tok": int(n_tok), "n_seg": int(n_seg),
        "pruned_tokens": sorted(pruning_order(token_scores)[:n_tok]),
        "pruned_segments": [sorted(pruning_order(s)[:n_seg]) for s in segment_scores],
    }


def pattern_id(pattern: dict) -> str:
    blob = json.dumps({"t": pattern["pruned_tokens"], "s": pattern["pruned_segments"]}, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def candidate_patterns(scores: dict, mode: str, pairs: list[tuple[int, int]]) -> list[dict]:
    out = []
    for n_tok, n_seg in pairs:
        p = make_pattern(scores["token"][mode], scores["segment"][mode], n_tok, n_seg)
        p["score"] = mode
        p["id"] = pattern_id(p)
        out.append(p)
    return out


def zero_scores(tokens: int) -> dict:
    z = [0.0] * tokens
    return {"token": {"abs": z, "signed": z}, "segment": {"abs": [[0.0] * SEGMENTS] * tokens,
                                                         "signed": [[0.0] * SEGMENTS] * tokens}}


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------


PRUNE_OPTIONS = {
    **E2VPT_OPTIONS,
    "score": Option("abs", "importance score: abs (paper, mean over batches of |dL/d mask|) or signed (official "
                           "code, mean gradient)", choices=SCORE_MODES),
    "segment_layout": Option("interleaved", "segment j = channels {j, j+16, ...} (interleaved, code) or 16 "
                                            "contiguous chunks (contiguous, paper)", choices=LAYOUTS),
    "rewind_init": Option("fresh", "rewind/final runs start from a fresh random init (fresh, code) or from the "
                                   "stage-B initial weights (saved)", choices=REWIND_INITS),
    "train_masks": Option(True, "masks trainable before pruning (stages A-B; official code: true)"),
    "prune_tokens": Option(None, "fixed number of pruned tokens: restricts the candidate grid to it (and, for "
                                 "`peftbench params`, prunes tokens 0..n-1)"),
    "prune_segments": Option(None, "fixed number of pruned segments per token (of 16): restricts the candidate "
                                   "grid to it (and, for `peftbench params`, prunes segments 0..n-1)"),
}


def _optional_count(opts: dict, key: str):
    value = opts.get(key)
    return None if value in (None, "", "none", "None") else _as_count(key, value)


@register_method
class E2vptPrune(E2vpt):
    name = "e2vpt-prune"
    aliases = ("e2vpt_prune", "e2vpt-pruning")
    description = ("E^2VPT with token/segment prompt pruning + rewinding: search, retrain, importance, "
                   "rewind every candidate, final seeds (spec §3.2)")
    options = dict(PRUNE_OPTIONS)

    def resolve_options(self, opts, task):
        opts, sources = resolve_prompt_lengths(opts, task)
        P = opts["prompt_tokens"]
        for key, limit in (("prune_tokens", P), ("prune_segments", SEGMENTS)):
            n = _optional_count(opts, key)
            if n is not None and n > limit:
                raise OptionError(f"option {key!r}: {n} is more than {limit}")
            opts[key] = n
        return opts, sources

    def build(self, backbone, num_classes, opts):
        P = _length(opts, "prompt_tokens", FALLBACK_PROMPT_TOKENS)
        pattern = opts.get("mask")
        n_tok, n_seg = _optional_count(opts, "prune_tokens"), _optional_count(opts, "prune_segments")
        if pattern is None and (n_tok is not None or n_seg is not None):
            pattern = first_pattern(P, n_tok or 0, n_seg or 0)
        return E2vptPruneModel(
            backbone, num_classes, prompt_tokens=P,
            kv_tokens=_length(opts, "kv_tokens", FALLBACK_KV_TOKENS),
            share_kv=bool(opts.get("share_kv", True)), dropout=float(opts.get("dropout", 0.1)),
            kv_init=str(opts.get("kv_init", "kaiming")), segment_layout=str(opts.get("segment_layout", "interleaved")),
            train_masks=bool(opts.get("train_masks", True)), pattern=pattern)

    # -- the pipeline -----------------------------------------------------------------------
    def candidate_pairs(self, opts: dict, demo: bool) -> list[tuple[int, int]]:
        P = opts["prompt_tokens"]
        toks = [opts["prune_tokens"]] if opts.get("prune_tokens") is not None else token_counts(P, demo)
        segs = [opts["prune_segments"]] if opts.get("prune_segments") is not None else segment_counts(demo)
        return [(t, s) for t in toks for s in segs]

    def pipeline(self, ctx, protocol):
        ctx = fgvc_context(ctx)
        opts = dict(ctx.options)
        P = int(opts["prompt_tokens"])
        if P < 1:
            raise PipelineError("e2vpt-prune prunes visual prompts: it needs prompt_tokens >= 1")
        demo = protocol.name == "demo"
        model_opts = {k: opts[k] for k in MODEL_OPTIONS}
        sources = dict(ctx.option_sources)
        search_ctx = ctx
        if demo and not ctx.overrides.get("lr_grid"):
            lrs = tuple(self.recipe.demo_lr * f for f in DEMO_LR_FACTORS)
            search_ctx = dataclasses.replace(ctx, overrides={**ctx.overrides, "lr_grid": lrs})
            sources["search_grid"] = f"demo protocol: reduced search, lr {list(lrs)} (full: the recipe's lr x wd grid)"
        pairs = self.candidate_pairs(opts, demo)
        if demo and opts.get("prune_tokens") is None and opts.get("prune_segments") is None:
            sources["candidate_grid"] = (f"demo protocol: reduced grid, token levels {list(DEMO_TOKEN_LEVELS)} % x "
                                         f"segment levels {list(DEMO_SEGMENT_LEVELS)} % -> {len(pairs)} candidates "
                                         f"(full: q = 10..90 % for both)")
        if not pairs:
            raise PipelineError(f"no pruning candidates for prompt_tokens={P}")

        def spec(stage, role, hp, seed, **kw):
            s = ctx.spec(stage, role, hp, seed, **kw)
            return dataclasses.replace(s, option_sources=dict(sources))

        seed0 = ctx.seeds[0]
        # A. lr x wd search, masks present and trainable
        points = protocol.search_points(search_ctx)
        if len(points) > 1:
            base = protocol.base_hparams(ctx, "search")
            records = yield [spec("search", "search", {**base, **p}, seed0, options=model_opts) for p in points]
            best = select_best(records)
            chosen = {k: best["spec"]["hparams"][k] for k in ("lr", "wd")}
        else:
            chosen = dict(points[0])
        hp = {**protocol.base_hparams(ctx, "final"), **chosen}

        # B. retrain once with the chosen hyper-parameters, keep the initial and final weights
        before = spec("before_pruning", "search", hp, seed0, options=model_opts,
                      extras={"save_init": True, "save_final": True})
        (rec_b,) = yield [before]
        if not usable(rec_b):
            raise PipelineError(f"stage before_pruning did not finish ({rec_b.get('status')}): {rec_b.get('error')}")

        # C. importance scores from the mask gradients (no training)
        importance = spec("importance", "search", {"batch_size": hp["batch_size"]}, seed0, job="importance",
                          options=model_opts, extras={"init_state": f"{before.key}.final.safetensors"})
        (rec_c,) = yield [importance]
        if rec_c.get("status") == "planned" or ctx.dry_run:
            scores = zero_scores(P)
        elif rec_c.get("status") != "ok" or not rec_c.get("scores"):
            raise PipelineError(f"stage importance did not finish ({rec_c.get('status')}): {rec_c.get('error')}")
        else:
            scores = rec_c["scores"]

        # D. candidate masks
        patterns = candidate_patterns(scores, opts["score"], pairs)
        for p in patterns:
            p["scores_from"] = f"{importance.key}.scores.json"
            p["layout"] = opts["segment_layout"]

        # E. rewind: retrain every candidate with fixed, frozen 0/1 masks
        if opts["rewind_init"] == "saved":
            rewind_seed, init_extras = seed0, {"init_state": f"{before.key}.init.safetensors"}
        else:
            rewind_seed, init_extras = seed0 + FRESH_SEED_OFFSET, {}
        rewinds = [spec("rewind", "search", hp, rewind_seed, options={**opts, "mask": p},
                        extras={"candidate": f"{p['n_tok']}x{p['n_seg']}", **init_extras}) for p in patterns]
        records = yield rewinds
        ok = [(r, p) for r, p in zip(records, patterns) if usable(r)]
        if not ok:
            raise PipelineError(f"no usable rewind run ({len(records)} runs: "
                                f"{', '.join(sorted({r.get('status', '?') for r in records}))})")
        _, mask = max(ok, key=lambda rp: (rp[0]["metrics"]["top1"], rp[1]["n_tok"], rp[1]["n_seg"]))

        # F. final seeds with the chosen masks
        final_seeds = ctx.seeds
        yield [spec("final", "final", hp, s, options={**opts, "mask": mask},
                    extras={"candidate": f"{mask['n_tok']}x{mask['n_seg']}", **init_extras}) for s in final_seeds]

    # -- stage C ------------------------------------------------------------------------------
    def run_job(self, job, spec, store, env):
        if job != "importance":
            return super().run_job(job, spec, store, env)
        from peftbench.backbone import image_size
        from peftbench.data import load_split
        from peftbench.engine import build_model, normalizer_for, parameter_summary
        from peftbench.store import atomic_write_text
        from peftbench.task import get_task

        dev = torch.device(env.device)
        task = get_task(spec.task)
        model = build_model(spec, env, store)
        params = parameter_summary(model)
        model.to(dev)
        model.eval()  # prompt dropout off
        size = image_size(model.backbone)
        data = load_split(task, Path(spec.data_root), spec.train_split, size)
        norm = normalizer_for(spec, dev)
        augment = None
        if task.augment is not None:  # the official pass reads the training loader (augmented for FGVC)
            from peftbench.engine import _augmenter

            augment = _augmenter(task.augment, size)
        batch = int(spec.hparams["batch_size"])
        n = len(data)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed * 1_000_003))

        def batches():
            for s in range(0, n, batch):
                idx = order[s:s + batch]
                x = data.images[idx]
                yield norm(augment(x) if augment else x), data.labels[idx].to(dev)

        scores = mask_importance(model, batches())
        P = model.num_prompts
        layout = model.segment_layout
        candidates = {}
        for demo in (False, True):
            pairs = [(t, s) for t in token_counts(P, demo) for s in segment_counts(demo)]
            for mode in SCORE_MODES:
                candidates[f"{'demo' if demo else 'full'}/{mode}"] = candidate_patterns(scores, mode, pairs)
        definition = {
            "abs": "S = (1/#batches) * sum_b |dL_b/d mask|, L_b = mean cross-entropy of batch b (paper)",
            "signed": "S = (1/#batches) * sum_b dL_b/d mask (official code)",
            "order": "lowest score pruned first; ties -> lower index first",
        }
        scores_name, masks_name = "scores.json", "masks.json"
        atomic_write_text(store.artifact_path(spec, scores_name), json.dumps(
            {"task": spec.task, "run": spec.key, "definition": definition, "num_images": n, **scores}, indent=1) + "\n")
        atomic_write_text(store.artifact_path(spec, masks_name), json.dumps(
            {"task": spec.task, "run": spec.key, "segment_layout": layout, "segments": SEGMENTS,
             "candidates": candidates}, indent=1) + "\n")
        return {
            "status": "ok",
            "params": params,
            "scores": scores,
            "importance": {"num_images": n, "num_batches": scores["num_batches"], "definition": definition},
            "artifacts": {"scores": f"{spec.key}.{scores_name}", "masks": f"{spec.key}.{masks_name}"},
        }
