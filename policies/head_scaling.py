"""Per-head budget scaling and the captured-mass proxy of one layer's plan (torch, a few small tensors).

The policy actor's `HeadBudgetTable` (`policies/head_budgets.py`) gives each (layer, KV head) a scale factor;
`scaled_counts` applies one layer's row to the budget rule's output: ``counts = floor(scale * B / b)`` capped
by what each segment sees (the rule's own caps, `count_caps`), segment 0 at 0, dense segments unchanged. A
scale of 1 everywhere gives the rule's counts exactly (the same `counts_from_budgets` arithmetic).

`captured_mass` is what the statistics call the attention mass a head's budget captured: the share of the
block distribution ``softmax(logits / sqrt(d))`` over the visible blocks (the profiling's block logits at an
attention-like temperature, not the real attention) that the selected blocks hold, per (KV head, segment);
1 on dense segments and on segment 0. A proxy: the block logits are Quest-style upper bounds of q.k.
"""

from __future__ import annotations

import math

import torch

from entropyinfer.kernels.block_layout import visible_blocks
from entropyinfer.kernels.block_selection_ref import count_caps, counts_from_budgets

__all__ = ["captured_mass", "max_scale", "scaled_counts"]


def max_scale(head_scale: torch.Tensor | None) -> float:
    """The largest factor of a layer's row (1.0 without one): sizes the block lists (host tensor, no sync)."""
    return 1.0 if head_scale is None else max(float(head_scale.max()), 1.0)


def scaled_counts(
    budgets: torch.Tensor,
    head_scale: torch.Tensor,
    dense_segments: torch.Tensor,
    *,
    seq_len: int,
    segment_size: int,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts, kernel_counts)`` int32 ``[Hkv, nseg]`` of the budgets ``[Hkv, nseg]`` (tokens, before the
    caps) times ``head_scale [Hkv]`` (any device: moved to the budgets')."""
    scale = head_scale.to(device=budgets.device, dtype=torch.float32)
    caps = count_caps(seq_len, segment_size, block_size, budgets.device)
    counts = counts_from_budgets(budgets.float() * scale[:, None], caps, block_size)
    return counts, counts.masked_fill(dense_segments[None, :], -1)


def captured_mass(
    logits: torch.Tensor,
    block_idx: torch.Tensor,
    counts: torch.Tensor,
    dense_segments: torch.Tensor,
    *,
    segment_size: int,
    block_size: int,
    head_dim: int,
    segment_offset: int = 0,
) -> torch.Tensor:
    """float32 ``[Hkv, nseg_chunk]``: the share of ``softmax(logits / sqrt(d))`` over each row's visible
    blocks held by its selected blocks (``block_idx [Hkv, nseg_chunk, width]``, -1 padded, the first
    ``counts`` valid). ``dense_segments``: the whole prompt's mask; rows: segments ``segment_offset ..``."""
    _, nseg, nblk = logits.shape
    if nblk == 0 or block_idx.shape[-1] == 0:  # nothing visible anywhere (a prompt of one segment)
        return torch.ones(logits.shape[:2], device=logits.device)
    vis = visible_blocks(nseg, segment_size, block_size, logits.device, segment_offset)
    visible = torch.arange(nblk, device=logits.device)[None, :] < vis[:, None]  # [nseg, nblk]
    z = (logits.float() / math.sqrt(head_dim)).masked_fill(~visible[None], float("-inf"))
    p = torch.softmax(z, dim=-1).nan_to_num(0.0)  # rows with nothing visible: 0
    width = block_idx.shape[-1]
    valid = torch.arange(width, device=logits.device)[None, None, :] < counts[..., None]
    idx = block_idx.long().clamp(min=0)
    kept = torch.gather(p, 2, idx).masked_fill(~valid, 0.0).sum(-1)
    whole = dense_segments[segment_offset : segment_offset + nseg][None, :] | (vis == 0)[None, :]
    return torch.where(whole, torch.ones_like(kept), kept.clamp(max=1.0))
