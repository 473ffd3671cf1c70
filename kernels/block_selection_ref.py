"""Plain-torch reference of block counts and top-k selection (the oracle of `block_selection`, and its CPU
path).

Layout: `block_layout`. The computation, from a layer's entropy ``[Hkv, nseg]`` and block logits:

- Rigid heads: entropy below e_t in every segment >= 1 (segment 0 sees nothing); or, causal
  (`rigid_so_far_ref`, mode `causal`), rigid at segment s if below e_t in every segment 1..s.
- Budget recurrence (`budget_scan_ref`): in float32, in the reference's order of operations; or one fixed
  budget everywhere (the CritiPrefill baseline).
- Counts (`block_counts_ref`): ``floor(B / b)`` blocks capped by what the segment may see (`count_caps`), the
  dense segments (those starting before threshold_len, and the last) marked -1 for the block-sparse kernel.
- Spread rule (`spread_counts_ref`, the `spread` mode of `policies/budgets.py`): causal budgets from the
  entropy level at a logit scale (`block_scoring_ref.spread_entropy_ref`) and a rigid-so-far test; same caps
  and marks.
- Selection (`select_blocks_ref`): per (KV head, segment) the ``count`` visible blocks of highest logit,
  ascending.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from entropyinfer.kernels.block_layout import (
    BlockCounts,
    last_count_cap,
    num_segments,
    visible_blocks,
)

__all__ = [
    "RATIO_EPS",
    "SpreadRule",
    "block_counts_ref",
    "budget_scan_ref",
    "count_caps",
    "counts_from_budgets",
    "dense_segment_mask",
    "rigid_heads",
    "rigid_so_far_ref",
    "select_blocks_ref",
    "spread_budgets_ref",
    "spread_counts_ref",
]

RATIO_EPS = 1e-9  # in the denominator of the entropy growth ratio


def budget_scan_ref(
    entropy: torch.Tensor, rigid: torch.Tensor, base_budget: float, alpha: float, delta: float
) -> torch.Tensor:
    """float32 budgets (tokens) ``[Hkv, nseg]`` from the entropy recurrence; rigid heads get ``base_budget``
    (``rigid`` bool ``[Hkv]``, or ``[Hkv, nseg]`` per segment: the causal rigid-so-far test).

    Dynamic head: ``B[0] = B0``, ``r[1] = delta``,
    ``r[s] = clip((H[s] - H[s-1]) / (H[s-1] + 1e-9), 0, 1 + delta)``,
    ``B[s] = clip(B[s-1] + alpha * B0 * (r[s] - delta), B0, 3 * B0)``, in float32 and in this order.
    """
    h = entropy.float()
    nseg = h.shape[1]
    ratio = torch.zeros_like(h)
    ratio[:, 1:] = (h[:, 1:] - h[:, :-1]) / (h[:, :-1] + RATIO_EPS)
    if nseg > 1:
        ratio[:, 1] = delta
    ratio = ratio.clamp(0.0, 1.0 + delta)
    step = alpha * base_budget
    budgets = torch.empty_like(h)
    budgets[:, 0] = base_budget
    for s in range(1, nseg):
        b = budgets[:, s - 1] + step * (ratio[:, s] - delta)
        budgets[:, s] = b.clamp(base_budget, 3 * base_budget)
    rigid = rigid[:, None] if rigid.dim() == 1 else rigid
    return torch.where(rigid, torch.full_like(budgets, base_budget), budgets)


def rigid_so_far_ref(entropy: torch.Tensor, entropy_threshold: float) -> torch.Tensor:
    """bool ``[Hkv, nseg]``: entropy below e_t in every segment ``1..s`` (the causal rigid test; False at
    segment 0, which sees nothing; NaN is never below). Its last column is `rigid_heads`."""
    below = entropy < entropy_threshold
    below[:, :1] = True
    rigid = torch.cummin(below.to(torch.int32), dim=1).values.bool()
    rigid[:, 0] = False
    return rigid


def rigid_heads(entropy: torch.Tensor, entropy_threshold: float) -> torch.Tensor:
    """bool ``[Hkv]``: entropy below e_t in every segment >= 1 (segment 0 sees nothing); False if nseg < 2."""
    if entropy.shape[1] < 2:
        return torch.zeros(entropy.shape[0], dtype=torch.bool, device=entropy.device)
    return (entropy[:, 1:] < entropy_threshold).all(dim=1)


def count_caps(seq_len: int, segment_size: int, block_size: int, device: torch.device | str) -> torch.Tensor:
    """int64 ``[nseg]``: blocks segment s may keep, ``min(s*S/b, nblocks - ((N mod S)//b + 1))``, >= 0.

    The second term is the reference's bound (it only binds on the last segment, which runs dense).
    """
    nseg = num_segments(seq_len, segment_size)
    last = last_count_cap(seq_len, segment_size, block_size)
    return visible_blocks(nseg, segment_size, block_size, device).clamp(max=last).clamp(min=0)


def counts_from_budgets(budgets: torch.Tensor, caps: torch.Tensor, block_size: int) -> torch.Tensor:
    """int32 ``floor(B / b)`` capped by ``caps``, segment 0 set to 0 (float32 division, as the reference)."""
    counts = torch.minimum((budgets.float() / block_size).to(torch.int64), caps[None, :])
    counts[:, 0] = 0
    return counts.to(torch.int32)


def dense_segment_mask(
    seq_len: int, segment_size: int, threshold_len: int, device: torch.device | str
) -> torch.Tensor:
    """bool ``[nseg]``: segments that start before threshold_len, and the last segment."""
    nseg = num_segments(seq_len, segment_size)
    starts = torch.arange(nseg, device=device) * segment_size
    return (starts < threshold_len) | (starts + segment_size >= seq_len)


def block_counts_ref(
    entropy: torch.Tensor,
    *,
    seq_len: int,
    segment_size: int,
    block_size: int,
    threshold_len: int,
    entropy_threshold: float,
    base_budget: float,
    alpha: float,
    delta: float,
    fixed_budget: float | None = None,
    causal: bool = False,
) -> BlockCounts:
    """Rigid heads, budgets and block counts from a layer's entropy ``[Hkv, nseg]``.

    Budgets follow the entropy recurrence (`budget_scan_ref`), or are ``fixed_budget`` everywhere when it is
    given (the CritiPrefill baseline; rigid heads are still reported). ``causal``: a head keeps B0 at segment
    s only while it is rigid so far (`rigid_so_far_ref`), so column s depends on ``entropy[:, :s+1]`` only;
    ``rigid`` is then the test at the last segment (the same heads as the whole-prompt test).
    """
    rigid = rigid_heads(entropy, entropy_threshold)
    if fixed_budget is None:
        per_segment = rigid_so_far_ref(entropy, entropy_threshold) if causal else rigid
        budgets = budget_scan_ref(entropy, per_segment, base_budget, alpha, delta)
    else:
        budgets = torch.full_like(entropy, float(fixed_budget), dtype=torch.float32)
    caps = count_caps(seq_len, segment_size, block_size, entropy.device)
    counts = counts_from_budgets(budgets, caps, block_size)
    dense = dense_segment_mask(seq_len, segment_size, threshold_len, entropy.device)
    kernel_counts = counts.masked_fill(dense[None, :], -1)
    return BlockCounts(rigid, budgets, counts, kernel_counts, dense)


@dataclass(frozen=True)
class SpreadRule:
    """Parameters of the spread budget rule (tokens; see `spread_budgets_ref`)."""

    tokens_per_block: float  # spread_factor * b: tokens per effective block
    power: float  # gamma: budget ~ V^(1 - gamma) * exp(Hs)^gamma; 1 = exp(Hs) effective blocks
    min_budget: float  # floor of non-rigid heads
    max_budget: float  # cap
    rigid_entropy: float  # rigid so far: Hs / log V < this in every segment 1..s (0 disables)
    rigid_budget: float  # budget of rigid-so-far heads


def spread_budgets_ref(
    spread: torch.Tensor, segment_size: int, block_size: int, rule: SpreadRule
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rigid_so_far bool [Hkv, nseg], budgets float32 [Hkv, nseg])`` from the spread entropy ``Hs``.

    Causal: column ``s`` depends on ``Hs[:, :s+1]`` only. With ``V = s * S / b`` visible blocks (1 at
    segment 0), ``rigid_so_far[h, s] = all(Hs[h, j] < r_e * log V_j, j = 1..s)`` (the entropy normalised by
    the visible blocks below ``r_e``; False at segment 0),
    ``B = clip(exp(gamma * Hs + (1 - gamma) * log V) * tokens_per_block, min, max)`` (``min`` for a NaN
    entropy), ``rigid_budget`` where rigid so far; float32 in this order (the counts kernel's)."""
    h = spread.float().clone()
    nseg = h.shape[1]
    h[:, 0] = 0.0  # segment 0 sees nothing: its (unused) budget is clip(tokens_per_block)
    vis = visible_blocks(nseg, segment_size, block_size, h.device).clamp(min=1).float()
    log_v = torch.log(vis)[None, :]
    below = h < torch.tensor(rule.rigid_entropy, dtype=torch.float32) * log_v
    below[:, :1] = True  # segment 0 sees nothing: no vote
    rigid = torch.cummin(below.to(torch.int32), dim=1).values.bool()
    rigid[:, 0] = False
    gamma = torch.tensor(rule.power, dtype=torch.float32)
    level = gamma * h + (torch.tensor(1.0, dtype=torch.float32) - gamma) * log_v
    tokens = torch.exp(level) * torch.tensor(rule.tokens_per_block, dtype=torch.float32)
    tokens = torch.where(torch.isnan(tokens), torch.full_like(tokens, float(rule.min_budget)), tokens)
    budgets = tokens.clamp(float(rule.min_budget), float(rule.max_budget))  # NaN entropy: the floor
    budgets = torch.where(rigid, torch.full_like(budgets, float(rule.rigid_budget)), budgets)
    return rigid, budgets


def spread_counts_ref(
    spread: torch.Tensor,
    *,
    seq_len: int,
    segment_size: int,
    block_size: int,
    threshold_len: int,
    rule: SpreadRule,
) -> BlockCounts:
    """`BlockCounts` of the spread rule; ``rigid [Hkv]`` is the rigid-so-far flag of the last segment."""
    rigid, budgets = spread_budgets_ref(spread, segment_size, block_size, rule)
    caps = count_caps(seq_len, segment_size, block_size, spread.device)
    counts = counts_from_budgets(budgets, caps, block_size)
    dense = dense_segment_mask(seq_len, segment_size, threshold_len, spread.device)
    kernel_counts = counts.masked_fill(dense[None, :], -1)
    return BlockCounts(rigid[:, -1].clone(), budgets, counts, kernel_counts, dense)


def select_blocks_ref(
    scores: torch.Tensor,
    counts: torch.Tensor,
    segment_size: int,
    block_size: int,
    max_count: int,
    segment_offset: int = 0,
) -> torch.Tensor:
    """int32 ``[Hkv, nseg, max(max_count, 1)]``: per row the ``counts[h, s]`` visible blocks of highest score,
    ascending, padded with -1. ``counts`` must not exceed the visible blocks nor ``max_count``.

    ``scores`` may be logits or probabilities (same order); entries beyond the visible blocks are ignored.
    Row ``i`` is segment ``segment_offset + i`` (a prefill chunk's rows).
    """
    hkv, nseg, nblk = scores.shape
    width = max(max_count, 1)
    out = torch.full((hkv, nseg, width), -1, dtype=torch.int32, device=scores.device)
    k = min(max_count, nblk)
    if k == 0:
        return out
    vis = visible_blocks(nseg, segment_size, block_size, scores.device, segment_offset)
    hidden = torch.arange(nblk, device=scores.device)[None, :] >= vis[:, None]
    masked = scores.float().masked_fill(hidden, float("-inf"))
    idx = masked.topk(k, dim=-1, sorted=True).indices  # [Hkv, nseg, k], best first
    keep = torch.arange(k, device=scores.device) < counts[..., None]
    sentinel = torch.iinfo(torch.int64).max
    idx = torch.where(keep, idx, torch.full_like(idx, sentinel)).sort(dim=-1).values
    out[..., :k] = torch.where(idx == sentinel, torch.full_like(idx, -1), idx).to(torch.int32)
    return out
