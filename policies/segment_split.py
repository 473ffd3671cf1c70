"""The torch side of learned segment shares (`policies/segment_shares.py` says what they are): where one
compression plan kept a prompt's positions (`kept_histogram`), each segment's share of a head's prefix from
a table's bins (`span_shares`), and integer budgets from shares (`split_budget`)."""

from __future__ import annotations

import torch

from entropyinfer.policies.segment_shares import POSITION_BINS

__all__ = ["kept_histogram", "span_shares", "split_budget"]


# ------------------------------------------------------------------------------------ what one plan kept
def kept_histogram(
    indices: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor, window: int, bins: int = POSITION_BINS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where one compression's kept prefix positions lie, per head.

    indices int64 ``[H, slots]`` and counts ``[H]`` (`KeepPlan`: the kept prefix positions first, then the
    last ``min(W, len)``), lengths ``[H]`` before compression. -> (float32 ``[H, bins]``: the fraction of
    the head's kept prefix positions in each bin of ``position / prefix``; float32 ``[H]`` weights: 1 where
    the plan chose, ``0 < kept < prefix``, else 0 and a zero row).
    """
    h, slots = indices.shape
    dev = indices.device
    lengths = lengths.to(dev).long()
    recent = lengths.clamp(max=window)
    prefix = lengths - recent
    keep = (counts.to(dev).long() - recent).clamp(min=0)
    chosen = torch.arange(slots, device=dev)[None, :] < keep[:, None]
    which = (indices * bins // prefix.clamp(min=1)[:, None]).clamp(0, bins - 1)
    hist = torch.zeros(h, bins, dtype=torch.float32, device=dev).scatter_add_(1, which, chosen.float())
    weight = ((keep > 0) & (keep < prefix)).float()
    return hist / keep.clamp(min=1)[:, None] * weight[:, None], weight


# -------------------------------------------------------------------------------- the split at compression
def span_shares(
    bins: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, prefix: torch.Tensor
) -> torch.Tensor:
    """float64 ``[sp, ...]``: each segment's share of a head's prefix, from the head's bins.

    bins ``[..., B]`` (rows summing to 1); starts / ends ``[sp, ...]``: each segment's positions
    ``[start, end)``; prefix ``[...]``: the head's prefix length. A bin's mass spreads uniformly over its
    range of ``position / prefix``; the shares over the segments that cover the prefix sum to 1."""
    b = bins.shape[-1]
    p = prefix.double().clamp(min=1)
    lo = (starts.double() / p).clamp(0, 1)[..., None]  # [sp, ..., 1]
    hi = (torch.minimum(ends, prefix.expand_as(ends)).double() / p).clamp(0, 1)[..., None]
    edges = torch.arange(b + 1, dtype=torch.float64) / b  # [B + 1]
    overlap = (torch.minimum(hi, edges[1:]) - torch.maximum(lo, edges[:-1])).clamp(min=0) * b  # [sp, ..., B]
    return (overlap * bins.double()).sum(-1)


def split_budget(total: torch.Tensor, shares: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """int64 ``[sp, ...]`` budgets summing to ``min(total, room.sum(0))`` per head, each at most its `room`.

    total ``[...]`` positions to keep from the prefix; shares ``[sp, ...]`` (any scale, >= 0); room
    ``[sp, ...]`` the prefix positions each segment holds. Budgets follow the shares (largest remainder); a
    segment's overflow beyond its room goes to the others in proportion to their shares (a head whose
    shares are all 0 where room is left spreads by room). Deterministic: every rank computes the same."""
    room = room.long()
    shares = torch.nan_to_num(shares.double(), nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0)
    shares = shares / shares.amax(0, keepdim=True).clamp(min=1e-300)  # scale-free: no overflow
    left = torch.minimum(total.long(), room.sum(0))
    cap, want = room.double(), torch.zeros(room.shape, dtype=torch.float64)
    free = room > 0
    for _ in range(room.shape[0]):  # water-filling: a segment past its room keeps its room, the rest again
        w = torch.where(free, shares.double().clamp(min=0), torch.zeros((), dtype=torch.float64))
        w = torch.where(w.sum(0) > 0, w, torch.where(free, cap, torch.zeros_like(cap)))
        placed = torch.where(free, torch.zeros_like(want), want).sum(0)
        share = w / w.sum(0).clamp(min=1e-300) * (left.double() - placed)
        over = free & (share > cap)
        want = torch.where(free, torch.minimum(share, cap), want)
        if not bool(over.any()):
            break
        free &= ~over
    base = torch.minimum((want + 1e-9).floor().long(), room)  # 1e-9: not to floating-point noise
    frac = torch.where(base < room, want - base, torch.full_like(want, -1.0))
    rank = torch.argsort(torch.argsort(-frac, dim=0, stable=True), dim=0)  # 0: the largest remainder
    return base + (rank < left - base.sum(0)).long()
