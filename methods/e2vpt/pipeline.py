"""E^2VPT with prompt pruning + rewinding (``e2vpt-prune``), as the official code runs it
(``tune_vtab_PruningRewind_CVK.py`` / ``tune_fgvc_PruningRewind.py``).

Masks (docs/methods/e2vpt.md §3.2): a token mask ρ ∈ R^P and a segment ("piece") mask ∈ R^{P×16}, both initialised to
1, shared by the visual prompts of all layers, applied after prompt dropout:
``prompt[k, d] · seg[k, s(d)] · tok[k]`` with s(d) = d mod 16 (``interleaved``, the code's
``repeat((1, D/16))`` layout, default) or s(d) = ⌊d / (D/16)⌋ (``contiguous``, the paper's "equal
segments"). Before pruning the masks are trainable (17·P extra parameters); after pruning the model
multiplies them by a fixed 0/1 pattern and they are frozen.

The pipeline (:meth:`E2vptPrune.pipeline`), every run an ordinary run of the store:

A. ``search``         lr × wd grid, train800 → val200, masks present and trainable; best last-epoch
                      val top-1 (tie → smaller lr); ``--search halving``: successive halving over the
                      grid (:func:`peftbench.sweep.protocols.search_stage`, docs/sweeps.md).
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

Under a protocol with a reduced search (``EvalProtocol.reduced_search``: the ``demo`` protocol) the grids
are smaller (2-point lr search, 2 token counts × 2 segment counts); the run records say so in
``option_sources``.

Parameter counts (docs/methods/e2vpt.md §5): ``tuned`` = trainable − (layers) × (zero entries of the P×D mask); the
extra keys ``pruned_prompt_entries`` / ``kept_prompt_entries`` say how many prompt entries the masks
zero / keep (soft masking: nothing is physically removed), ``mask_values`` the 17·P mask entries.
"""
from __future__ import annotations

import dataclasses
import json

from peftbench._io import atomic_write_text
from peftbench.data.loader import batches, epoch_order
from peftbench.data.transforms import augmenter
from peftbench.errors import PipelineError
from peftbench.methods import Option, OptionError, register_method
from peftbench.sweep.stages import chosen, final_stage, job_stage, search_stage
from peftbench.train.engine import job_inputs, normalizer_for

from .model import (
    E2VPT_OPTIONS,
    E2vpt,
    E2vptPruneModel,
    _as_count,
)
from .pruning import (
    DEMO_SEGMENT_LEVELS,
    DEMO_TOKEN_LEVELS,
    LAYOUTS,
    SCORE_MODES,
    SEGMENTS,
    candidate_patterns,
    first_pattern,
    mask_importance,
    segment_counts,
    token_counts,
    zero_scores,
)

