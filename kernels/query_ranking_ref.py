"""Plain-torch reference of query ranking: which key blocks a segment's own queries need (the oracle of
`query_ranking`, and its CPU path).

The paper ranks a segment's blocks by one logit between the element-wise max/min of its ``S`` queries and of
a block's keys. That box is loose: a block that one query of the segment needs sharply (an earlier mention
it copies from) rarely tops it. Query ranking scores blocks by the queries themselves:

- Sampled queries: in segment ``s`` (positions ``[s*S, s*S + L)``, ``L <= S``), rows ``r = 0 .. S/stride - 1``
  at position ``s*S + min((r + 1) * stride - 1, L - 1)`` (every ``stride``-th query, the last one of each run
  of ``stride``; a partial segment repeats its last query), for each of the ``G`` query heads of a KV head.
- Per sampled query, the block logit is the largest ``q . k / sqrt(d)`` over the block's ``b`` keys (exact,
  not a bound), for the blocks the segment sees (``j < s * S / b``), and ``p = softmax`` over them in float32.
- The block's score is the largest ``p`` over the segment's sampled queries and the ``G`` heads.

Entropy and budgets still come from the box profiling (`block_scoring`); this only replaces the order in
which `block_selection` takes blocks. Cost: ``1 / stride`` of the dense ``q k^T`` per pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from entropyinfer.kernels.block_layout import num_segments, visible_blocks

__all__ = ["check_ranking_args", "query_block_scores_ref", "sampled_rows"]


def check_ranking_args(
    q: torch.Tensor,
    num_kv_heads: int,
    key_len: int,
    segment_size: int,
    block_size: int,
    stride: int,
    segment_offset: int,
    num_key_blocks: int,
) -> None:
    """Shape checks shared by the kernel and the reference (no device sync)."""
    if q.dim() != 3 or q.shape[1] == 0:
        raise ValueError(f"q must be [Hq, N > 0, d]; got {tuple(q.shape)}")
    if num_kv_heads <= 0 or q.shape[0] % num_kv_heads:
        raise ValueError(f"query heads {q.shape[0]} must be a positive multiple of KV heads {num_kv_heads}")
    if segment_size <= 0 or block_size <= 0 or segment_size % block_size:
        raise ValueError(
            f"segment_size {segment_size} must be a positive multiple of block_size {block_size}"
        )
    if stride <= 0 or segment_size % stride:
        raise ValueError(f"stride {stride} must be a positive divisor of segment_size {segment_size}")
    if segment_offset < 0:
        raise ValueError(f"segment_offset must be >= 0, got {segment_offset}")
    last = segment_offset + num_segments(q.shape[1], segment_size) - 1
    needed = last * segment_size // block_size
    if num_key_blocks < needed:
        raise ValueError(f"num_key_blocks {num_key_blocks}: the chunk's last segment sees {needed} blocks")
    if key_len < needed * block_size:
        raise ValueError(f"{key_len} keys: the chunk's last segment sees {needed * block_size}")


def sampled_rows(nq: int, segment_size: int, stride: int) -> torch.Tensor:
    """int64 ``[nseg, S / stride]``: the chunk-relative positions of each segment's sampled queries."""
    nseg = num_segments(nq, segment_size)
    r = torch.arange(segment_size // stride)
    start = torch.arange(nseg)[:, None] * segment_size
    length = torch.clamp(nq - start, max=segment_size)
    return start + torch.minimum((r[None, :] + 1) * stride - 1, length - 1)


def query_block_scores_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    segment_size: int,
    block_size: int,
    stride: int,
    *,
    segment_offset: int = 0,
    num_key_blocks: int | None = None,
) -> torch.Tensor:
    """float32 ``[Hkv, nseg_chunk, num_key_blocks]``: the query-ranking score of every block a segment sees
    (0 elsewhere). ``q [Hq, Nq, d]`` holds positions from ``segment_offset * S``, ``k [Hkv, >= Nk, d]`` the
    keys from position 0 (at least those the chunk's last segment sees). ``num_key_blocks``: the width
    (default: the blocks the chunk's last segment sees)."""
    hq, nq, d = q.shape
    hkv = k.shape[0]
    nseg = num_segments(nq, segment_size)
    vis = visible_blocks(nseg, segment_size, block_size, "cpu", segment_offset).tolist()
    width = vis[-1] if num_key_blocks is None else num_key_blocks
    check_ranking_args(q, hkv, k.shape[1], segment_size, block_size, stride, segment_offset, width)
    g = hq // hkv
    rows = sampled_rows(nq, segment_size, stride).to(q.device)
    out = torch.zeros(hkv, nseg, width, dtype=torch.float32, device=q.device)
    scale = 1.0 / math.sqrt(d)
    for s, v in enumerate(vis):
        if v == 0:
            continue
        # the queries take the scale (not the logits, the largest tensor here: one pass fewer over them)
        qs = q[:, rows[s]].float().view(hkv, g * rows.shape[1], d) * scale
        kb = k[:, : v * block_size].float()
        # per block, the max over its keys: max_pool1d is ~3x faster than amax over a last dim of b on CPU
        logits = F.max_pool1d(qs @ kb.transpose(1, 2), block_size)  # [Hkv, rows, v]
        out[:, s, :v] = torch.softmax(logits, dim=-1).amax(dim=1)
    return out
