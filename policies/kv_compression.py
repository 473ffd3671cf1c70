"""Latent KV compression in decode (EntropyInfer) and its SnapKV special case: which cached positions to keep.

Pure decisions on tensors (ALGORITHM.md, "Decode"); `shard/compression.py` executes them on a cache.

An *observation window* of ``W`` queries sits on the last ``W`` cached positions. Latent compression
(``gap = N_D >= 1``) keeps the last ``W - N_D`` prompt queries, runs ``N_D`` decode steps on the full cache
appending each step's query, then compresses; SnapKV (``gap = -1``) compresses right after prefill with
the last ``W`` prompt queries. The two differ only in *when* they compress.

Per KV head (heads here are independent rows: callers flatten (sequence, KV head) into one dim):

1. ``probs = softmax(q k^T / sqrt(d))`` of every window query over the head's keys, with a causal corner
   (window query ``i`` sits on position ``len - W + i`` and sees keys up to it), averaged over the window
   queries, in float32. GQA: the ``G`` query heads of a KV head are scored against its keys, no K/V repeat.
   The kernel `kernels/window_scores.py` computes it (fused on CUDA, its torch reference elsewhere).
2. Over the *prefix* (positions ``0 .. len - W - 1``): 1-D pooling per query head (``avg``: zero padding,
   padded slots counted, as SnapKV's ``F.avg_pool1d``; or ``max``, or ``none``).
3. Reduce over the ``G`` query heads of the group: ``max`` (default; what BENCHMARKS.md measured) or ``mean``.
4. Keep the top ``capacity - W`` prefix positions (ascending order) and the last ``W`` positions.
   A head with ``len <= capacity`` keeps everything, in order.

Per-head capacities (``head_capacity: entropy``): every KV head of a layer gets ``floor = max(W,
ceil(min_head_fraction * C))`` and the rest of the layer's ``Hkv * C`` tokens is shared in proportion to the
head's mean prefill entropy (dynamic heads get more, rigid heads, entropy ~0, stay at the floor); the total
per layer is exactly ``Hkv * C``. Layers without entropy (layer 0, prompts that ran dense) stay uniform.

Adaptive capacities (``head_capacity: adaptive``, AdaKV-style): decided at compression time from the
scores that select the positions. Every head keeps the floor; the rest of the layer's ``Hkv * C`` goes to
the highest prefix scores of all its heads together (beyond each head's floor), so the kept score mass is
the largest any split gives and the last score a head keeps is about equal across heads. With
``adaptive_layers`` the pool is the sequence's ``L * Hkv * C`` over every layer (one head capped at
`KVCompressionConfig.max_head_capacity`). Same total tokens as uniform (fewer only where heads are shorter
than their share).

Re-compression (``recompress_every = R > 0``): after the first compression, every ``R`` decode steps the
compact cache is compressed again to the same capacities with the last ``W`` generated queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from entropyinfer.kernels.window_scores import window_scores
from entropyinfer.policies.config import (
    GroupReduce,
    KVCompressionConfig,
    Pooling,
    load_kv_compression_config,
)

__all__ = [
    "KVCompressionConfig",
    "KeepPlan",
    "adaptive_capacities",
    "head_capacities",
    "load_kv_compression_config",
    "plan_keep",
    "prefix_scores",
    "score_keys",
    "select_positions",
    "window_scores",
]


# ------------------------------------------------------------------------------------------------- scoring
def prefix_scores(
    probs: torch.Tensor,
    lengths: torch.Tensor,
    window: int,
    *,
    pooling: Pooling = "avg",
    kernel_size: int = 5,
    group_reduce: GroupReduce = "max",
) -> torch.Tensor:
    """Pool the window scores over positions and reduce them over the GQA group.

    probs: float32 ``[H, G, S]`` (`window_scores`). Returns float32 ``[H, S]``: the score of each prefix
    position ``0 .. lengths[h] - W - 1``, ``-inf`` elsewhere. Pooling sees zeros outside the prefix.
    """
    h, g, s = probs.shape
    lengths = lengths.to(device=probs.device, dtype=torch.long)
    in_prefix = torch.arange(s, device=probs.device)[None, :] < (lengths - window)[:, None]  # [H, S]
    x = torch.where(in_prefix[:, None, :], probs, torch.zeros((), device=probs.device))
    if pooling != "none" and kernel_size > 1:
        flat = x.reshape(h * g, 1, s)
        pad = kernel_size // 2
        if pooling == "avg":
            flat = F.avg_pool1d(flat, kernel_size, stride=1, padding=pad, count_include_pad=True)
        else:
            flat = F.max_pool1d(flat, kernel_size, stride=1, padding=pad)
        x = flat.view(h, g, s)
    x = x.amax(dim=1) if group_reduce == "max" else x.mean(dim=1)
    return x.masked_fill(~in_prefix, float("-inf"))


@dataclass(frozen=True)
class KeepPlan:
    """Which positions each head keeps: ``indices`` int64 ``[H, slots]`` (the first ``counts[h]`` valid,
    ascending; 0 after), ``counts`` int64 ``[H]``."""

    indices: torch.Tensor
    counts: torch.Tensor


def select_positions(
    scores: torch.Tensor, lengths: torch.Tensor, capacities: torch.Tensor, window: int, slots: int
) -> KeepPlan:
    """Top ``capacities[h] - W`` prefix positions by score plus the last ``min(W, len)`` positions, ascending.

    scores: ``[H, S]`` (`prefix_scores`: ``-inf`` outside the prefix); lengths, capacities: integer ``[H]``
    with ``capacities >= W``; ``slots`` (static) must be ``>= min(capacities[h], lengths[h])`` for every head.
    No host sync: the shapes depend only on ``S`` and ``slots``.
    """
    h, s = scores.shape
    dev = scores.device
    lengths = lengths.to(device=dev, dtype=torch.long)
    capacities = capacities.to(device=dev, dtype=torch.long)
    recent = lengths.clamp(max=window)  # [H]
    prefix = lengths - recent
    keep = torch.minimum((capacities - window).clamp(min=0), prefix)  # [H] top positions kept from the prefix
    kmax = min(slots, s)
    cols = torch.arange(slots, device=dev)[None, :]
    if kmax > 0:
        top = scores.topk(kmax, dim=1).indices  # descending scores
        rank = torch.arange(kmax, device=dev)[None, :]
        top = torch.where(rank < keep[:, None], top, torch.full_like(top, s)).sort(dim=1).values
        top = F.pad(top, (0, slots - kmax), value=s)
    else:
        top = torch.full((h, slots), s, dtype=torch.long, device=dev)
    tail = prefix[:, None] + (cols - keep[:, None])  # the recent positions, after the kept prefix ones
    indices = torch.where(cols < keep[:, None], top, tail)
    counts = keep + recent
    indices = torch.where(cols < counts[:, None], indices, torch.zeros_like(indices))
    return KeepPlan(indices=indices, counts=counts)


def score_keys(
    q_obs: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    cfg: KVCompressionConfig,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """float32 ``[H, S]``: the pooled, group-reduced prefix scores (`window_scores` + `prefix_scores`)."""
    probs = window_scores(q_obs, keys, lengths, scale=scale)
    return prefix_scores(
        probs,
        lengths,
        cfg.window,
        pooling=cfg.pooling,
        kernel_size=cfg.kernel_size,
        group_reduce=cfg.group_reduce,
    )


def plan_keep(
    q_obs: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    capacities: torch.Tensor,
    cfg: KVCompressionConfig,
    slots: int,
    *,
    scale: float | None = None,
    scores: torch.Tensor | None = None,
) -> KeepPlan:
    """Score, pool, reduce and select for ``H`` KV heads: q_obs ``[H, G, W, d]``, keys ``[H, S, d]``
    (`scores`: this plan's `score_keys`, when already computed)."""
    if scores is None:
        scores = score_keys(q_obs, keys, lengths, cfg, scale=scale)
    return select_positions(scores, lengths, capacities, cfg.window, slots)


# ------------------------------------------------------------------------------------ per-head capacities
def head_capacities(
    entropy: torch.Tensor | None, cfg: KVCompressionConfig, shape: tuple[int, int]
) -> torch.Tensor:
    """int64 ``[L, Hkv]`` tokens kept per (layer, KV head) of one sequence.

    ``uniform`` (or no entropy): ``C`` everywhere. ``entropy``: entropy is float ``[L, Hkv]`` mean prefill
    entropy per head (NaN for a layer that ran dense); every head gets ``cfg.min_head_capacity`` plus a share
    of the rest in proportion to its entropy, rounded by largest remainder so that each layer's total is
    exactly ``Hkv * C``. Layers with NaN or zero total entropy stay uniform.
    """
    layers, hkv = shape
    c = cfg.capacity
    out = torch.full((layers, hkv), c, dtype=torch.long)
    if cfg.head_capacity != "entropy" or entropy is None:
        return out
    ent = entropy.detach().to("cpu", torch.float64)
    floor = cfg.min_head_capacity
    spare = hkv * (c - floor)
    for li in range(layers):
        e = ent[li].clamp(min=0)
        total = float(e.sum())
        if not math.isfinite(total) or total <= 0 or spare <= 0:
            continue
        share = e / total * spare
        base = share.floor().long()
        left = spare - int(base.sum())
        order = torch.argsort(share - base, descending=True, stable=True)
        base[order[:left]] += 1
        out[li] = floor + base
    return out


def adaptive_capacities(
    scores: torch.Tensor, lengths: torch.Tensor, cfg: KVCompressionConfig, *, across_layers: bool = False
) -> torch.Tensor:
    """int64 ``[L, H]`` tokens kept per (layer, KV head) of one sequence, from its own window scores.

    scores: float32 ``[L, H, S]`` (`score_keys` per layer: ``-inf`` outside each head's prefix); lengths:
    integer ``[L, H]``. Every head gets ``f = cfg.min_head_capacity``; the pool's spare, ``heads * (C - f)``
    (a layer's heads, or every head of every layer with `across_layers`), goes to the largest prefix scores
    of the pool's heads beyond each head's first ``f - W`` (one head at most `max_head_capacity`), so the
    last kept score is about the same in every head. A pool with fewer candidates than its spare keeps
    them all (its heads are shorter than their shares). Equal scores at the cut are split arbitrarily.
    """
    nl, h, s = scores.shape
    floor, cap = cfg.min_head_capacity, cfg.max_head_capacity(h)
    lo, hi = floor - cfg.window, min(cap - cfg.window, s)  # ranks a head competes for: lo .. hi - 1
    out = torch.full((nl, h), floor, dtype=torch.long)
    if hi <= lo:
        return out
    ranked = scores.float().sort(dim=-1, descending=True).values[..., lo:hi]  # [L, H, hi - lo]
    prefix = (lengths.to(scores.device).long() - cfg.window).clamp(min=0)
    rank = torch.arange(lo, hi, device=scores.device)
    ranked = ranked.masked_fill(rank[None, None, :] >= prefix[..., None], float("-inf"))
    pools = ranked.reshape(1, nl * h, hi - lo) if across_layers else ranked
    spare = pools.shape[1] * (cfg.capacity - floor)
    flat = pools.reshape(pools.shape[0], -1)
    take = min(spare, flat.shape[1])
    top = flat.topk(take, dim=1, sorted=False)
    won = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top.indices, top.values > float("-inf"))
    extra = won.view(pools.shape).sum(-1).reshape(nl, h).cpu()
    return out + extra
