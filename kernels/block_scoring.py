"""Entropy profiling for segment-wise sparse prefill, in Triton (`block_scoring_ref.py` is the torch oracle).

One layer of one sequence in five launches, none looping over segments in Python and none sorting:

1. `_minmax_kernel` (twice): min/max representations of the query segments ``[Hq, nseg, d]`` and of the key
   blocks ``[Hkv, nblocks, d]``, in the inputs' dtype (exact: min/max only pick elements). This reads q and k
   once and is the memory-bound part (1.3 GB at 128k tokens for 32/8 heads, d=128, bf16).
2. `_logits_kernel`: a tile of segments x a tile of blocks per program, four ``tl.dot`` per query head
   (``qmax|qmin x kmax|kmin``, float32 accumulation), the per-head max, the GQA mean; tiles above the causal
   diagonal exit at once. Writes the visible block logits once, float32 ``[Hkv, nseg, nblocks]``.
3. `_entropy_kernel`: one program per (segment, KV head) row: max, sum of ``exp(x - max)``, then
   ``-sum p log(p + 1e-9)`` with ``p = exp(x - max) / sum`` (three passes over the row, from L2).
4. `_counts_kernel`: one program per KV head: the rigid test, the budget recurrence (a sequential float32
   loop over segments, or one fixed budget), the capped block counts and the dense-segment marks, so that no
   torch glue runs between profiling and selection.
5. `_select_kernel`: a tile of (segment) rows per program: the ``count``-th largest logit of each row by a
   bitwise radix select on order-preserving float bits (32 counting steps, over a row held in registers when
   it fits one chunk), then a prefix-sum compaction that writes the selected block ids in ascending order.
   Selection by logit equals selection by probability (softmax is monotone).

Entry points take ``backend``: ``"triton"`` runs the kernels (compiled for CUDA tensors, through the Triton
interpreter for CPU tensors), ``"torch"`` the reference, ``"auto"``
Triton for CUDA tensors or under the interpreter, else the reference. The interpreter (CPU tensors) needs
TRITON_INTERPRET=1 in the environment before triton is first imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import triton
import triton.language as tl

from entropyinfer.kernels.block_scoring_ref import (
    ENTROPY_EPS,
    RATIO_EPS,
    BlockCounts,
    BlockScores,
    block_counts_ref,
    block_scores_ref,
    check_qk,
    num_blocks,
    num_segments,
    select_blocks_ref,
)

__all__ = [
    "Backend",
    "ScoringTiles",
    "block_counts",
    "block_scores",
    "interpreter_ready",
    "row_chunk",
    "scoring_tiles",
    "select_blocks",
]

Backend = Literal["auto", "torch", "triton"]


# ----------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _minmax_kernel(
    x_ptr,
    max_ptr,
    min_ptr,
    stride_xh,
    stride_xn,
    stride_oh,
    stride_og,
    n_rows,
    n_groups,
    dim,
    GROUP: tl.constexpr,  # rows per group: S for query segments, b for key blocks
    GROUPS: tl.constexpr,  # groups per program
    ROWS: tl.constexpr,  # rows of each group loaded per step
    BLOCK_D: tl.constexpr,
):
    h = tl.program_id(1).to(tl.int64)
    g = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    r = tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < n_groups
    d_ok = d < dim
    x_base = x_ptr + h * stride_xh
    if ROWS >= GROUP:
        # one step per group (key blocks): load the groups' rows, reduce across rows
        rows = g[:, None] * GROUP + r[None, :]
        ok = g_ok[:, None] & (r[None, :] < GROUP) & (rows < n_rows)
        m = ok[:, :, None] & d_ok[None, None, :]
        ptrs = x_base + rows[:, :, None].to(tl.int64) * stride_xn + d[None, None, :]
        x = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
        res_max = tl.max(tl.where(m, x, float("-inf")), axis=1)
        res_min = tl.min(tl.where(m, x, float("inf")), axis=1)
    else:
        # many steps per group (query segments): element-wise accumulation, one reduction at the end
        acc_max = tl.full([GROUPS, ROWS, BLOCK_D], float("-inf"), tl.float32)
        acc_min = tl.full([GROUPS, ROWS, BLOCK_D], float("inf"), tl.float32)
        for r0 in range(0, GROUP, ROWS):
            rows = g[:, None] * GROUP + r0 + r[None, :]
            ok = g_ok[:, None] & (r0 + r[None, :] < GROUP) & (rows < n_rows)
            m = ok[:, :, None] & d_ok[None, None, :]
            ptrs = x_base + rows[:, :, None].to(tl.int64) * stride_xn + d[None, None, :]
            x = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
            acc_max = tl.maximum(acc_max, tl.where(m, x, float("-inf")))
            acc_min = tl.minimum(acc_min, tl.where(m, x, float("inf")))
        res_max = tl.max(acc_max, axis=1)
        res_min = tl.min(acc_min, axis=1)
    out = h * stride_oh + g[:, None] * stride_og + d[None, :]
    om = g_ok[:, None] & d_ok[None, :]
    tl.store(max_ptr + out, res_max.to(max_ptr.dtype.element_ty), mask=om)
    tl.store(min_ptr + out, res_min.to(min_ptr.dtype.element_ty), mask=om)


@triton.jit
def _logits_kernel(
    qmax_ptr,
    qmin_ptr,
    kmax_ptr,
    kmin_ptr,
    logit_ptr,
    stride_qh,
    stride_qs,
    stride_kh,
    stride_kj,
    stride_lh,
    stride_ls,
    nseg,
    nblocks,
    dim,
    blocks_per_seg,
    G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    s0 = tl.program_id(0) * BLOCK_S
    j0 = tl.program_id(1) * BLOCK_J
    h = tl.program_id(2).to(tl.int64)
    # the last segment of the tile sees blocks j < s_last * S / b: skip tiles above the causal diagonal
    s_last = tl.minimum(s0 + BLOCK_S, nseg) - 1
    if j0 < s_last * blocks_per_seg:
        s = s0 + tl.arange(0, BLOCK_S)
        j = j0 + tl.arange(0, BLOCK_J)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < dim
        k_off = h * stride_kh + j[:, None] * stride_kj + d[None, :]
        k_ok = (j[:, None] < nblocks) & d_ok[None, :]
        kmax = tl.load(kmax_ptr + k_off, mask=k_ok, other=0.0)
        kmin = tl.load(kmin_ptr + k_off, mask=k_ok, other=0.0)
        q_ok = (s[:, None] < nseg) & d_ok[None, :]
        acc = tl.zeros([BLOCK_S, BLOCK_J], dtype=tl.float32)
        for g in range(G):
            q_off = (h * G + g) * stride_qh + s[:, None] * stride_qs + d[None, :]
            qmax = tl.load(qmax_ptr + q_off, mask=q_ok, other=0.0)
            qmin = tl.load(qmin_ptr + q_off, mask=q_ok, other=0.0)
            # (qmax.kmax + qmin.kmax) and (qmax.kmin + qmin.kmin); the halving is applied once below
            hi = tl.dot(qmax, tl.trans(kmax), input_precision=DOT_PRECISION)
            hi = tl.dot(qmin, tl.trans(kmax), hi, input_precision=DOT_PRECISION)
            lo = tl.dot(qmax, tl.trans(kmin), input_precision=DOT_PRECISION)
            lo = tl.dot(qmin, tl.trans(kmin), lo, input_precision=DOT_PRECISION)
            acc += tl.maximum(hi, lo)
        acc = tl.math.div_rn(acc * 0.5, tl.full([BLOCK_S, BLOCK_J], G, tl.float32))
        visible = (s[:, None] < nseg) & (j[None, :] < s[:, None] * blocks_per_seg)
        l_off = h * stride_lh + s[:, None].to(tl.int64) * stride_ls + j[None, :]
        tl.store(logit_ptr + l_off, acc, mask=visible)


@triton.jit
def _entropy_kernel(
    logit_ptr,
    ent_ptr,
    rmax_ptr,
    rsum_ptr,
    stride_lh,
    stride_ls,
    stride_eh,
    nseg,
    nblocks,
    blocks_per_seg,
    eps,
    ROWS: tl.constexpr,  # segments per program
    CHUNK: tl.constexpr,  # blocks per step along a row
):
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    s_ok = s < nseg
    vis = s * blocks_per_seg  # [ROWS] visible blocks of each segment
    vis_max = (tl.minimum(tl.program_id(0) * ROWS + ROWS, nseg) - 1) * blocks_per_seg
    rows = logit_ptr + h * stride_lh + s[:, None].to(tl.int64) * stride_ls
    offs = tl.arange(0, CHUNK)[None, :]
    m_acc = tl.full([ROWS, CHUNK], float("-inf"), tl.float32)
    for c in range(0, vis_max, CHUNK):
        x = tl.load(rows + c + offs, mask=(c + offs < vis[:, None]) & s_ok[:, None], other=float("-inf"))
        m_acc = tl.maximum(m_acc, x)
    m = tl.max(m_acc, axis=1)
    m = tl.where(vis > 0, m, 0.0)
    z_acc = tl.zeros([ROWS, CHUNK], tl.float32)
    for c in range(0, vis_max, CHUNK):
        ok = (c + offs < vis[:, None]) & s_ok[:, None]
        x = tl.load(rows + c + offs, mask=ok, other=0.0)
        z_acc += tl.where(ok, tl.exp(x - m[:, None]), 0.0)
    z = tl.sum(z_acc, axis=1)
    z = tl.where(vis > 0, z, 1.0)
    e_acc = tl.zeros([ROWS, CHUNK], tl.float32)
    for c in range(0, vis_max, CHUNK):
        ok = (c + offs < vis[:, None]) & s_ok[:, None]
        x = tl.load(rows + c + offs, mask=ok, other=0.0)
        p = tl.math.div_rn(tl.exp(x - m[:, None]), tl.broadcast_to(z[:, None], [ROWS, CHUNK]))
        e_acc += tl.where(ok, p * tl.log(p + eps), 0.0)
    ent = -tl.sum(e_acc, axis=1)
    # nothing visible (segment 0): the reference's uniform 1/nblocks, entropy ln(nblocks); unused downstream
    ent = tl.where(vis > 0, ent, tl.log(tl.maximum(nblocks, 1).to(tl.float32)))
    out = h * stride_eh + s
    tl.store(ent_ptr + out, ent, mask=s_ok)
    tl.store(rmax_ptr + out, m, mask=s_ok)
    tl.store(rsum_ptr + out, z, mask=s_ok)


@triton.jit
def _counts_kernel(
    ent_ptr,
    budget_ptr,
    counts_ptr,
    kcounts_ptr,
    rigid_ptr,
    dense_ptr,
    stride_eh,
    stride_bh,
    stride_ch,
    nseg,
    seq_len,
    seg_size,
    seg_blocks,
    last_cap,
    threshold_len,
    base,
    top,
    step,
    delta,
    ratio_max,
    eps,
    e_t,
    block_f,
    DYNAMIC: tl.constexpr,
    CHUNK: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    row = ent_ptr + h * stride_eh
    not_below = 0  # segments >= 1 whose entropy is not below e_t (NaN counts as not below)
    for s0 in range(0, nseg, CHUNK):  # a fixed chunk, so no length-dependent compile
        offs = s0 + tl.arange(0, CHUNK)
        later = (offs >= 1) & (offs < nseg)
        ent = tl.load(row + offs, mask=later, other=0.0)
        not_below += tl.sum(tl.where(later, tl.where(ent < e_t, 0, 1), 0), axis=0)
    rigid = (not_below == 0) & (nseg >= 2)
    tl.store(rigid_ptr + h, rigid.to(tl.int8))
    b_out = budget_ptr + h * stride_bh
    c_out = counts_ptr + h * stride_ch
    k_out = kcounts_ptr + h * stride_ch
    budget = base + 0.0  # float32 scalar, carried through the loop
    dense = (threshold_len > 0) | (seg_size >= seq_len)
    tl.store(b_out, budget)
    tl.store(c_out, 0)
    tl.store(k_out, tl.where(dense, -1, 0))
    tl.store(dense_ptr, dense.to(tl.int8))  # every program writes the same mask
    prev = tl.load(row)
    for s in range(1, nseg):
        if DYNAMIC:
            cur = tl.load(row + s)
            ratio = tl.math.div_rn(cur - prev, prev + eps)
            ratio = tl.where(s == 1, delta, ratio)
            ratio = tl.minimum(tl.maximum(ratio, 0.0), ratio_max)
            budget = budget + step * (ratio - delta)
            budget = tl.minimum(tl.maximum(budget, base), top)
            prev = cur
        kept = tl.where(rigid, base, budget)
        tl.store(b_out + s, kept)
        cap = tl.maximum(tl.minimum(s * seg_blocks, last_cap), 0)
        count = tl.minimum(tl.math.div_rn(kept, block_f).to(tl.int32), cap)
        start = s * seg_size
        dense = (start < threshold_len) | (start + seg_size >= seq_len)
        tl.store(c_out + s, count)
        tl.store(k_out + s, tl.where(dense, -1, count))
        tl.store(dense_ptr + s, dense.to(tl.int8))


@triton.jit
def _ordered_key(x):
    """float32 -> uint32 with the same order (larger float, larger key)."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)


