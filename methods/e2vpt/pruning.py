"""E^2VPT's pruning maths as pure functions: token and segment masks, importance scores, candidate
patterns (docs/methods/e2vpt.md §3)."""
from __future__ import annotations

import hashlib
import json
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

SEGMENTS = 16  # CLS_TOKEN_P_PIECES_NUM
MIN_KEEP_TOKENS = 1  # MIN_NUMBER_CLS_TOKEN
MIN_KEEP_SEGMENTS = 4  # MIN_NUMBER_CLS_TOKEN_PIECE
LEVELS = tuple(range(10, 100, 10))  # q = 10, 20, ..., 90 (%)
DEMO_TOKEN_LEVELS = (30, 60)  # reduced search: 2 token counts (3 and 6 of P = 10)
DEMO_SEGMENT_LEVELS = (25, 50)  # reduced search: 2 segment counts (4 and 8 of 16)
LAYOUTS = ("interleaved", "contiguous")
SCORE_MODES = ("abs", "signed")


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
    """Zero entries of the (P, D) mask (docs/methods/e2vpt.md §5: D·n_tok + (P − n_tok)·n_seg·D/R for a uniform n_seg)."""
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


# ---------------------------------------------------------------------------------------------
# importance scores and candidate masks
# ---------------------------------------------------------------------------------------------


def mask_importance(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Importance of the token / segment mask entries from their loss gradients (docs/methods/e2vpt.md §3.1, §3.2).

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


