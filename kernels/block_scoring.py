"""Entropy profiling for segment-wise sparse prefill, in Triton (`block_scoring_ref.py` is the torch oracle).

One layer of one sequence in four launches, none looping over segments in Python and none sorting:

1. `_minmax_kernel` (twice): min/max representations of the query segments ``[Hq, nseg, d]`` and of the key
   blocks ``[Hkv, nblocks, d]``, in the inputs' dtype (exact: min/max only pick elements). This reads q and k
   once and is the memory-bound part (1.3 GB at 128k tokens for 32/8 heads, d=128, bf16).
2. `_logits_kernel`: a tile of segments x a tile of blocks per program, four ``tl.dot`` per query head
   (``qmax|qmin x kmax|kmin``, float32 accumulation), the per-head max, the GQA mean; tiles above the causal
   diagonal exit at once. Writes the visible block logits once, float32 ``[Hkv, nseg, nblocks]``.
3. `_entropy_kernel`: one program per (segment, KV head) row: max, sum of ``exp(x - max)``, then
   ``-sum p log(p + 1e-9)`` with ``p = exp(x - max) / sum`` (three passes over the row, from L2); for the
   `spread` budget rule also the entropy at a logit scale ``t`` in the same passes (`spread_entropy_ref`).

Budgets, counts and the top-k selection that follow are `block_selection`'s (two more launches). Layout and
result types: `block_layout`; tiles: `tiling.scoring_tiles`; ``backend``: `backend.runs_triton` (Triton for
CUDA tensors by default, the reference elsewhere; ``"triton"`` forces the kernels, interpreted on CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from entropyinfer.kernels.backend import Backend, jit_kernel, runs_triton
from entropyinfer.kernels.block_layout import BlockScores, check_chunk_qk, check_qk, num_blocks, num_segments
from entropyinfer.kernels.block_scoring_ref import ENTROPY_EPS, block_scores_ref
from entropyinfer.kernels.tiling import ScoringTiles, pow2, scoring_tiles

__all__ = ["LogitReduce", "block_scores"]

# the GQA group's block logits from a rank's partial ones (tensor parallelism with replicated KV heads):
# float32 [Hkv, nseg, nblocks] -> the same, in place (`shard/parallel/group.py: mean_over_replicas`)
LogitReduce = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------
# kernels


@triton.jit(do_not_specialize=["n_groups"])  # a one-segment chunk compiles nothing new
def _minmax_kernel(
    x_ptr: tl.tensor,
    max_ptr: tl.tensor,
    min_ptr: tl.tensor,
    stride_xh: tl.tensor,
    stride_xn: tl.tensor,
    stride_oh: tl.tensor,
    stride_og: tl.tensor,
    n_rows: tl.tensor,
    n_groups: tl.tensor,
    dim: tl.tensor,
    GROUP: tl.constexpr,  # rows per group: S for query segments, b for key blocks
    GROUPS: tl.constexpr,  # groups per program
    ROWS: tl.constexpr,  # rows of each group loaded per step
    BLOCK_D: tl.constexpr,
) -> None:
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


@triton.jit(do_not_specialize=["seg_off", "nseg"])  # one compile for every chunk offset and size
def _logits_kernel(
    qmax_ptr: tl.tensor,
    qmin_ptr: tl.tensor,
    kmax_ptr: tl.tensor,
    kmin_ptr: tl.tensor,
    logit_ptr: tl.tensor,
    stride_qh: tl.tensor,
    stride_qs: tl.tensor,
    stride_kh: tl.tensor,
    stride_kj: tl.tensor,
    stride_lh: tl.tensor,
    stride_ls: tl.tensor,
    nseg: tl.tensor,
    nblocks: tl.tensor,
    dim: tl.tensor,
    blocks_per_seg: tl.tensor,
    seg_off: tl.tensor,  # absolute index of segment row 0 (a prefill chunk's first segment)
    G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    s0 = tl.program_id(0) * BLOCK_S
    j0 = tl.program_id(1) * BLOCK_J
    h = tl.program_id(2).to(tl.int64)
    # the last segment of the tile sees blocks j < s_last * S / b: skip tiles above the causal diagonal
    s_last = tl.minimum(s0 + BLOCK_S, nseg) - 1 + seg_off
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
        visible = (s[:, None] < nseg) & (j[None, :] < (s[:, None] + seg_off) * blocks_per_seg)
        l_off = h * stride_lh + s[:, None].to(tl.int64) * stride_ls + j[None, :]
        tl.store(logit_ptr + l_off, acc, mask=visible)


# one compile for every chunk offset and size (a one-segment chunk's [Hkv, 1] rows have stride 1, which Triton
# would compile apart: 0.4 s in the first such chunk of an H200 run, benchmarks/stall_trace.py)
@triton.jit(do_not_specialize=["seg_off", "nseg", "stride_eh"])
def _entropy_kernel(
    logit_ptr: tl.tensor,
    ent_ptr: tl.tensor,
    rmax_ptr: tl.tensor,
    rsum_ptr: tl.tensor,
    spread_ptr: tl.tensor,
    stride_lh: tl.tensor,
    stride_ls: tl.tensor,
    stride_eh: tl.tensor,
    nseg: tl.tensor,
    nblocks: tl.tensor,
    blocks_per_seg: tl.tensor,
    seg_off: tl.tensor,
    eps: tl.tensor,
    spread_scale: tl.tensor,
    ROWS: tl.constexpr,  # segments per program
    CHUNK: tl.constexpr,  # blocks per step along a row
    SPREAD: tl.constexpr,  # also the entropy at logit scale spread_scale (the `spread` budget rule)
) -> None:
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    s_ok = s < nseg
    vis = (s + seg_off) * blocks_per_seg  # [ROWS] visible blocks of each segment
    vis_max = (tl.minimum(tl.program_id(0) * ROWS + ROWS, nseg) - 1 + seg_off) * blocks_per_seg
    rows = logit_ptr + h * stride_lh + s[:, None].to(tl.int64) * stride_ls
    offs = tl.arange(0, CHUNK)[None, :]
    m_acc = tl.full([ROWS, CHUNK], float("-inf"), tl.float32)
    for c in range(0, vis_max, CHUNK):
        x = tl.load(rows + c + offs, mask=(c + offs < vis[:, None]) & s_ok[:, None], other=float("-inf"))
        m_acc = tl.maximum(m_acc, x)
    m = tl.max(m_acc, axis=1)
    m = tl.where(vis > 0, m, 0.0)
    z_acc = tl.zeros([ROWS, CHUNK], tl.float32)
    zt_acc = tl.zeros([ROWS, CHUNK], tl.float32)
    for c in range(0, vis_max, CHUNK):
        ok = (c + offs < vis[:, None]) & s_ok[:, None]
        x = tl.load(rows + c + offs, mask=ok, other=0.0)
        z_acc += tl.where(ok, tl.exp(x - m[:, None]), 0.0)
        if SPREAD:
            zt_acc += tl.where(ok, tl.exp((x - m[:, None]) * spread_scale), 0.0)
    z = tl.sum(z_acc, axis=1)
    z = tl.where(vis > 0, z, 1.0)
    e_acc = tl.zeros([ROWS, CHUNK], tl.float32)
    ey_acc = tl.zeros([ROWS, CHUNK], tl.float32)
    for c in range(0, vis_max, CHUNK):
        ok = (c + offs < vis[:, None]) & s_ok[:, None]
        x = tl.load(rows + c + offs, mask=ok, other=0.0)
        p = tl.math.div_rn(tl.exp(x - m[:, None]), tl.broadcast_to(z[:, None], [ROWS, CHUNK]))
        e_acc += tl.where(ok, p * tl.log(p + eps), 0.0)
        if SPREAD:
            y = (x - m[:, None]) * spread_scale
            ey_acc += tl.where(ok, tl.exp(y) * y, 0.0)
    ent = -tl.sum(e_acc, axis=1)
    if SPREAD:
        # H = log z - sum(exp(y) y) / z, y = t (x - max), z = sum exp(y): -sum p log p, no log per block
        zt = tl.sum(zt_acc, axis=1)
        zt = tl.where(zt > 0, zt, 1.0)
        spread = tl.log(zt) - tl.math.div_rn(tl.sum(ey_acc, axis=1), zt)
        tl.store(spread_ptr + h * stride_eh + s, tl.where(vis > 0, spread, 0.0), mask=s_ok)
    # nothing visible (segment 0): the reference's uniform 1/nblocks, entropy ln(nblocks); unused downstream
    ent = tl.where(vis > 0, ent, tl.log(tl.maximum(nblocks, 1).to(tl.float32)))
    out = h * stride_eh + s
    tl.store(ent_ptr + out, ent, mask=s_ok)
    tl.store(rmax_ptr + out, m, mask=s_ok)
    tl.store(rsum_ptr + out, z, mask=s_ok)


# ----------------------------------------------------------------------------------------------------
# launch


def _contiguous_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _minmax(
    x: torch.Tensor, group: int, n_groups: int, n_rows: int, groups: int, rows: int, warps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    heads, _, dim = x.shape
    out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    xmax = torch.empty(heads, n_groups, dim, dtype=out_dtype, device=x.device)
    xmin = torch.empty_like(xmax)
    if n_groups == 0:
        return xmax, xmin
    rows = min(rows, pow2(group))
    grid = (triton.cdiv(n_groups, groups), heads)
    jit_kernel(_minmax_kernel, x.device)[grid](
        x, xmax, xmin, x.stride(0), x.stride(1), xmax.stride(0), xmax.stride(1), n_rows, n_groups, dim,
        GROUP=group, GROUPS=groups, ROWS=rows, BLOCK_D=pow2(dim), num_warps=warps,
    )  # fmt: skip
    return xmax, xmin


def _block_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    segment_size: int,
    block_size: int,
    tiles: ScoringTiles | None,
    spread_logit_scale: float | None,
    segment_offset: int = 0,
    num_key_blocks: int | None = None,
    logit_reduce: LogitReduce | None = None,
    key_reps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> BlockScores:
    hq, n, dim = q.shape
    hkv = k.shape[0]
    nseg = num_segments(n, segment_size)
    # blocks the chunk's last segment sees (scored), and the logits' width (the whole prompt's for a chunk)
    nblk = (segment_offset + nseg - 1) * segment_size // block_size
    width = nblk if num_key_blocks is None else num_key_blocks
    dev = q.device
    t = tiles or scoring_tiles(nseg, nblk, segment_size, block_size, dim, cuda=dev.type == "cuda")
    q = _contiguous_last(q)
    qmax, qmin = _minmax(q, segment_size, nseg, n, t.seg_groups, t.seg_rows, t.reps_warps)
    if key_reps is None:
        k = _contiguous_last(k)
        if k.dtype != q.dtype:
            k = k.to(q.dtype)
        kmax, kmin = _minmax(
            k, block_size, nblk, nblk * block_size, t.blk_groups, pow2(block_size), t.reps_warps
        )
    else:  # read from the pages (`paged_block_reps`): the first nblk blocks, kmin read with kmax's strides
        kmax, kmin = (r[:, :nblk].to(q.dtype).contiguous() for r in key_reps)
    logits = torch.empty(hkv, nseg, width, dtype=torch.float32, device=dev)
    entropy = torch.empty(hkv, nseg, dtype=torch.float32, device=dev)
    row_max = torch.empty_like(entropy)
    row_sum = torch.empty_like(entropy)
    spread = None if spread_logit_scale is None else torch.empty_like(entropy)
    bps = segment_size // block_size
    if nblk > 0:
        grid = (triton.cdiv(nseg, t.block_s), triton.cdiv(nblk, t.block_j), hkv)
        jit_kernel(_logits_kernel, dev)[grid](
            qmax, qmin, kmax, kmin, logits,
            qmax.stride(0), qmax.stride(1), kmax.stride(0), kmax.stride(1),
            logits.stride(0), logits.stride(1),
            nseg, nblk, dim, bps, segment_offset,
            G=hq // hkv, BLOCK_S=t.block_s, BLOCK_J=t.block_j, BLOCK_D=max(pow2(dim), 16),
            DOT_PRECISION="ieee" if qmax.dtype == torch.float32 else "tf32",
            num_warps=t.logits_warps, num_stages=t.logits_stages,
        )  # fmt: skip
    if logit_reduce is not None:  # every rank of the call, even with nothing visible
        logits = logit_reduce(logits)
    jit_kernel(_entropy_kernel, dev)[(triton.cdiv(nseg, t.rows), hkv)](
        logits, entropy, row_max, row_sum, entropy if spread is None else spread,
        logits.stride(0), logits.stride(1), entropy.stride(0),
        nseg, width, bps, segment_offset, ENTROPY_EPS, float(spread_logit_scale or 0.0),
        ROWS=t.rows, CHUNK=t.chunk, SPREAD=spread is not None, num_warps=t.row_warps,
    )  # fmt: skip
    if width == 0:
        entropy.zero_()
        if spread is not None:
            spread.zero_()
    return BlockScores(logits, row_max, row_sum, entropy, segment_size, block_size, spread, segment_offset)


def _check_key_reps(
    reps: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, hkv: int, s_len: int, b: int, seg_off: int
) -> None:
    """``(kmax, kmin)`` must each be ``[Hkv, >= the blocks the chunk's last segment sees, d]`` on q's device
    (the kernels read every one of those rows)."""
    need = num_blocks(seg_off * s_len + q.shape[1], s_len, b)
    for r in reps:
        if (
            r.dim() != 3
            or r.shape[0] != hkv
            or r.shape[1] < need
            or r.shape[2] != q.shape[2]
            or r.device != q.device
        ):
            raise ValueError(
                f"key_reps must be [Hkv={hkv}, >={need}, d={q.shape[2]}] on {q.device}; got {tuple(r.shape)} "
                f"on {r.device}"
            )


# ----------------------------------------------------------------------------------------------------
# public entry point


def block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    segment_size: int,
    block_size: int,
    *,
    backend: Backend = "auto",
    tiles: ScoringTiles | None = None,
    spread_logit_scale: float | None = None,
    segment_offset: int = 0,
    num_key_blocks: int | None = None,
    row_invariant: bool = False,
    logit_reduce: LogitReduce | None = None,
    key_reps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> BlockScores:
    """Block logits (GQA mean, visible entries), softmax statistics and entropy of one layer; with
    `spread_logit_scale` (>= 0), also the entropy at that logit scale (`BlockScores.spread`, in the same
    launch).

    ``q [Hq, N, d]``, ``k [Hkv, N, d]`` post-RoPE (KV heads not repeated). float32 inputs are scored exactly
    (IEEE dots); bf16/fp16 inputs use tensor-core dots with float32 accumulation.

    A prefill chunk: ``segment_offset`` (the chunk's first segment; q holds positions from
    ``segment_offset * S``), ``k [Hkv, Nk, d]`` the keys from position 0 (at least up to the chunk's last
    segment), ``num_key_blocks`` the logits' width (the whole prompt's ``num_blocks``, so each row is reduced
    as in a one-shot profiling). ``row_invariant`` (the torch path; the kernels' tiles do not depend on the
    row count when `tiles` is given) makes a segment's numbers independent of the other segments scored with
    it (`block_scoring_ref.chunk_block_logits_ref`).

    ``logit_reduce``: applied to the logits before the softmax statistics and entropy (a tensor-parallel
    rank holding part of a GQA group's query heads makes them the whole group's mean, `LogitReduce`).

    ``key_reps``: the key blocks' ``(kmax, kmin) [Hkv, >= visible blocks, d]`` computed elsewhere (a chunk
    over paged KV: `paged_block_reps`); ``k`` is then only checked for its shape (a zero-stride view will do).
    """
    chunked = segment_offset > 0 or num_key_blocks is not None or key_reps is not None
    if chunked:
        nblk_all = num_key_blocks
        if nblk_all is None:
            nblk_all = (
                (segment_offset + num_segments(q.shape[1], segment_size) - 1) * segment_size // block_size
            )
        check_chunk_qk(q, k, segment_size, block_size, segment_offset, nblk_all)
    else:
        check_qk(q, k, segment_size, block_size)
    if spread_logit_scale is not None and not spread_logit_scale >= 0:
        raise ValueError(f"spread_logit_scale must be >= 0, got {spread_logit_scale}")
    if key_reps is not None:
        _check_key_reps(key_reps, q, k.shape[0], segment_size, block_size, segment_offset)
    if not runs_triton(q.device, backend):
        return block_scores_ref(
            q, k, segment_size, block_size, spread_logit_scale, segment_offset=segment_offset,
            num_key_blocks=num_key_blocks, row_invariant=row_invariant, logit_reduce=logit_reduce,
            key_reps=key_reps,
        )  # fmt: skip
    return _block_scores_triton(
        q, k, segment_size, block_size, tiles, spread_logit_scale, segment_offset, num_key_blocks,
        logit_reduce, key_reps,
    )  # fmt: skip
