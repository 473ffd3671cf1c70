"""Plain-torch reference for block-sparse prefill attention: the oracle of `sparse_prefill` and its CPU path.

Semantics (shared with `entropyinfer.kernels.sparse_prefill.sparse_prefill_attention`):

- One sequence per call. ``q``: ``[Hq, Nq, d]``; ``k``, ``v``: ``[Hkv, Nk, d]`` (KV heads not repeated);
  ``G = Hq // Hkv`` and query head ``h`` reads KV head ``h // G``.
- Query row ``r`` sits at absolute position ``p = q_offset + r``; keys are indexed by absolute position, so
  ``Nk >= q_offset + Nq`` (normally equal: a chunk ``[q_offset, q_offset + Nq)`` of a longer prompt).
- Segments of ``segment_size`` (``S``) positions: segment ``s`` is ``[s*S, (s+1)*S)``.
  ``nseg = ceil((q_offset + Nq) / S)`` (`block_layout.num_segments`); ``block_idx`` / ``block_cnt`` need at
  least ``nseg`` segment rows.
- ``block_idx[hk, s, :block_cnt[hk, s]]``: ids of the key blocks of ``block_size`` (``b``) tokens that KV head
  ``hk`` selected for segment ``s`` (block ``j`` covers keys ``[j*b, (j+1)*b)``, every one ending at or before
  ``s*S``), sorted ascending. ``block_cnt[hk, s] == -1`` marks a dense segment: every key of ``[0, s*S)``.
- Every query also attends causally inside its own segment: keys ``[s*S, p]``.
- Softmax over that set with ``scale`` (``d ** -0.5`` by default), computed in float32; output
  ``[Hq, Nq, d]`` in q's dtype.

The reference loops over (segment, KV head) and gathers the attended keys explicitly, so its memory is bounded
by one ``[G, S, keys]`` score block; it is an oracle, not a fast path.
"""

from __future__ import annotations

import torch

from entropyinfer.kernels.block_layout import check_sparse_prefill_args, num_segments

__all__ = ["sparse_prefill_attention_ref"]


def sparse_prefill_attention_ref(
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
) -> torch.Tensor:
    """Block-sparse prefill attention, plain torch (see the module docstring for the semantics).

    Also validates the block lists (counts within ``max_k``, ids non-negative and ending at or before their
    segment's start), which the kernel does not do.
    """
    check_sparse_prefill_args(q, k, v, block_idx, block_cnt, segment_size, block_size, q_offset)
    hq, nq, d = q.shape
    hkv = k.shape[0]
    group = hq // hkv
    seg, b = segment_size, block_size
    if scale is None:
        scale = d**-0.5
    nseg = num_segments(q_offset + nq, seg)
    counts = block_cnt[:, :nseg].tolist()
    max_k = block_idx.shape[2]
    out = torch.empty_like(q)
    within = torch.arange(b, device=k.device)

    for s in range(q_offset // seg, nseg):
        seg_start = s * seg
        p_lo, p_hi = max(seg_start, q_offset), min(seg_start + seg, q_offset + nq)
        pos = torch.arange(p_lo, p_hi, device=q.device)
        own = torch.arange(seg_start, p_hi, device=k.device)
        future = own[None, :] > pos[:, None]  # [L, own]: the segment's own keys a row may not see
        for hk in range(hkv):
            cnt = counts[hk][s]
            if cnt < 0:
                prefix = torch.arange(0, seg_start, device=k.device)
            else:
                if cnt > max_k:
                    raise ValueError(f"block_cnt[{hk}, {s}] = {cnt} exceeds max_k = {max_k}")
                ids = block_idx[hk, s, :cnt].long()
                if cnt and (int(ids.min()) < 0 or (int(ids.max()) + 1) * b > seg_start):
                    raise ValueError(
                        f"block ids of (head {hk}, segment {s}) must lie in [0, {seg_start // b})"
                    )
                prefix = (ids[:, None] * b + within[None, :]).reshape(-1)
            keys = torch.cat([prefix, own])
            kh = k[hk, keys].float()  # [K, d]
            vh = v[hk, keys].float()
            qs = q[hk * group : (hk + 1) * group, p_lo - q_offset : p_hi - q_offset].float()  # [G, L, d]
            scores = torch.matmul(qs, kh.T).mul_(scale)  # [G, L, K], scaled in place
            scores[..., len(prefix) :].masked_fill_(future, float("-inf"))  # the prefix is all visible
            probs = torch.softmax(scores, dim=-1)
            out[hk * group : (hk + 1) * group, p_lo - q_offset : p_hi - q_offset] = torch.matmul(
                probs, vh
            ).to(q.dtype)
    return out