@triton.jit
def _select_kernel(
    logit_ptr,
    count_ptr,
    idx_ptr,
    stride_lh,
    stride_ls,
    stride_ch,
    stride_cs,
    stride_ih,
    stride_is,
    nseg,
    blocks_per_seg,
    width,
    ROWS: tl.constexpr,  # segments per program
    CHUNK: tl.constexpr,  # blocks per step along a row
    SINGLE: tl.constexpr,  # every row fits in one chunk: keep it in registers
):
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    s_ok = s < nseg
    vis = s * blocks_per_seg
    vis_max = (tl.minimum(tl.program_id(0) * ROWS + ROWS, nseg) - 1) * blocks_per_seg
    k = tl.load(count_ptr + h * stride_ch + s * stride_cs, mask=s_ok, other=0)
    rows = logit_ptr + h * stride_lh + s[:, None].to(tl.int64) * stride_ls
    offs = tl.arange(0, CHUNK)[None, :]
    # threshold T = the k-th largest key of each row: the largest T with #(key >= T) >= k, bit by bit; a row
    # is done early once some candidate has exactly k keys at or above it (then T = that candidate).
    # k == 0: T = 0xFFFFFFFF (above every real key) takes nothing; k == vis: T = 0 takes the whole row.
    prefix = tl.where(k == 0, 0xFFFFFFFF, 0).to(tl.uint32)
    done = ((k == 0) | (k >= vis) | (s_ok == 0)).to(tl.int32)
    if SINGLE:
        ok0 = (offs < vis[:, None]) & s_ok[:, None]
        key0 = _ordered_key(tl.load(rows + offs, mask=ok0, other=0.0))
    bit = tl.full([ROWS], 0x80000000, tl.uint32)
    i = 0
    while (i < 32) & (tl.min(done, axis=0) == 0):
        cand = prefix | bit
        if SINGLE:
            cnt = tl.sum((ok0 & (key0 >= cand[:, None])).to(tl.int32), axis=1)
        else:
            cnt = tl.zeros([ROWS], tl.int32)
            for c in range(0, vis_max, CHUNK):
                ok = (c + offs < vis[:, None]) & s_ok[:, None]
                key = _ordered_key(tl.load(rows + c + offs, mask=ok, other=0.0))
                cnt += tl.sum((ok & (key >= cand[:, None])).to(tl.int32), axis=1)
        prefix = tl.where((cnt >= k) & (done == 0), cand, prefix)
        done = done | (cnt == k).to(tl.int32)
        bit = bit >> 1
        i += 1
    # take the keys above T and the first (in index order) of those equal to T: ascending ids, no sort
    if SINGLE:
        n_gt = tl.sum((ok0 & (key0 > prefix[:, None])).to(tl.int32), axis=1)
    else:
        n_gt = tl.zeros([ROWS], tl.int32)
        for c in range(0, vis_max, CHUNK):
            ok = (c + offs < vis[:, None]) & s_ok[:, None]
            key = _ordered_key(tl.load(rows + c + offs, mask=ok, other=0.0))
            n_gt += tl.sum((ok & (key > prefix[:, None])).to(tl.int32), axis=1)
    need_eq = k - n_gt
    outs = idx_ptr + h * stride_ih + s[:, None].to(tl.int64) * stride_is
    taken = tl.zeros([ROWS], tl.int32)
    eq_seen = tl.zeros([ROWS], tl.int32)
    for c in range(0, vis_max, CHUNK):
        ok = (c + offs < vis[:, None]) & s_ok[:, None]
        key = key0 if SINGLE else _ordered_key(tl.load(rows + c + offs, mask=ok, other=0.0))
        eq = (ok & (key == prefix[:, None])).to(tl.int32)
        eq_rank = eq_seen[:, None] + tl.cumsum(eq, axis=1) - eq
        sel = (ok & ((key > prefix[:, None]) | ((eq != 0) & (eq_rank < need_eq[:, None])))).to(tl.int32)
        pos = taken[:, None] + tl.cumsum(sel, axis=1) - sel
        tl.store(outs + pos, c + offs + tl.zeros([ROWS, CHUNK], tl.int32), mask=(sel != 0) & (pos < width))
        taken += tl.sum(sel, axis=1)
        eq_seen += tl.sum(eq, axis=1)