DEMO_LR_FACTORS = (1.0, 0.5)  # reduced search: 2 points around the protocol's lr
REWIND_INITS = ("fresh", "saved")
FRESH_SEED_OFFSET = 1
# the options that change stages A-C (the rest only matter from stage E on)
MODEL_OPTIONS = ("prompt_tokens", "kv_tokens", "share_kv", "dropout", "kv_init", "segment_layout", "train_masks")


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
    families = ("vit",)  # the pruning masks and rewinding exist for the ViT only (docs/methods/e2vpt.md §12)
    aliases = ("e2vpt_prune", "e2vpt-pruning")
    description = ("E^2VPT with token/segment prompt pruning + rewinding: search, retrain, importance, "
                   "rewind every candidate, final seeds (docs/methods/e2vpt.md §3.2)")
    options = dict(PRUNE_OPTIONS)
    # `peftbench bench` measures a pruned model: half the tokens and half the segments of the rest (q = 50 % of
    # both, the middle of the candidate grid, docs/methods/e2vpt.md §11); --set prune_tokens=... overrides it
    bench_options = {"prune_tokens": 5, "prune_segments": 8}

    def resolve_options(self, opts, task):
        opts, sources = super().resolve_options(opts, task)
        P = opts["prompt_tokens"]
        for key, limit in (("prune_tokens", P), ("prune_segments", SEGMENTS)):
            n = _optional_count(opts, key)
            if n is not None and n > limit:
                raise OptionError(f"option {key!r}: {n} is more than {limit}")
            opts[key] = n
        return opts, sources

    def build(self, backbone, num_classes, opts):
        P = _as_count("prompt_tokens", opts["prompt_tokens"])
        pattern = opts.get("mask")
        n_tok, n_seg = _optional_count(opts, "prune_tokens"), _optional_count(opts, "prune_segments")
        if pattern is None and (n_tok is not None or n_seg is not None):
            pattern = first_pattern(P, n_tok or 0, n_seg or 0)
        return E2vptPruneModel(
            backbone, num_classes, prompt_tokens=P,
            kv_tokens=_as_count("kv_tokens", opts["kv_tokens"]),
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
        opts = dict(ctx.options)
        P = int(opts["prompt_tokens"])
        if P < 1:
            raise PipelineError("e2vpt-prune prunes visual prompts: it needs prompt_tokens >= 1")
        reduced = protocol.reduced_search
        model_opts = {k: opts[k] for k in MODEL_OPTIONS}
        sources = dict(ctx.option_sources)
        search_ctx = ctx
        if reduced and not ctx.overrides.get("lr_grid"):
            lr0 = protocol.search_points(ctx)[0]["lr"]
            lrs = tuple(lr0 * f for f in DEMO_LR_FACTORS)
            search_ctx = dataclasses.replace(ctx, overrides={**ctx.overrides, "lr_grid": lrs})
            sources["search_grid"] = (f"{protocol.name} protocol: reduced search, lr {list(lrs)} "
                                      "(full: the recipe's lr x wd grid)")
        pairs = self.candidate_pairs(opts, reduced)
        if reduced and opts.get("prune_tokens") is None and opts.get("prune_segments") is None:
            sources["candidate_grid"] = (f"{protocol.name} protocol: reduced grid, token levels "
                                         f"{list(DEMO_TOKEN_LEVELS)} % x "
                                         f"segment levels {list(DEMO_SEGMENT_LEVELS)} % -> {len(pairs)} candidates "
                                         f"(full: q = 10..90 % for both)")
        if not pairs:
            raise PipelineError(f"no pruning candidates for prompt_tokens={P}")

        seed0 = ctx.seeds[0]
        points = protocol.search_points(search_ctx)

        def spec(stage, role, hp, seed, **kw):
            return dataclasses.replace(ctx.spec(stage, role, hp, seed, **kw), option_sources=dict(sources))

        # A. lr x wd search (grid, or successive halving: --search), masks present and trainable
        choice = dict(points[0])
        if len(points) > 1:
            best = yield from search_stage(ctx, points, protocol.base_hparams(ctx, "search"),
                                           lambda stage, hp, i: spec(stage, "search", hp, seed0, options=model_opts))
            choice = chosen(best)
        hp = {**protocol.base_hparams(ctx, "final"), **choice}

        # B. retrain once with the chosen hyper-parameters, keep the initial and final weights
        before = spec("before_pruning", "search", hp, seed0, options=model_opts,
                      extras={"save_init": True, "save_final": True})
        yield from job_stage(ctx, [before], "before_pruning")

        # C. importance scores from the mask gradients (no training)
        importance = spec("importance", "search", {"batch_size": hp["batch_size"]}, seed0, job="importance",
                          options=model_opts, extras={"init_state": f"{before.key}.final.safetensors"})
        records = yield from job_stage(ctx, [importance], "importance")
        if records is None:  # a dry run: placeholder scores
            scores = zero_scores(P)
        elif not records[0].get("scores"):
            raise PipelineError(f"stage importance did not finish: its record {importance.key} has no scores")
        else:
            scores = records[0].get("scores")

        # D. candidate masks
        patterns = candidate_patterns(scores, opts["score"], pairs)
        for p in patterns:
            p["scores_from"] = f"{importance.key}.scores.json"
            p["layout"] = opts["segment_layout"]

        # E. rewind: retrain every candidate with fixed, frozen 0/1 masks; best val top-1, tie -> larger n_tok, n_seg
        #    (a search over the candidates: --search halving applies to it too)
        if opts["rewind_init"] == "saved":
            rewind_seed, init_extras = seed0, {"init_state": f"{before.key}.init.safetensors"}
        else:
            rewind_seed, init_extras = seed0 + FRESH_SEED_OFFSET, {}

        def candidate(i: int) -> dict:
            return {"candidate": f"{patterns[i]['n_tok']}x{patterns[i]['n_seg']}", **init_extras}

        best = yield from search_stage(
            ctx, [{} for _ in patterns], hp,
            lambda stage, h, i: spec(stage, "search", h, rewind_seed, options={**opts, "mask": patterns[i]},
                                     extras=candidate(i)),
            name="rewind", tie=lambda i: (-patterns[i]["n_tok"], -patterns[i]["n_seg"]))
        pick = next(i for i in range(len(patterns)) if candidate(i)["candidate"] == best.spec["extras"]["candidate"])

        # F. final seeds with the chosen masks
        yield from final_stage(ctx, hp, lambda stage, h, seed: spec(stage, "final", h, seed,
                                                                    options={**opts, "mask": patterns[pick]},
                                                                    extras=candidate(pick)))

    # -- stage C ------------------------------------------------------------------------------
    def run_job(self, job, spec, store, env):
        if job != "importance":
            return super().run_job(job, spec, store, env)
        dev, task, model, params, data, size = job_inputs(spec, store, env)
        model.eval()  # prompt dropout off
        # the official pass reads the training loader (augmented for FGVC): epoch 0's order and augmentation
        n = len(data)
        order = epoch_order(spec.seed, 0, n)
        stream = ((x, y) for x, y, _ in batches(data.images, data.labels, order, int(spec.hparams["batch_size"]),
                                                 prepare=normalizer_for(spec, dev), augment=augmenter(task, size),
                                                 device=dev))
        scores = mask_importance(model, stream)
        P = model.num_prompts
        layout = model.segment_layout
        candidates = {}
        for demo in (False, True):  # the full grid and the reduced one
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
