"""Block counts and top-k block selection for segment-wise sparse prefill, in Triton (`block_selection_ref.py`
is the torch oracle).

They follow the profiling (`block_scoring`), two launches for one layer, with no torch glue in between:

1. `_counts_kernel`: one program per KV head: the rigid test, the budget recurrence (a sequential float32
   loop over segments, or one fixed budget, or the causal spread rule with its rigid-so-far test), the capped
   block counts and the dense-segment marks.
2. `_select_kernel`: a tile of (segment) rows per program: the ``count``-th largest logit of each row by a
   bitwise radix select on order-preserving float bits (32 counting steps, over a row held in registers when
   it fits one chunk), then a prefix-sum compaction that writes the selected block ids in ascending order.
   Selection by logit equals selection by probability (softmax is monotone).

Layout and result types: `block_layout`; tiles: `tiling.select_tiles`; ``backend``: `backend.runs_triton`
(Triton for CUDA tensors by default, the reference elsewhere; ``"triton"`` forces the kernels, interpreted on
CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entropyinfer.kernels.backend import Backend, jit_kernel, runs_triton
from entropyinfer.kernels.block_layout import BlockCounts, last_count_cap
from entropyinfer.kernels.block_selection_ref import (
    RATIO_EPS,
    SpreadRule,
    block_counts_ref,
    select_blocks_ref,
    spread_counts_ref,
)
from entropyinfer.kernels.tiling import SelectTiles, select_tiles

__all__ = ["block_counts", "select_blocks"]


# ----------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _counts_kernel(
    ent_ptr: tl.tensor,
    budget_ptr: tl.tensor,
    counts_ptr: tl.tensor,
    kcounts_ptr: tl.tensor,
    rigid_ptr: tl.tensor,
    dense_ptr: tl.tensor,
    stride_eh: tl.tensor,
    stride_bh: tl.tensor,
    stride_ch: tl.tensor,
    nseg: tl.tensor,
    seq_len: tl.tensor,
    seg_size: tl.tensor,
    seg_blocks: tl.tensor,
    last_cap: tl.tensor,
    threshold_len: tl.tensor,
    base: tl.tensor,
    top: tl.tensor,
    step: tl.tensor,
    delta: tl.tensor,
    ratio_max: tl.tensor,
    eps: tl.tensor,
    e_t: tl.tensor,
    block_f: tl.tensor,
    power: tl.tensor,
    spread_lo: tl.tensor,
    spread_hi: tl.tensor,
    rigid_budget: tl.tensor,
    MODE: tl.constexpr,  # 0: one fixed budget; 1: the reference recurrence; 2: the spread rule
    CAUSAL: tl.constexpr,  # MODE 1: B0 only while the head is rigid so far (mode `causal`)
    CHUNK: tl.constexpr,
) -> None:
    h = tl.program_id(0).to(tl.int64)
    row = ent_ptr + h * stride_eh
    if MODE == 2 or CAUSAL:
        rigid = nseg >= 2  # rigid so far: updated segment by segment below (causal)
    else:
        not_below = 0  # segments >= 1 whose entropy is not below e_t (NaN counts as not below)
        for s0 in range(0, nseg, CHUNK):  # a fixed chunk, so no length-dependent compile
            offs = s0 + tl.arange(0, CHUNK)
            later = (offs >= 1) & (offs < nseg)
            ent = tl.load(row + offs, mask=later, other=0.0)
            not_below += tl.sum(tl.where(later, tl.where(ent < e_t, 0, 1), 0), axis=0)
        rigid = (not_below == 0) & (nseg >= 2)
    b_out = budget_ptr + h * stride_bh
    c_out = counts_ptr + h * stride_ch
    k_out = kcounts_ptr + h * stride_ch
    budget = base + 0.0  # float32 scalar, carried through the loop
    if MODE == 2:
        budget = tl.minimum(tl.maximum(budget, spread_lo), spread_hi)  # segment 0: unused
    dense = (threshold_len > 0) | (seg_size >= seq_len)
    tl.store(b_out, budget)
    tl.store(c_out, 0)
    tl.store(k_out, tl.where(dense, -1, 0))
    tl.store(dense_ptr, dense.to(tl.int8))  # every program writes the same mask
    prev = tl.load(row)
    for s in range(1, nseg):
        if MODE == 1:
            cur = tl.load(row + s)
            ratio = tl.math.div_rn(cur - prev, prev + eps)
            ratio = tl.where(s == 1, delta, ratio)
            ratio = tl.minimum(tl.maximum(ratio, 0.0), ratio_max)
            budget = budget + step * (ratio - delta)
            budget = tl.minimum(tl.maximum(budget, base), top)
            prev = cur
            if CAUSAL:
                rigid = rigid & (cur < e_t)
        if MODE == 2:
            cur = tl.load(row + s)
            log_v = tl.log((s * seg_blocks).to(tl.float32))
            rigid = rigid & (cur < e_t * log_v)  # normalised entropy Hs / log V below the threshold
            level = power * cur + (1.0 - power) * log_v
            tokens = tl.exp(level) * base
            tokens = tl.where(tokens == tokens, tokens, spread_lo)  # NaN entropy: the floor
            budget = tl.minimum(tl.maximum(tokens, spread_lo), spread_hi)
            kept = tl.where(rigid, rigid_budget, budget)
        else:
            kept = tl.where(rigid, base, budget)
        tl.store(b_out + s, kept)
        cap = tl.maximum(tl.minimum(s * seg_blocks, last_cap), 0)
        count = tl.minimum(tl.math.div_rn(kept, block_f).to(tl.int32), cap)
        start = s * seg_size
        dense = (start < threshold_len) | (start + seg_size >= seq_len)
        tl.store(c_out + s, count)
        tl.store(k_out + s, tl.where(dense, -1, count))
        tl.store(dense_ptr + s, dense.to(tl.int8))
    tl.store(rigid_ptr + h, rigid.to(tl.int8))


@triton.jit
def _ordered_key(x: tl.tensor) -> tl.tensor:
    """float32 -> uint32 with the same order (larger float, larger key)."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)