# ----------------------------------------------------------------------------------------------------
# launch


@dataclass(frozen=True)
class ScoringTiles:
    """Tile sizes and launch parameters of the profiling kernels."""

    seg_groups: int  # query segments per `_minmax_kernel` program
    seg_rows: int  # query rows of a segment loaded per step
    blk_groups: int  # key blocks per `_minmax_kernel` program
    reps_warps: int
    block_s: int  # segments per `_logits_kernel` tile
    block_j: int  # blocks per `_logits_kernel` tile
    logits_warps: int
    logits_stages: int
    rows: int  # segments per `_entropy_kernel` program
    chunk: int  # blocks per step along a row in `_entropy_kernel`
    row_warps: int
    select_rows: int  # segments per `_select_kernel` program
    select_chunk: int  # blocks per step in `_select_kernel`; a row within one chunk stays in registers
    select_warps: int


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


MAX_ROW_CHUNK = 4096  # blocks per step of the entropy and selection kernels on GPU; longer rows loop


def row_chunk(nblocks: int) -> int:
    """The GPU row kernels' chunk for rows of `nblocks` blocks. It is a compile-time constant, as is whether
    a row fits one chunk (``nblocks <= row_chunk(nblocks)``): each distinct pair is one more compile."""
    return min(_pow2(max(nblocks, 1)), MAX_ROW_CHUNK)


