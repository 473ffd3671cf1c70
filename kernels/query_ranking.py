"""Query ranking of key blocks (semantics: `query_ranking_ref`): per (KV head, segment), the largest softmax
probability that any of the segment's sampled queries (and the KV head's ``G`` query heads) gives a block,
with the block's logit the exact max of ``q . k / sqrt(d)`` over its keys.

One program per (segment, KV head). Its sampled query rows (``G * S / stride``, in tiles of ``BLOCK_M``) are
loaded once per tile; two passes over the keys the segment sees, ``BLOCK_N`` keys at a time: the first
keeps each row's running max and softmax normaliser over the block logits, the second recomputes the block
logits, normalises them and keeps the column max over the rows, merged into the output (so ``G * S /
stride`` rows cost ``2 * ceil(rows / BLOCK_M)`` passes; float32 inputs use IEEE dots). Keys are read
contiguous (``k [Hkv, N, d]``) or through a page table (``PAGED``: ``k_pages [num_pages, Hkv, page, d]``), so
a prefill chunk over paged KV needs no gather.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from entropyinfer.kernels.backend import Backend, jit_kernel, runs_triton
from entropyinfer.kernels.block_layout import num_segments
from entropyinfer.kernels.paged_sparse_prefill_ref import check_page_table, gather_pages_ref
from entropyinfer.kernels.query_ranking_ref import check_ranking_args, query_block_scores_ref
from entropyinfer.kernels.tiling import pow2

__all__ = ["query_block_scores"]


@triton.jit(do_not_specialize=["nq", "segment_offset"])
def _query_ranking_kernel(
    q_ptr: tl.tensor,
    k_ptr: tl.tensor,
    table_ptr: tl.tensor,
    out_ptr: tl.tensor,
    stride_qh: tl.tensor,
    stride_qn: tl.tensor,
    stride_kp: tl.tensor,
    stride_kh: tl.tensor,
    stride_kn: tl.tensor,
    stride_th: tl.tensor,
    stride_oh: tl.tensor,
    stride_os: tl.tensor,
    nq: tl.tensor,
    segment_offset: tl.tensor,
    dim: tl.tensor,
    scale: tl.tensor,
    G: tl.constexpr,
    S: tl.constexpr,
    STRIDE: tl.constexpr,
    B: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    seg = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    n_keys = (segment_offset + seg) * S  # the keys of the blocks this segment sees (none: no pass runs)
    R: tl.constexpr = S // STRIDE
    NB: tl.constexpr = BLOCK_N // B
    seg_len = tl.minimum(nq - seg * S, S)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < dim
    kn = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, NB)
    for m0 in range(0, G * R, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < G * R
        head = h * G + m // R
        pos = seg * S + tl.minimum((m % R + 1) * STRIDE - 1, seg_len - 1)
        qp = q_ptr + head[:, None] * stride_qh + pos[:, None].to(tl.int64) * stride_qn + d[None, :]
        qt = tl.load(qp, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, n_keys, BLOCK_N):  # pass 1: per row, max and normaliser over the block logits
            x = _block_logits(k_ptr, table_ptr, qt, n0, kn, d, d_ok, n_keys, h, stride_kp, stride_kh,
                              stride_kn, stride_th, scale, B, PAGED, PAGE_SIZE, BLOCK_M, BLOCK_N,
                              DOT_PRECISION)  # fmt: skip
            new_max = tl.maximum(row_max, tl.max(x, axis=1))
            row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
            row_max = new_max
        for n0 in range(0, n_keys, BLOCK_N):  # pass 2: probabilities, max over the rows
            x = _block_logits(k_ptr, table_ptr, qt, n0, kn, d, d_ok, n_keys, h, stride_kp, stride_kh,
                              stride_kn, stride_th, scale, B, PAGED, PAGE_SIZE, BLOCK_M, BLOCK_N,
                              DOT_PRECISION)  # fmt: skip
            p = tl.exp(x - row_max[:, None]) / row_sum[:, None]
            p = tl.where(m_ok[:, None], p, 0.0)
            best = tl.max(p, axis=0)
            j = n0 // B + cols
            j_ok = j * B < n_keys
            op = out_ptr + h * stride_oh + seg.to(tl.int64) * stride_os + j
            if m0 > 0:
                best = tl.maximum(best, tl.load(op, mask=j_ok, other=0.0))
            tl.store(op, best, mask=j_ok)


@triton.jit
def _block_logits(
    k_ptr: tl.tensor,
    table_ptr: tl.tensor,
    qt: tl.tensor,
    n0: tl.tensor,
    kn: tl.tensor,
    d: tl.tensor,
    d_ok: tl.tensor,
    n_keys: tl.tensor,
    h: tl.tensor,
    stride_kp: tl.tensor,
    stride_kh: tl.tensor,
    stride_kn: tl.tensor,
    stride_th: tl.tensor,
    scale: tl.tensor,
    B: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> tl.tensor:
    """float32 ``[BLOCK_M, BLOCK_N // B]``: per row, the max scaled logit over each block's keys of the tile
    of keys ``[n0, n0 + BLOCK_N)`` (-inf for blocks past ``n_keys``)."""
    pos = n0 + kn
    ok = pos < n_keys
    if PAGED:
        page = tl.load(table_ptr + h * stride_th + pos // PAGE_SIZE, mask=ok, other=0).to(tl.int64)
        row = page * stride_kp + h * stride_kh + (pos % PAGE_SIZE).to(tl.int64) * stride_kn
    else:
        row = h * stride_kh + pos.to(tl.int64) * stride_kn
    kt = tl.load(k_ptr + row[:, None] + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
    s = tl.dot(qt, tl.trans(kt), input_precision=DOT_PRECISION).to(tl.float32) * scale
    s = tl.where(ok[None, :], s, float("-inf"))
    return tl.max(tl.reshape(s, (BLOCK_M, BLOCK_N // B, B)), axis=2)


def query_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    segment_size: int,
    block_size: int,
    stride: int,
    *,
    segment_offset: int = 0,
    num_key_blocks: int | None = None,
    block_table: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """float32 ``[Hkv, nseg_chunk, num_key_blocks]`` query-ranking scores (`query_ranking_ref`; 0 past the
    blocks a segment sees). ``q [Hq, Nq, d]`` from position ``segment_offset * S``; ``k`` the keys from
    position 0: ``[Hkv, >= Nk, d]``, or with ``block_table [Hkv, P]`` a layer's page pool ``[num_pages, Hkv,
    page_size, d]`` (last dims contiguous). ``backend``: `kernels.backend`."""
    nseg = num_segments(q.shape[1], segment_size)
    needed = (segment_offset + nseg - 1) * segment_size // block_size
    width = needed if num_key_blocks is None else num_key_blocks
    hkv = k.shape[1] if block_table is not None else k.shape[0]
    if block_table is not None:
        check_page_table(k, block_table, needed * block_size)
        key_len = block_table.shape[1] * k.shape[2]
    else:
        key_len = k.shape[1]
    check_ranking_args(q, hkv, key_len, segment_size, block_size, stride, segment_offset, width)
    if not runs_triton(q.device, backend):
        keys = k if block_table is None else gather_pages_ref(k, block_table, needed * block_size)
        return query_block_scores_ref(
            q, keys, segment_size, block_size, stride, segment_offset=segment_offset, num_key_blocks=width
        )
    if block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size} must be a power of two")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k need a contiguous last dim")
    out = torch.zeros(hkv, nseg, width, dtype=torch.float32, device=q.device)
    if needed == 0:
        return out
    g, d = q.shape[0] // hkv, q.shape[2]
    paged = block_table is not None
    if paged:
        assert block_table is not None
        table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
        strides = (k.stride(0), k.stride(1), k.stride(2), table.stride(0))
        page_size = k.shape[2]
    else:
        table = out  # unused
        strides = (0, k.stride(0), k.stride(1), 0)
        page_size = 1
    rows = g * (segment_size // stride)
    block_m = min(max(pow2(rows), 16), 128)
    block_n = max(64, block_size)
    jit_kernel(_query_ranking_kernel, q.device)[(nseg, hkv)](
        q, k, table, out, q.stride(0), q.stride(1), *strides, out.stride(0), out.stride(1),
        q.shape[1], segment_offset, d, 1.0 / math.sqrt(d),
        G=g, S=segment_size, STRIDE=stride, B=block_size, PAGED=paged, PAGE_SIZE=page_size,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(pow2(d), 16),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
    )  # fmt: skip
    return out
