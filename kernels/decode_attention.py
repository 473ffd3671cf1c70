"""Split-K (flash-decoding) decode attention over per-KV-head caches, GQA-aware, CUDA-graph capturable.

Layout
------
- ``q``: ``[B, Hq, d]``, one new token per sequence (last dim contiguous).
- ``k_cache`` / ``v_cache``: ``[B, Hkv, L_max, d]``; any strides (views of a bigger preallocated cache are
  fine) as long as the last dim is contiguous. The strides go to the kernel, nothing is copied.
- ``lengths``: int32 ``[B, Hkv]`` on the device: valid keys per (sequence, KV head), keys ``0..len-1``.
  Read inside the kernel only, so one captured CUDA graph serves any lengths. Clamped to ``[0, L_max]``.
- GQA: ``Hq = G * Hkv``, query head ``h`` reads KV head ``h // G``.
- Output ``[B, Hq, d]`` in ``q``'s dtype (or written into ``out``); all accumulation is float32.

Algorithm
---------
Stage 1, grid ``(B * Hkv, num_splits)``: each program takes one (sequence, KV head) and one split of that
head's *own* key range: the split size is computed in the kernel from the head's length,
``ceil(ceil(len / num_splits) / BLOCK_N) * BLOCK_N``, so short or compressed heads still spread their work
over all splits, and splits past the end run no iteration. The program loads the ``G`` query heads of the
group once as a ``[BLOCK_G, d]`` block, then streams ``BLOCK_N``-key tiles of K and V, each loaded once for
all ``G`` heads: ``S = q K^T`` and ``P V`` are ``tl.dot``s, with ``exp2`` (``scale * log2(e)`` folded into
the scores) and the usual online softmax (running max ``m``, running sum ``l``, float32 accumulator). It
writes its normalised partial ``acc / l`` and its log2-sum-exp ``m + log2(l)`` (``-inf`` when the split has
no key) to float32 scratch.

Stage 2, grid ``(B * Hq,)`` (`split_k_merge.decode_merge_kernel`): merges the splits by log-sum-exp,
``out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M)`` with ``M = max_s lse_s``. A head without keys
(length 0) gives zeros, never NaN. With ``num_splits == 1`` stage 1 writes the output itself, one launch.

How ``G`` is handled
--------------------
The group is padded to ``BLOCK_G = max(16, next_pow2(G))`` rows (padded rows load zeros and are never
stored), so both products are tensor-core ``tl.dot``s with every dim >= 16, as the GPU compiler needs.
Decode reads each K/V byte once and is bound by HBM, so the wasted MMA rows are free. Measured on an H200
(bf16), a broadcast-multiply + ``tl.sum`` variant without padding ran 2-14x slower than this at every
``G`` tried (1, 3, 4, 8): its ``[G, BLOCK_N, d]`` float32 products live in registers and CUDA-core FMAs
cannot keep up with 4 TB/s. (Triton also rewrites such a broadcast-reduce into a tf32 ``tl.dot`` once all
dims reach 16, which loses float32 accuracy.) So there is one path.

Tiles (`tiling.decode_tiles`): K and V tiles of 16 KiB each, ``BLOCK_N = 64`` at ``d = 128`` (3 stages),
128 at ``d = 64`` (2 stages), 4 warps. Measured (H200, bf16, CUDA graphs, L2-cold): 4.2-4.4 TB/s on large
batches; against PyTorch's SDPA (``enable_gqa``, dense caches only: it cannot take per-head lengths) within
about 3% from 8k keys on (run-to-run noise is up to 10% at batch 1), up to 10-15% behind at batch >= 16
with 1k keys, level or ahead at batch 1-8 up to 8k keys.

Splits (`tiling.choose_num_splits`): ``num_splits`` is static per call, from shapes only: about 2 programs
per SM (3 for ``d <= 64``), at least 2 splits from ``L_max >= 512``, no split under one 64-key tile, at
most 64.

CUDA graphs: no host sync, no ``.item()``, nothing allocated from ``lengths``' values. The scratch is
cached per (device, B, Hq, d, num_splits) (`split_k_merge.get_workspace`, shared with the paged kernel,
as is the merge kernel); pass ``out`` to reuse an output buffer.
Warm up once outside the capture so that the kernels are compiled and the scratch exists before it. The
cache is shared: launches that may run concurrently on different streams need separate workspaces
(``workspace=``).

CPU: ``backend="auto"`` (the default) returns `decode_attention_ref`'s result for CPU tensors (written into
``out`` when given); ``backend="triton"`` runs the kernels in Triton's interpreter (`kernels.backend`; tests,
float32/float16 only, since the interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entropyinfer.kernels.backend import Backend, jit_kernel, runs_triton
from entropyinfer.kernels.decode_attention_ref import decode_attention_ref
from entropyinfer.kernels.split_k_merge import (
    DecodeWorkspace,
    check_workspace,
    decode_merge_kernel,
    get_workspace,
)
from entropyinfer.kernels.tiling import choose_num_splits, decode_tiles, sm_count

__all__ = ["decode_attention"]

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    Q: tl.tensor,
    K: tl.tensor,
    V: tl.tensor,
    Lens: tl.tensor,
    MidO: tl.tensor,
    MidLse: tl.tensor,
    Out: tl.tensor,
    stride_qb: tl.tensor,
    stride_qh: tl.tensor,
    stride_kb: tl.tensor,
    stride_kh: tl.tensor,
    stride_kl: tl.tensor,
    stride_vb: tl.tensor,
    stride_vh: tl.tensor,
    stride_vl: tl.tensor,
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
    L_max: tl.tensor,
    Hkv: tl.tensor,
    num_splits: tl.tensor,
    HEAD_DIM: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    kvh = (pid_bh % Hkv).to(tl.int64)

    length = tl.load(Lens + b * stride_lb + kvh * stride_lh).to(tl.int32)
    length = tl.minimum(tl.maximum(length, 0), L_max)
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

    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    for start in range(lo, hi, BLOCK_N):
        offs = start + offs_n
        mask_n = offs < hi
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs[:, None] * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Every tile holds at least one valid key, so m_new is finite (padded rows score 0).
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs[:, None] * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0)
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


# ---------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Decode attention of one token per sequence over per-KV-head caches (split-K, GQA-aware).

    Args:
        q: ``[B, Hq, d]``.
        k_cache, v_cache: ``[B, Hkv, L_max, d]``, last dim contiguous, any other strides.
        lengths: int32 (or int64) ``[B, Hkv]`` on q's device, valid keys per (sequence, KV head).
        scale: softmax scale, ``d ** -0.5`` by default.
        num_splits: key-range splits per (sequence, KV head); `choose_num_splits` by default.
        out: optional ``[B, Hq, d]`` output buffer in q's dtype (last dim contiguous).
        workspace: optional scratch (see `DecodeWorkspace`); the cached `get_workspace` buffers by default.
            Two launches that may run concurrently (different streams) need different workspaces.
        backend: ``auto`` (the kernels for CUDA tensors, else `decode_attention_ref`), ``triton`` (the
            kernels, interpreted for CPU tensors) or ``torch`` (the reference); see `kernels.backend`.

    Returns:
        ``[B, Hq, d]`` in q's dtype (``out`` when given).
    """
    _check_inputs(q, k_cache, v_cache, lengths, out)
    batch, hq, d = q.shape
    _, hkv, l_max, _ = k_cache.shape
    group = hq // hkv
    if scale is None:
        scale = d**-0.5

    if not runs_triton(q.device, backend):
        ref = decode_attention_ref(q, k_cache, v_cache, lengths, scale=scale)
        if out is None:
            return ref
        out.copy_(ref)
        return out

    if out is None:
        out = torch.empty((batch, hq, d), dtype=q.dtype, device=q.device)
    if batch == 0 or hq == 0:
        return out
    if l_max == 0:
        return out.zero_()

    if num_splits is None:
        num_splits = choose_num_splits(batch, hkv, l_max, sm_count(q.device), d)
    num_splits = max(1, int(num_splits))

    block_d = triton.next_power_of_2(d)
    block_g = max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16: pad the group
    block_n, num_warps, num_stages = decode_tiles(block_d, q.element_size())
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32: unused for 16-bit inputs

    if num_splits > 1:
        if workspace is None:
            workspace = get_workspace(q.device, batch, hq, d, num_splits)
        check_workspace(workspace, q.device, batch, hq, d, num_splits)
        mid_o, mid_lse = workspace
    else:
        mid_o, mid_lse = out, out  # unused: the kernel writes the output itself

    jit_kernel(_decode_split_kernel, q.device)[(batch * hkv, num_splits)](
        q,
        k_cache,
        v_cache,
        lengths,
        mid_o,
        mid_lse,
        out,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
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
        l_max,
        hkv,
        num_splits,
        HEAD_DIM=d,
        G=group,
        BLOCK_G=block_g,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
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
    return out


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    out: torch.Tensor | None,
) -> None:
    """Shape, dtype, device and stride checks; metadata only (no device sync)."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "expected q [B, Hq, d] and k_cache/v_cache [B, Hkv, L_max, d] of one shape; "
            f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    batch, hq, d = q.shape
    kb, hkv, _, kd = k_cache.shape
    if kb != batch or kd != d or hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit k_cache {tuple(k_cache.shape)}: need the same B and d, "
            "and Hq a multiple of Hkv"
        )
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"q, k_cache and v_cache must share a dtype; got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if tuple(lengths.shape) != (batch, hkv):
        raise ValueError(f"lengths must be [B, Hkv] = [{batch}, {hkv}], got {tuple(lengths.shape)}")
    if lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be int32 (or int64), got {lengths.dtype}")
    devices = {q.device, k_cache.device, v_cache.device, lengths.device}
    if out is not None:
        devices.add(out.device)
    if len(devices) != 1:
        raise ValueError(f"q, k_cache, v_cache, lengths (and out) must be on one device; got {devices}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} needs a contiguous last dim (stride 1), got strides {t.stride()}")
    if out is not None:
        if tuple(out.shape) != (batch, hq, d) or out.dtype != q.dtype:
            raise ValueError(
                f"out must be [B, Hq, d] = {tuple(q.shape)} in {q.dtype}; got {tuple(out.shape)} {out.dtype}"
            )
        if out.stride(-1) != 1 and d > 1:
            raise ValueError(f"out needs a contiguous last dim, got strides {out.stride()}")