def scoring_tiles(
    nseg: int, nblocks: int, segment_size: int, block_size: int, dim: int = 128, *, cuda: bool = True
) -> ScoringTiles:
    """GPU: tensor-core tiles of 64 segments x 64 blocks (d <= 128), one row per program for the row kernels.
    Interpreter (CPU): few, large programs, since every operation of every program is a numpy call."""
    block_d = max(_pow2(dim), 16)
    nblk = max(nblocks, 1)
    if cuda:
        return ScoringTiles(
            # measured at 128k (32/8 heads, d=128, bf16): query reps 0.30 ms with 8-row steps (1 GB read),
            # key reps 0.09 ms with 8 blocks a program
            seg_groups=1,
            seg_rows=max(min(_pow2(segment_size), 1024 // block_d), 1),
            blk_groups=max(min(64, 8192 // (block_d * _pow2(block_size))), 1),
            reps_warps=4,
            block_s=64,
            block_j=64 if block_d > 64 else 128,
            logits_warps=4,
            logits_stages=2,
            rows=1,
            chunk=row_chunk(nblk),
            row_warps=8,
            select_rows=1,
            select_chunk=row_chunk(nblk),
            select_warps=8,
        )
    return ScoringTiles(
        seg_groups=_pow2(min(nseg, 16)),
        seg_rows=_pow2(segment_size),
        blk_groups=_pow2(min(nblk, 256)),
        reps_warps=4,
        block_s=max(_pow2(min(nseg, 64)), 16),
        block_j=max(_pow2(min(nblk, 256)), 16),
        logits_warps=4,
        logits_stages=1,
        rows=_pow2(min(nseg, 64)),
        chunk=_pow2(min(nblk, 4096)),
        row_warps=4,
        select_rows=_pow2(min(nseg, 64)),
        select_chunk=_pow2(min(nblk, 4096)),
        select_warps=4,
    )


_INTERPRETED: dict[str, Any] = {}


def interpreter_ready() -> bool:
    """True when Triton kernels can run on CPU tensors: TRITON_INTERPRET=1 was set before triton was imported
    (triton.language's own helpers, tl.max and the like, are bound to the interpreter at that moment)."""
    return not isinstance(tl.max, triton.runtime.JITFunction)


def _kernel(fn: Any, device: torch.device) -> Any:
    """The kernel for `device`: as imported for CUDA tensors, the Triton interpreter for CPU tensors."""
    if device.type == "cuda":
        return fn
    if not interpreter_ready():
        raise RuntimeError(
            "the Triton profiling kernels run on CPU tensors only under the Triton interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported, or use backend='torch'"
        )
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(fn, InterpretedFunction):
        return fn
    # this module was imported before TRITON_INTERPRET was set, triton after: interpret a copy
    name = fn.fn.__name__
    if name not in _INTERPRETED:
        _INTERPRETED[name] = InterpretedFunction(fn.fn)
    return _INTERPRETED[name]


def _use_triton(device: torch.device, backend: Backend) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return device.type == "cuda" or interpreter_ready()


def _contiguous_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _minmax(
    x: torch.Tensor, group: int, n_groups: int, n_rows: int, groups: int, rows: int, warps: int
) -> tuple[Any, Any]:
    heads, _, dim = x.shape
    out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    xmax = torch.empty(heads, n_groups, dim, dtype=out_dtype, device=x.device)
    xmin = torch.empty_like(xmax)
    if n_groups == 0:
        return xmax, xmin
    rows = min(rows, _pow2(group))
    grid = (triton.cdiv(n_groups, groups), heads)
    _kernel(_minmax_kernel, x.device)[grid](
        x, xmax, xmin, x.stride(0), x.stride(1), xmax.stride(0), xmax.stride(1), n_rows, n_groups, dim,
        GROUP=group, GROUPS=groups, ROWS=rows, BLOCK_D=_pow2(dim), num_warps=warps,
    )  # fmt: skip
    return xmax, xmin


def _block_scores_triton(
    q: torch.Tensor, k: torch.Tensor, segment_size: int, block_size: int, tiles: ScoringTiles | None
) -> BlockScores:
    hq, n, dim = q.shape
    hkv = k.shape[0]
    nseg = num_segments(n, segment_size)
    nblk = num_blocks(n, segment_size, block_size)
    dev = q.device
    t = tiles or scoring_tiles(nseg, nblk, segment_size, block_size, dim, cuda=dev.type == "cuda")
    q, k = _contiguous_last(q), _contiguous_last(k)
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    qmax, qmin = _minmax(q, segment_size, nseg, n, t.seg_groups, t.seg_rows, t.reps_warps)
    kmax, kmin = _minmax(
        k, block_size, nblk, nblk * block_size, t.blk_groups, _pow2(block_size), t.reps_warps
    )
    logits = torch.empty(hkv, nseg, nblk, dtype=torch.float32, device=dev)
    entropy = torch.empty(hkv, nseg, dtype=torch.float32, device=dev)
    row_max = torch.empty_like(entropy)
    row_sum = torch.empty_like(entropy)
    bps = segment_size // block_size
    if nblk > 0:
        grid = (triton.cdiv(nseg, t.block_s), triton.cdiv(nblk, t.block_j), hkv)
        _kernel(_logits_kernel, dev)[grid](
            qmax, qmin, kmax, kmin, logits,
            qmax.stride(0), qmax.stride(1), kmax.stride(0), kmax.stride(1),
            logits.stride(0), logits.stride(1),
            nseg, nblk, dim, bps,
            G=hq // hkv, BLOCK_S=t.block_s, BLOCK_J=t.block_j, BLOCK_D=max(_pow2(dim), 16),
            DOT_PRECISION="ieee" if qmax.dtype == torch.float32 else "tf32",
            num_warps=t.logits_warps, num_stages=t.logits_stages,
        )  # fmt: skip
    _kernel(_entropy_kernel, dev)[(triton.cdiv(nseg, t.rows), hkv)](
        logits, entropy, row_max, row_sum, logits.stride(0), logits.stride(1), entropy.stride(0),
        nseg, nblk, bps, ENTROPY_EPS, ROWS=t.rows, CHUNK=t.chunk, num_warps=t.row_warps,
    )  # fmt: skip
    if nblk == 0:
        entropy.zero_()
    return BlockScores(logits, row_max, row_sum, entropy, segment_size, block_size)


# ----------------------------------------------------------------------------------------------------
# public entry points


def block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    segment_size: int,
    block_size: int,
    *,
    backend: Backend = "auto",
    tiles: ScoringTiles | None = None,
) -> BlockScores:
    """Block logits (GQA mean, visible entries), softmax statistics and entropy of one layer.

    ``q [Hq, N, d]``, ``k [Hkv, N, d]`` post-RoPE (KV heads not repeated). float32 inputs are scored exactly
    (IEEE dots); bf16/fp16 inputs use tensor-core dots with float32 accumulation.
    """
    check_qk(q, k, segment_size, block_size)
    if not _use_triton(q.device, backend):
        return block_scores_ref(q, k, segment_size, block_size)
    return _block_scores_triton(q, k, segment_size, block_size, tiles)


def block_counts(
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
    backend: Backend = "auto",
) -> BlockCounts:
    """Rigid heads, budgets, block counts and dense segments in one launch; see `block_counts_ref`."""
    kw = dict(seq_len=seq_len, segment_size=segment_size, block_size=block_size, threshold_len=threshold_len)
    if not _use_triton(entropy.device, backend):
        return block_counts_ref(
            entropy, **kw, entropy_threshold=entropy_threshold, base_budget=base_budget, alpha=alpha,
            delta=delta, fixed_budget=fixed_budget,
        )  # fmt: skip
    entropy = entropy.float().contiguous()
    hkv, nseg = entropy.shape
    dev = entropy.device
    budgets = torch.empty_like(entropy)
    counts = torch.empty(hkv, nseg, dtype=torch.int32, device=dev)
    kernel_counts = torch.empty_like(counts)
    rigid = torch.empty(hkv, dtype=torch.int8, device=dev)
    dense = torch.empty(nseg, dtype=torch.int8, device=dev)
    base = float(base_budget if fixed_budget is None else fixed_budget)
    last_cap = num_blocks(seq_len, segment_size, block_size) - ((seq_len % segment_size) // block_size + 1)
    _kernel(_counts_kernel, dev)[(hkv,)](
        entropy, budgets, counts, kernel_counts, rigid, dense,
        entropy.stride(0), budgets.stride(0), counts.stride(0),
        nseg, seq_len, segment_size, segment_size // block_size, last_cap, threshold_len,
        base, float(3 * base_budget), float(alpha * base_budget), float(delta), float(1.0 + delta), RATIO_EPS,
        float(entropy_threshold), float(block_size),
        DYNAMIC=fixed_budget is None, CHUNK=128, num_warps=1,
        enable_fp_fusion=False,  # no FMA: the same float32 roundings as the reference, so the same counts
    )  # fmt: skip
    return BlockCounts(rigid.view(torch.bool), budgets, counts, kernel_counts, dense.view(torch.bool))


def select_blocks(
    scores: torch.Tensor,
    counts: torch.Tensor,
    segment_size: int,
    block_size: int,
    max_count: int,
    *,
    backend: Backend = "auto",
    tiles: ScoringTiles | None = None,
) -> torch.Tensor:
    """int32 ``[Hkv, nseg, max(max_count, 1)]``: the ``counts[h, s]`` visible blocks of highest score per row,
    ascending, then -1. ``scores`` are logits (or probabilities); ``counts <= min(max_count, s * S / b)``.
    """
    if not _use_triton(scores.device, backend):
        return select_blocks_ref(scores, counts, segment_size, block_size, max_count)
    hkv, nseg, nblk = scores.shape
    out = torch.full((hkv, nseg, max(max_count, 1)), -1, dtype=torch.int32, device=scores.device)
    if max_count == 0 or nblk == 0:
        return out
    scores = _contiguous_last(scores.float())
    counts = counts.to(torch.int32)
    t = tiles or scoring_tiles(nseg, nblk, segment_size, block_size, cuda=scores.device.type == "cuda")
    _kernel(_select_kernel, scores.device)[(triton.cdiv(nseg, t.select_rows), hkv)](
        scores, counts, out, scores.stride(0), scores.stride(1), counts.stride(0), counts.stride(1),
        out.stride(0), out.stride(1), nseg, segment_size // block_size, out.shape[-1],
        ROWS=t.select_rows, CHUNK=t.select_chunk, SINGLE=nblk <= t.select_chunk, num_warps=t.select_warps,
    )  # fmt: skip
    return out
