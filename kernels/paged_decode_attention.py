"""Split-K decode attention over a paged KV pool, per-(sequence, KV head) block tables, GQA-aware,
CUDA-graph capturable.

Layout (`paged_decode_attention_ref` holds the full description and the shared input checks)
------
- ``q``: ``[B, Hq, d]``; ``Hq = G * Hkv``, query head ``h`` reads KV head ``h // G``.
- ``k_pages`` / ``v_pages``: ``[num_pages, Hkv, page_size, d]``, one layer's pool; last dim contiguous, any
  other strides (a view of a ``[layers, num_pages, ...]`` buffer is fine). ``page_size`` a power of two.
- ``block_tables``: int32 ``[B, Hkv, max_pages]``, any strides (stride 0 over heads for an uncompressed
  batch); ``lengths``: int32 ``[B, Hkv]``. Sequence ``b``, KV head ``h``, position ``p`` lives in
  ``k_pages[block_tables[b, h, p // page_size], h, p % page_size]``.
- Output ``[B, Hq, d]`` in ``q``'s dtype (or written into ``out``); all accumulation is float32.

Algorithm
---------
The contiguous kernel's (`decode_attention`), with one more indirection. Stage 1, grid
``(B * Hkv, num_splits)``: each program takes one (sequence, KV head) and one split of that head's own key
range (``ceil(ceil(len / num_splits) / BLOCK_N) * BLOCK_N`` keys, from the head's length in the kernel),
loads the ``G`` query heads once as a ``[BLOCK_G, d]`` block (padded to 16 rows for ``tl.dot``) and streams
``BLOCK_N``-key tiles: for each key of a tile it reads its page id from the table (``p // PAGE_SIZE`` is a
shift), then gathers the K and V rows (``d`` contiguous elements each), loaded once for all ``G`` heads.
Online softmax in ``exp2``, float32 accumulator; the normalised partial and its log2-sum-exp go to float32
scratch, and stage 2 (the contiguous kernel's merge kernel) combines the splits. ``num_splits == 1``
writes the output directly. A tile may span several small pages or part of one large page, so every
power-of-two page size works with every tile. The table entries of a tile are loaded one iteration ahead:
compiled for sm_90, the K/V tiles then get as many pipeline buffers as in the contiguous kernel (70 KiB of
shared memory at d=128, 3 stages); loading them in the same iteration left one tile in flight (38 KiB).

Safety: lengths are clamped to ``[0, max_pages * page_size]`` and page ids to ``[0, num_pages)`` in the
kernel, so bad tables never fault (they give wrong numbers instead). CPU tensors are always checked
(`check_paged_values`, raising ``ValueError``); on CUDA that check reads device values (a sync), so it runs
only with ``validate=True`` (debugging; never inside a graph capture).

CUDA graphs: no host sync, no allocation once warmed up, no branching on values. ``num_splits`` defaults
to `tiling.choose_paged_num_splits` of shapes only (B, Hkv, ``max_pages * page_size``, d): keep
``max_pages`` fixed per captured graph. The scratch is `split_k_merge.get_workspace`'s cache (shared with
the contiguous kernel: same shapes, same stream use); launches on concurrent streams need their own
``workspace=``. Warm up once outside the capture.

CPU: ``backend="auto"`` runs `paged_decode_attention_cpu` (torch, reads the pages in place, no gather);
``backend="torch"`` the reference (`paged_decode_attention_ref`, on any device); ``backend="triton"`` the
kernels in Triton's interpreter (tests; float32/float16 only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entropyinfer.kernels.backend import Backend, jit_kernel, runs_triton
from entropyinfer.kernels.paged_decode_attention_cpu import paged_decode_attention_cpu
from entropyinfer.kernels.paged_decode_attention_ref import (
    check_paged_inputs,
    check_paged_values,
    paged_decode_attention_ref,
)
from entropyinfer.kernels.split_k_merge import (
    DecodeWorkspace,
    check_workspace,
    decode_merge_kernel,
    get_workspace,
)
from entropyinfer.kernels.tiling import choose_paged_num_splits, paged_decode_tiles, sm_count

__all__ = ["DecodeWorkspace", "get_workspace", "paged_decode_attention"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _paged_decode_split_kernel(
    Q: tl.tensor,
    K: tl.tensor,
    V: tl.tensor,
    Tables: tl.tensor,
    Lens: tl.tensor,
    MidO: tl.tensor,
    MidLse: tl.tensor,
    Out: tl.tensor,
    stride_qb: tl.tensor,
    stride_qh: tl.tensor,
    stride_kp: tl.tensor,
    stride_kh: tl.tensor,
    stride_kl: tl.tensor,
    stride_vp: tl.tensor,
    stride_vh: tl.tensor,
    stride_vl: tl.tensor,
    stride_tb: tl.tensor,
    stride_th: tl.tensor,
    stride_tp: tl.tensor,
    stride_lb: tl.tensor,
    stride_lh: tl.tensor,
    stride_mb: tl.tensor,
    stride_mh: tl.tensor,
    stride_ms: tl.tensor,
    stride_lse_b: tl.tensor,
    stride_lse_h: tl.tensor,
    stride_ob: tl.tensor,
    stride_oh: tl.tensor,
    qk_scale: tl.tensor,
    capacity: tl.tensor,
    num_pages: tl.tensor,
    Hkv: tl.tensor,
    num_splits: tl.tensor,
    HEAD_DIM: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    kvh = (pid_bh % Hkv).to(tl.int64)

    length = tl.load(Lens + b * stride_lb + kvh * stride_lh).to(tl.int32)
    length = tl.minimum(tl.maximum(length, 0), capacity)
    # This head's own key range, cut into num_splits chunks of whole BLOCK_N tiles.
    chunk = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < G
    mask_d = offs_d < HEAD_DIM
    heads = kvh * G + offs_g  # query heads of this group (padded rows masked)

    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)

    t_base = Tables + b * stride_tb + kvh * stride_th
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    # The page ids of a tile are read one iteration ahead, so that the K/V loads of a tile do not wait on
    # a table load of the same iteration (the pipeliner then keeps as many K/V tiles in flight as for the
    # contiguous kernel).
    next_page = tl.load(t_base + ((lo + offs_n) // PAGE_SIZE) * stride_tp, mask=lo + offs_n < hi, other=0)
    for start in range(lo, hi, BLOCK_N):
        offs = start + offs_n
        mask_n = offs < hi
        page = tl.minimum(tl.maximum(next_page.to(tl.int64), 0), num_pages - 1)
        slot = (offs % PAGE_SIZE).to(tl.int64)
        ahead = offs + BLOCK_N
        next_page = tl.load(t_base + (ahead // PAGE_SIZE) * stride_tp, mask=ahead < hi, other=0)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k_rows = page * stride_kp + slot * stride_kl
        k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Every tile holds at least one valid key, so m_new is finite (padded rows score 0).
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_rows = page * stride_vp + slot * stride_vl
        v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    o = acc / l_safe[:, None]  # acc is 0 for an empty split
    store_mask = mask_g[:, None] & mask_d[None, :]
    if WRITE_OUT:  # a single split: this program has the whole answer
        out_ptrs = Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, o.to(Out.dtype.element_ty), mask=store_mask)
    else:
        mid_ptrs = MidO + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + offs_d[None, :]
        tl.store(mid_ptrs, o, mask=store_mask)
        lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), float("-inf"))
        tl.store(MidLse + b * stride_lse_b + heads * stride_lse_h + split, lse, mask=mask_g)


def paged_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
    backend: Backend = "auto",
    validate: bool = False,
    tiles: tuple[int, int, int] | None = None,
    lse_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of one token per sequence over a paged KV pool (split-K, GQA-aware).

    Args:
        q: ``[B, Hq, d]``, last dim contiguous.
        k_pages, v_pages: ``[num_pages, Hkv, page_size, d]`` in q's dtype, last dim contiguous.
        block_tables: int32 (or int64) ``[B, Hkv, max_pages]`` page ids, any strides.
        lengths: int32 (or int64) ``[B, Hkv]``, valid entries per (sequence, KV head).
        scale: softmax scale, ``d ** -0.5`` by default.
        num_splits: key-range splits per (sequence, KV head); `choose_paged_num_splits` by default.
        out: optional ``[B, Hq, d]`` output buffer in q's dtype (last dim contiguous).
        workspace: optional scratch (`DecodeWorkspace` of ``[B, Hq, num_splits, d]`` and
            ``[B, Hq, num_splits]`` float32); the cached `get_workspace` buffers by default.
        backend: ``auto`` (the kernels for CUDA tensors, `paged_decode_attention_cpu` for CPU ones),
            ``triton`` or ``torch`` (the reference).
        validate: on CUDA, also check lengths and page ids against the table and the pool (syncs). CPU
            tensors are always checked.
        tiles: ``(BLOCK_N, num_warps, num_stages)`` instead of `paged_decode_tiles` (benchmark sweeps).
        lse_out: optional float32 ``[B, Hq]``: also write each head's natural log-sum-exp of its scaled
            scores there (-inf: no keys), for merging partial attention over several key sets (sequence
            parallelism). Triton path only; at least two splits (the LSE comes from the split scratch);
            host-side ops after the merge, so not for a graph capture.

    Returns:
        ``[B, Hq, d]`` in q's dtype (``out`` when given).
    """
    check_paged_inputs(q, k_pages, v_pages, block_tables, lengths, out)
    batch, hq, d = q.shape
    num_pages, hkv, page_size, _ = k_pages.shape
    max_pages = block_tables.shape[-1]
    group = hq // hkv
    if scale is None:
        scale = d**-0.5

    if not runs_triton(q.device, backend):
        if lse_out is not None:
            raise ValueError("lse_out needs the Triton kernels (CUDA tensors, or backend='triton')")
        if backend == "auto" and q.device.type == "cpu":  # serving on the CPU: read the pages in place
            return paged_decode_attention_cpu(
                q, k_pages, v_pages, block_tables, lengths, scale=scale, out=out
            )
        ref = paged_decode_attention_ref(q, k_pages, v_pages, block_tables, lengths, scale=scale)
        if out is None:
            return ref
        out.copy_(ref)
        return out
    if q.device.type != "cuda" or validate:
        check_paged_values(block_tables, lengths, num_pages, page_size)

    if out is None:
        out = torch.empty((batch, hq, d), dtype=q.dtype, device=q.device)
    if batch == 0 or hq == 0:
        return out
    if max_pages == 0 or num_pages == 0:
        if lse_out is not None:
            lse_out.fill_(float("-inf"))
        return out.zero_()

    if num_splits is None:
        num_splits = choose_paged_num_splits(batch, hkv, max_pages, page_size, sm_count(q.device), d)
    num_splits = max(2 if lse_out is not None else 1, int(num_splits))

    block_d = triton.next_power_of_2(d)
    block_g = max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16: pad the group
    if tiles is None:
        tiles = paged_decode_tiles(block_d, q.element_size(), page_size)
    block_n, num_warps, num_stages = tiles
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32: unused for 16-bit inputs

    if num_splits > 1:
        if workspace is None:
            workspace = get_workspace(q.device, batch, hq, d, num_splits)
        check_workspace(workspace, q.device, batch, hq, d, num_splits)
        mid_o, mid_lse = workspace
    else:
        mid_o, mid_lse = out, out  # unused: the kernel writes the output itself

    jit_kernel(_paged_decode_split_kernel, q.device)[(batch * hkv, num_splits)](
        q,
        k_pages,
        v_pages,
        block_tables,
        lengths,
        mid_o,
        mid_lse,
        out,
        q.stride(0),
        q.stride(1),
        k_pages.stride(0),
        k_pages.stride(1),
        k_pages.stride(2),
        v_pages.stride(0),
        v_pages.stride(1),
        v_pages.stride(2),
        block_tables.stride(0),
        block_tables.stride(1),
        block_tables.stride(2),
        lengths.stride(0),
        lengths.stride(1),
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        out.stride(0),
        out.stride(1),
        float(scale) * _LOG2E,
        max_pages * page_size,
        num_pages,
        hkv,
        num_splits,
        HEAD_DIM=d,
        G=group,
        BLOCK_G=block_g,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        PAGE_SIZE=page_size,
        WRITE_OUT=num_splits == 1,
        DOT_PRECISION=dot_precision,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        jit_kernel(decode_merge_kernel, q.device)[(batch * hq,)](
            mid_o,
            mid_lse,
            out,
            mid_o.stride(0),
            mid_o.stride(1),
            mid_o.stride(2),
            mid_lse.stride(0),
            mid_lse.stride(1),
            out.stride(0),
            out.stride(1),
            hq,
            num_splits,
            HEAD_DIM=d,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
            num_warps=4 if block_d >= 128 else 2,
        )
        if lse_out is not None:  # the splits' log2-sum-exps, merged, in natural log
            lse_out.copy_(torch.logsumexp(mid_lse * _LN2, dim=-1))
    return out