# one compile for every chunk offset and size (with the counts' row stride: 1 in a one-segment chunk)
@triton.jit(do_not_specialize=["seg_off", "nseg", "stride_ch"])
def _select_kernel(
    logit_ptr: tl.tensor,
    count_ptr: tl.tensor,
    idx_ptr: tl.tensor,
    stride_lh: tl.tensor,
    stride_ls: tl.tensor,
    stride_ch: tl.tensor,
    stride_cs: tl.tensor,
    stride_ih: tl.tensor,
    stride_is: tl.tensor,
    nseg: tl.tensor,
    blocks_per_seg: tl.tensor,
    width: tl.tensor,
    seg_off: tl.tensor,  # absolute index of segment row 0 (a prefill chunk's first segment)
    ROWS: tl.constexpr,  # segments per program
    CHUNK: tl.constexpr,  # blocks per step along a row
    SINGLE: tl.constexpr,  # every row fits in one chunk: keep it in registers
) -> None:
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    s_ok = s < nseg
    vis = (s + seg_off) * blocks_per_seg
    vis_max = (tl.minimum(tl.program_id(0) * ROWS + ROWS, nseg) - 1 + seg_off) * blocks_per_seg
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
# public entry points


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
    spread_rule: SpreadRule | None = None,
    causal: bool = False,
    backend: Backend = "auto",
) -> BlockCounts:
    """Rigid heads, budgets, block counts and dense segments in one launch; see `block_counts_ref`.

    ``causal`` (the entropy recurrence only): the rigid-so-far test of mode `causal` (`rigid_so_far_ref`).

    With `spread_rule`, `entropy` is the spread entropy (`BlockScores.spread`) and the counts are the spread
    rule's (`spread_counts_ref`: causal, rigid so far: ``Hs / log V < spread_rule.rigid_entropy``);
    `entropy_threshold`, `base_budget`, `alpha`, `delta` and `fixed_budget` are then unused."""
    kw = dict(seq_len=seq_len, segment_size=segment_size, block_size=block_size, threshold_len=threshold_len)
    if spread_rule is not None and not runs_triton(entropy.device, backend):
        return spread_counts_ref(entropy, **kw, rule=spread_rule)
    if not runs_triton(entropy.device, backend):
        return block_counts_ref(
            entropy, **kw, entropy_threshold=entropy_threshold, base_budget=base_budget, alpha=alpha,
            delta=delta, fixed_budget=fixed_budget, causal=causal,
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
    mode = 0 if fixed_budget is not None else 1
    r = spread_rule or SpreadRule(1.0, 1.0, 0.0, 0.0, 0.0, 0.0)  # unused unless spread_rule is given
    if spread_rule is not None:
        mode, base, entropy_threshold = 2, float(r.tokens_per_block), float(r.rigid_entropy)
    last_cap = last_count_cap(seq_len, segment_size, block_size)
    jit_kernel(_counts_kernel, dev)[(hkv,)](
        entropy, budgets, counts, kernel_counts, rigid, dense,
        entropy.stride(0), budgets.stride(0), counts.stride(0),
        nseg, seq_len, segment_size, segment_size // block_size, last_cap, threshold_len,
        base, float(3 * base_budget), float(alpha * base_budget), float(delta), float(1.0 + delta), RATIO_EPS,
        float(entropy_threshold), float(block_size),
        float(r.power), float(r.min_budget), float(r.max_budget), float(r.rigid_budget),
        MODE=mode, CAUSAL=causal and mode == 1, CHUNK=128, num_warps=1,
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
    tiles: SelectTiles | None = None,
    segment_offset: int = 0,
) -> torch.Tensor:
    """int32 ``[Hkv, nseg, max(max_count, 1)]``: the ``counts[h, s]`` visible blocks of highest score per row,
    ascending, then -1. ``scores`` are logits (or probabilities); ``counts <= min(max_count, s * S / b)``.
    Row ``i`` is segment ``segment_offset + i`` (a prefill chunk's rows; `BlockScores.segment_offset`).
    """
    if not runs_triton(scores.device, backend):
        return select_blocks_ref(scores, counts, segment_size, block_size, max_count, segment_offset)
    hkv, nseg, nblk = scores.shape
    out = torch.full((hkv, nseg, max(max_count, 1)), -1, dtype=torch.int32, device=scores.device)
    if max_count == 0 or nblk == 0:
        return out
    scores = scores.float()
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    counts = counts.to(torch.int32)
    t = tiles or select_tiles(nseg, nblk, cuda=scores.device.type == "cuda")
    jit_kernel(_select_kernel, scores.device)[(triton.cdiv(nseg, t.rows), hkv)](
        scores, counts, out, scores.stride(0), scores.stride(1), counts.stride(0), counts.stride(1),
        out.stride(0), out.stride(1), nseg, segment_size // block_size, out.shape[-1], segment_offset,
        ROWS=t.rows, CHUNK=t.chunk, SINGLE=nblk <= t.chunk, num_warps=t.warps,
    )  # fmt: skip
    return out
