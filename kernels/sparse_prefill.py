"""Block-sparse prefill attention (FlashAttention style) with per-(KV head, query segment) block lists.

Semantics: see `entropyinfer.kernels.sparse_prefill_ref` (the torch oracle). In short, query position
``p = q_offset + row`` of segment ``s`` (``[s*S, (s+1)*S)``) and KV head ``hk`` attends to the ``b``-token key
blocks ``block_idx[hk, s, :block_cnt[hk, s]]`` (or to all of ``[0, s*S)`` when the count is ``-1``) plus,
causally, its own segment's keys ``[s*S, p]``.

Kernel layout
-------------
One program = one KV head and one query tile of ``BLOCK_P`` consecutive positions (a tile never straddles
a segment: ``S`` is a multiple of ``BLOCK_P``). The program stacks the ``G`` query heads of that KV head into
the M dimension of its tiles, head-major: row ``r`` is query head ``hk*G + r // BLOCK_P`` at position
``p0 + r % BLOCK_P``, ``BLOCK_M = GP * BLOCK_P`` with ``GP = next_pow2(G)`` (padding heads, e.g. the 4th of
``G = 3``, load zeros and are never stored). So each K/V tile is loaded once for the whole group and every
``tl.dot`` is a ``[BLOCK_M, d] x [d, BLOCK_N]`` tensor-core product, like a dense FlashAttention tile.

The keys of a program fall into three kinds, all with the same online-softmax update (float32, ``exp2``
with ``scale * log2(e)`` folded into one multiplier):

1. Selected blocks (count > 0): the ``cnt * b`` selected keys are streamed as a list; key tile ``t``
   holds list entries ``e = t*BLOCK_N + c`` for ``c < BLOCK_N``, i.e. ``BLOCK_N / b`` blocks of ``b`` keys
   gathered from their ids (key ``ids[e // b] * b + e % b``; each block is contiguous in memory unless
   pages are smaller than a block). The ids of the next tile are loaded one iteration ahead.
2. Contiguous keys below the diagonal: ``[0, diag)`` for a dense segment (count ``-1``), else
   ``[s*S, diag)``, with ``diag`` the query tile start rounded down to ``BLOCK_N`` inside the segment.
3. Diagonal tiles ``[diag, p0 + BLOCK_P)`` with the causal mask ``key <= p`` (one tile when
   ``BLOCK_N >= BLOCK_P``).

They run as two loops, each software-pipelined (cp.async multi-buffering) as one uninterrupted stream: an
unmasked loop over the full gathered tiles then the contiguous tiles (the tile's key offsets are a select
between the gathered and the contiguous formula), and a masked loop over the partial last gathered tile
(entries past ``cnt * b`` masked; their loads read key ``0``) then the diagonal tiles. No mask work on full
tiles, and two pipeline fills per program instead of one per part (a sparse program has only ~40 tiles, so
each fill costs a few percent).

Programs run on a 1-D grid, heaviest (last) query tiles first, all KV heads interleaved.

Paged KV (``PAGED``, `paged_sparse_prefill`): K and V are one layer's pools ``[pages, Hkv, page_size, d]``
and every key position of a tile is turned into its row through the head's page-table row
(`_kv_offsets`: page ``table[p // page_size]``, slot ``p % page_size``); the rest is unchanged.

Tiles: `tiling.tile_config` (a table keyed on head dim and dtype) or an explicit
``config=TileConfig(...)`` for sweeps.
``backend="auto"`` (the default) runs `sparse_prefill_attention_ref` for CPU tensors; ``backend="triton"``
runs the kernel in Triton's interpreter there (`kernels.backend`; test with float32 or float16: the
interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entropyinfer.kernels.backend import Backend, jit_kernel, runs_triton
from entropyinfer.kernels.block_layout import check_sparse_prefill_args, num_segments
from entropyinfer.kernels.sparse_prefill_ref import sparse_prefill_attention_ref
from entropyinfer.kernels.tiling import TileConfig, tile_config

__all__ = ["dense_causal_attention", "launch_sparse_prefill", "sparse_prefill_attention"]

_LOG2E = 1.4426950408889634
_NEG_INIT = tl.constexpr(-1.0e30)  # finite running-max start: a row fully masked in one tile never makes NaN


@triton.jit
def _kv_offsets(
    kn: tl.tensor,
    table: tl.tensor,
    stride_kn: tl.tensor,
    stride_vn: tl.tensor,
    stride_kp: tl.tensor,
    stride_vp: tl.tensor,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor]:
    """Offsets of the K and V rows of keys ``kn`` in their head: contiguous (int32), or in page
    ``table[kn // PAGE_SIZE]`` at slot ``kn % PAGE_SIZE`` (int64: a pool can exceed 2**31 elements)."""
    if PAGED:
        page = tl.load(table + kn // PAGE_SIZE).to(tl.int64)
        slot = kn % PAGE_SIZE
        return page * stride_kp + slot * stride_kn, page * stride_vp + slot * stride_vn
    else:
        return kn * stride_kn, kn * stride_vn


@triton.jit
def _attend_tile(
    acc: tl.tensor,
    l_i: tl.tensor,
    m_i: tl.tensor,
    q: tl.tensor,
    k_base: tl.tensor,
    v_base: tl.tensor,
    k_off: tl.tensor,
    v_off: tl.tensor,
    mask: tl.tensor,
    offs_d: tl.tensor,
    qk_scale: tl.tensor,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor, tl.tensor]:
    """One online-softmax step over ``BLOCK_N`` keys whose rows start at ``k_off`` / ``v_off``."""
    k = tl.load(k_base + k_off[:, None] + offs_d[None, :])
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASKED:
        qk = tl.where(mask, qk * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_ij[:, None]
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_ij[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = tl.load(v_base + v_off[:, None] + offs_d[None, :])
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_ij


# One compile for every chunk: Triton compiles integer arguments apart by whether they are 1 or divisible by
# 16, and these change from chunk to chunk (the counts' row stride is the segments so far: a chunk ending on
# segment 48 compiled a new variant for 0.6 s mid-prefill on an H200, benchmarks/stall_trace.py).
@triton.jit(
    do_not_specialize=["stride_ih", "stride_ch", "stride_th", "Nq", "Nk", "q_offset", "first_tile", "n_tiles"]
)
def _sparse_prefill_fwd(
    Q: tl.tensor,
    K: tl.tensor,
    V: tl.tensor,
    O: tl.tensor,
    IDX: tl.tensor,
    CNT: tl.tensor,
    TABLE: tl.tensor,
    stride_qh: tl.tensor,
    stride_qm: tl.tensor,
    stride_kh: tl.tensor,
    stride_kn: tl.tensor,
    stride_vh: tl.tensor,
    stride_vn: tl.tensor,
    stride_oh: tl.tensor,
    stride_om: tl.tensor,
    stride_ih: tl.tensor,
    stride_is: tl.tensor,
    stride_ch: tl.tensor,
    stride_cs: tl.tensor,
    stride_th: tl.tensor,
    stride_kp: tl.tensor,
    stride_vp: tl.tensor,
    Nq: tl.tensor,
    Nk: tl.tensor,
    q_offset: tl.tensor,
    seg_size: tl.tensor,
    first_tile: tl.tensor,
    n_tiles: tl.tensor,
    n_kv_heads: tl.tensor,
    qk_scale: tl.tensor,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    B: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,
) -> None:
    pid = tl.program_id(0)
    hk = pid % n_kv_heads
    tile = first_tile + n_tiles - 1 - pid // n_kv_heads  # heaviest tiles first
    p0 = tile * BLOCK_P
    seg = p0 // seg_size
    seg_start = seg * seg_size

    offs_r = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    g = offs_r // BLOCK_P
    pos = p0 + offs_r % BLOCK_P
    row = pos - q_offset
    row_ok = (g < G) & (row >= 0) & (row < Nq)
    qh = (hk * G + g).to(tl.int64)

    q = tl.load(
        Q + qh[:, None] * stride_qh + row[:, None] * stride_qm + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_vh
    table = TABLE + hk.to(tl.int64) * stride_th  # paged: this head's page ids

    m_i = tl.full([BLOCK_M], _NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    cnt = tl.load(CNT + hk * stride_ch + seg * stride_cs)

    # Key tiles come in two loops, each software-pipelined as one stream:
    # (a) unmasked: the full tiles of the selected-block list (gathered), then the contiguous keys every row
    #     of the query tile sees: [0, diag) for a dense segment (cnt < 0), else [seg_start, diag);
    # (b) masked: the partial last tile of the block list (entries past n_sel), then the diagonal tiles
    #     [diag, p0 + BLOCK_P) with the causal mask (keys past Nk are clamped for the load, masked anyway).
    n_sel = tl.maximum(cnt, 0) * B  # selected keys (list entries)
    n_full = n_sel // BLOCK_N
    idx_base = IDX + hk * stride_ih + seg * stride_is
    lo = tl.where(cnt < 0, 0, seg_start)
    diag = seg_start + ((p0 - seg_start) // BLOCK_N) * BLOCK_N
    n_unmasked = n_full + (diag - lo) // BLOCK_N

    ids = tl.load(idx_base + offs_n // B, mask=offs_n < n_sel, other=0)
    for u in range(0, n_unmasked):
        e = u * BLOCK_N + offs_n
        kn = tl.where(u < n_full, ids * B + e % B, lo + (u - n_full) * BLOCK_N + offs_n)
        e_next = e + BLOCK_N  # ids of the next tile, one iteration ahead
        ids = tl.load(idx_base + e_next // B, mask=e_next < n_sel, other=0)
        k_off, v_off = _kv_offsets(kn, table, stride_kn, stride_vn, stride_kp, stride_vp, PAGED, PAGE_SIZE)
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_base, v_base, k_off, v_off, 0, offs_d, qk_scale, False, PRECISION
        )

    e_tail = n_full * BLOCK_N + offs_n
    ids_tail = tl.load(idx_base + e_tail // B, mask=e_tail < n_sel, other=0)
    kn_tail = ids_tail * B + e_tail % B
    mask_tail = (e_tail < n_sel)[None, :]
    has_tail = (n_full * BLOCK_N < n_sel).to(tl.int32)
    hi = tl.minimum(p0 + BLOCK_P, Nk)
    n_masked = has_tail + tl.cdiv(hi - diag, BLOCK_N)
    for w in range(0, n_masked):
        kn_diag = diag + (w - has_tail) * BLOCK_N + offs_n
        is_tail = w < has_tail
        kn = tl.where(is_tail, kn_tail, tl.minimum(kn_diag, Nk - 1))
        mask = tl.where(is_tail, mask_tail, kn_diag[None, :] <= pos[:, None])
        k_off, v_off = _kv_offsets(kn, table, stride_kn, stride_vn, stride_kp, stride_vp, PAGED, PAGE_SIZE)
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_base, v_base, k_off, v_off, mask, offs_d, qk_scale, True, PRECISION
        )

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        O + qh[:, None] * stride_oh + row[:, None] * stride_om + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None],
    )


def _pow2_divisor(n: int) -> int:
    return n & -n


def sparse_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    *,
    segment_size: int,
    block_size: int,
    scale: float | None = None,
    q_offset: int = 0,
    config: TileConfig | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Block-sparse prefill attention of one sequence (or one chunk of it), GQA-aware.

    Args:
        q: ``[Hq, Nq, d]``, positions ``[q_offset, q_offset + Nq)``.
        k, v: ``[Hkv, Nk, d]`` with ``Nk >= q_offset + Nq`` (KV heads not repeated). Any strides with a
            contiguous last dim (otherwise a contiguous copy is made).
        block_idx: int32 ``[Hkv, nseg, max_k]``, ids of ``block_size``-token key blocks per (KV head,
            segment), sorted ascending, each block ending at or before the segment start. Not validated here
            (no device sync); `sparse_prefill_attention_ref` validates them.
        block_cnt: int32 ``[Hkv, nseg]``: valid entries per row (``0 <= cnt <= max_k``), or ``-1`` for a dense
            segment (all keys before the segment start). ``nseg >= ceil((q_offset + Nq) / segment_size)``.
        segment_size: query segment length ``S`` (a multiple of 16).
        block_size: key block length ``b``.
        scale: softmax scale, ``d ** -0.5`` by default.
        q_offset: absolute position of q's first row (chunked prefill).
        config: tile override; `tile_config` by default.
        backend: ``auto`` (the kernel for CUDA tensors, else `sparse_prefill_attention_ref`), ``triton`` (the
            kernel, interpreted for CPU tensors) or ``torch`` (the reference); see `kernels.backend`.

    Returns:
        ``[Hq, Nq, d]`` in q's dtype.
    """
    check_sparse_prefill_args(q, k, v, block_idx, block_cnt, segment_size, block_size, q_offset)
    nk = k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not runs_triton(q.device, backend):
        return sparse_prefill_attention_ref(
            q, k, v, block_idx, block_cnt, segment_size=segment_size, block_size=block_size, scale=scale,
            q_offset=q_offset,
        )  # fmt: skip
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if max(nk * k.stride(1), nk * v.stride(1)) >= 2**31:
        raise ValueError("key offsets overflow int32 inside one head")
    return launch_sparse_prefill(
        q, k, v, block_idx, block_cnt, None, nk, segment_size, block_size, scale, q_offset, config
    )


def launch_sparse_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    table: torch.Tensor | None,
    nk: int,
    segment_size: int,
    block_size: int,
    scale: float,
    q_offset: int,
    config: TileConfig | None,
) -> torch.Tensor:
    """Run `_sparse_prefill_fwd` on checked inputs: contiguous ``k, v [Hkv, Nk, d]`` (``table`` None) or
    one layer's pools ``[pages, Hkv, page_size, d]`` read through ``table`` int32 / int64 ``[Hkv, P]``
    (`paged_sparse_prefill.paged_sparse_prefill_attention`); ``nk`` keys ``[0, nk)`` are valid."""
    hq, nq, d = q.shape
    hkv = block_cnt.shape[0]
    if d & (d - 1) or d < 16:
        raise ValueError(f"head dim {d} must be a power of two >= 16")
    if segment_size % 16:
        raise ValueError(f"segment_size {segment_size} must be a multiple of 16")

    group = hq // hkv
    cfg = config or tile_config(d, q.dtype)
    group_p2 = triton.next_power_of_2(group)
    seg_p2 = _pow2_divisor(segment_size)
    block_p = max(1, min(cfg.block_m // group_p2, seg_p2))
    block_m = group_p2 * block_p
    block_n = min(cfg.block_n, seg_p2)

    if block_idx.stride(-1) != 1:
        block_idx = block_idx.contiguous()
    out = torch.empty_like(q)
    if nq == 0:
        return out
    if table is None:  # contiguous keys: strides of [Hkv, Nk, d]; the table argument is never read
        page_size, paged = 1, False
        table, stride_th, stride_kp, stride_vp = block_cnt, 0, 0, 0
        k_strides, v_strides = (k.stride(0), k.stride(1)), (v.stride(0), v.stride(1))
    else:  # pools [pages, Hkv, page_size, d]
        page_size, paged = k.shape[2], True
        stride_th, stride_kp, stride_vp = table.stride(0), k.stride(0), v.stride(0)
        k_strides, v_strides = (k.stride(1), k.stride(2)), (v.stride(1), v.stride(2))

    first_tile = q_offset // block_p
    n_tiles = -(-(q_offset + nq) // block_p) - first_tile
    assert num_segments(q_offset + nq, segment_size) <= block_cnt.shape[1]
    grid = (n_tiles * hkv,)
    jit_kernel(_sparse_prefill_fwd, q.device)[grid](
        q, k, v, out, block_idx, block_cnt, table,
        q.stride(0), q.stride(1), *k_strides, *v_strides, out.stride(0), out.stride(1),
        block_idx.stride(0), block_idx.stride(1), block_cnt.stride(0), block_cnt.stride(1),
        stride_th, stride_kp, stride_vp,
        nq, nk, q_offset, segment_size, first_tile, n_tiles, hkv, scale * _LOG2E,
        G=group, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_N=block_n, B=block_size,
        PAGED=paged, PAGE_SIZE=page_size, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def dense_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    q_offset: int = 0,
    config: TileConfig | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Dense causal attention through the same kernel: every segment dense (``block_cnt = -1``).

    ``q``: ``[Hq, Nq, d]`` at positions ``[q_offset, q_offset + Nq)``, ``k``, ``v``: ``[Hkv, Nk, d]``; query
    ``p`` attends keys ``[0, p]``. Same ``backend`` as `sparse_prefill_attention`.
    """
    segment_size = 1024
    hkv = k.shape[0]
    nseg = max(1, num_segments(q_offset + q.shape[1], segment_size))
    block_idx = torch.zeros(hkv, nseg, 1, dtype=torch.int32, device=q.device)
    block_cnt = torch.full((hkv, nseg), -1, dtype=torch.int32, device=q.device)
    return sparse_prefill_attention(
        q, k, v, block_idx, block_cnt, segment_size=segment_size, block_size=8, scale=scale,
        q_offset=q_offset, config=config, backend=backend,
    )  # fmt: skip
