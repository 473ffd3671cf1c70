"""Block-sparse prefill attention over paged KV: a prefill chunk of the engine core attends to its prefix
where the prefix lives, in the sequence's KV pages, instead of a contiguous copy of it.

Semantics: `paged_sparse_prefill_ref` (keys through a per-KV-head page table; otherwise
`sparse_prefill`'s). The kernel is `sparse_prefill`'s, compiled with ``PAGED``: every key tile reads the page
ids of its keys from the head's table row (``p // page_size`` is a shift; consecutive keys share a page, so
the row stays in cache) and gathers ``d``-element K and V rows from the pool. Selected 8-token blocks, the
segment's own keys and the diagonal tiles all go through the table, so no copy of the prefix is made: a
chunk at position ``P`` of a long prompt reads only the blocks it attends to, not ``P`` keys per layer.
"""

from __future__ import annotations

import torch

from entropyinfer.kernels.backend import Backend, runs_triton
from entropyinfer.kernels.paged_sparse_prefill_ref import (
    check_paged_prefill_args,
    paged_sparse_prefill_attention_ref,
)
from entropyinfer.kernels.sparse_prefill import launch_sparse_prefill
from entropyinfer.kernels.tiling import TileConfig

__all__ = ["paged_sparse_prefill_attention"]


def paged_sparse_prefill_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    *,
    kv_len: int,
    segment_size: int,
    block_size: int,
    scale: float | None = None,
    q_offset: int = 0,
    config: TileConfig | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Block-sparse prefill attention of one sequence's chunk over its paged KV, GQA-aware.

    Args:
        q: ``[Hq, Nq, d]``, positions ``[q_offset, q_offset + Nq)``.
        k_pages, v_pages: one layer's pools ``[num_pages, Hkv, page_size, d]`` (last dim contiguous, any
            other strides; ``page_size`` a power of two).
        block_table: int32 / int64 ``[Hkv, P]``: KV head ``h``'s pages in order (``P * page_size >= kv_len``).
        block_idx, block_cnt: as in `sparse_prefill.sparse_prefill_attention`.
        kv_len: valid keys ``[0, kv_len)``, at least ``q_offset + Nq``.
        segment_size, block_size, scale, q_offset, config, backend: as in `sparse_prefill_attention`
            (``auto``: the kernel for CUDA tensors, else `paged_sparse_prefill_attention_ref`).

    Returns:
        ``[Hq, Nq, d]`` in q's dtype.
    """
    check_paged_prefill_args(
        q, k_pages, v_pages, block_table, block_idx, block_cnt, kv_len, segment_size, block_size, q_offset
    )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not runs_triton(q.device, backend):
        return paged_sparse_prefill_attention_ref(
            q, k_pages, v_pages, block_table, block_idx, block_cnt, kv_len=kv_len,
            segment_size=segment_size, block_size=block_size, scale=scale, q_offset=q_offset,
        )  # fmt: skip
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_pages.stride(-1) != 1 or v_pages.stride(-1) != 1:
        raise ValueError("k_pages and v_pages need a contiguous last dim")
    if max(k_pages.stride(2), v_pages.stride(2)) * k_pages.shape[2] >= 2**31:
        raise ValueError("offsets inside one page overflow int32")
    if block_table.stride(1) != 1:  # the kernel steps through a row by one
        block_table = block_table.contiguous()
    return launch_sparse_prefill(
        q, k_pages, v_pages, block_idx, block_cnt, block_table, kv_len, segment_size, block_size, scale,
        q_offset, config,
    )  # fmt: skip
