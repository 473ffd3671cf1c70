"""Paged decode attention for CPU tensors without gathering the pages (what `paged_decode_attention` runs
on the CPU; same layout and result as `paged_decode_attention_ref`, to float32 rounding).

The reference gathers every (sequence, KV head)'s pages into a contiguous cache per call: on the CPU that
copy of K and V (4k tokens x 30 layers for SmolLM2) cost about as much as the whole rest of a decode step.
Here each sequence reads a *block* of the pool in place: the pages from its lowest to its highest page id
(``k_pages[lo : hi + 1]``, a contiguous ``[S, Hkv, page_size, d]`` view), or, when those ids are spread far
apart, only its own pages (``index_select``, a copy). Attention does not depend on the order of the keys,
so a key needs no position, only a mask saying whether it belongs to the (sequence, head) (a page of its
table, a slot below its length). With the block flattened to ``[S * Hkv * page_size, d]`` rows:

- scores: one GEMM of all rows against all ``Hq`` queries, ``[S, Hkv, ps, Hkv', G]``; the diagonal
  ``Hkv == Hkv'`` holds each head's own scores (the rest, other heads' keys, is thrown away: Hkv x more
  FLOPs, but the GEMM is bound by reading K once and is tiny);
- masked softmax per (head, query) over the block;
- output: the probabilities placed on that diagonal of a zero ``[Hq, S, Hkv, ps]`` matrix, one GEMM
  with V's rows, ``[Hq, d]``.

So K and V are read once, from where they are. Float32 (or any float dtype, computed in it: the CPU path
serves fp32 models; the reference computes in float32 for every dtype).
"""

from __future__ import annotations

import torch

__all__ = ["paged_decode_attention_cpu"]

_SPREAD = 2  # read the lo..hi block while it is at most this many times the pages used (+ 8)


def paged_decode_attention_cpu(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inputs as `paged_decode_attention_ref` (checked by the caller); ``[B, Hq, d]`` in q's dtype."""
    batch, _, d = q.shape
    ps = k_pages.shape[2]
    if scale is None:
        scale = d**-0.5
    if out is None:
        out = torch.empty_like(q)
    lens_all = lengths.long()
    for b in range(batch):
        lens = lens_all[b]  # [Hkv]
        used = -(-int(lens.max()) // ps) if lens.numel() else 0
        if used == 0:
            out[b].zero_()
            continue
        ids = block_tables[b, :, :used].long()  # [Hkv, used]
        own = torch.arange(used) < (lens[:, None] + ps - 1) // ps  # entries past a head's pages: any id
        lo, hi = int(ids[own].min()), int(ids[own].max())
        ids = ids.masked_fill(~own, lo)
        if hi - lo + 1 <= _SPREAD * used + 8:
            kb, vb, idx = k_pages[lo : hi + 1], v_pages[lo : hi + 1], ids - lo
        else:
            uniq, idx = torch.unique(ids, return_inverse=True)
            kb, vb = k_pages.index_select(0, uniq), v_pages.index_select(0, uniq)
        out[b] = _block_attention(q[b], kb, vb, idx, lens, scale)
    return out


def _block_attention(
    q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, idx: torch.Tensor, lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """One sequence: q ``[Hq, d]``; kb / vb ``[S, Hkv, ps, d]`` (contiguous); idx ``[Hkv, used]`` block
    index of each table entry; lens ``[Hkv]``. -> ``[Hq, d]``."""
    s, hkv, ps, d = kb.shape
    hq = q.shape[0]
    g = hq // hkv
    used = idx.shape[1]
    # which slots of the block each head owns: its table's pages, up to its length
    slot_ok = torch.arange(used * ps).view(used, ps) < lens.view(hkv, 1, 1)  # [Hkv, used, ps]
    owned = torch.zeros(hkv, s, ps, dtype=torch.int32)
    owned.scatter_add_(1, idx[..., None].expand(-1, -1, ps), slot_ok.int())  # past-length entries add 0
    mask = owned > 0  # [Hkv, S, ps]
    scores = (kb.reshape(-1, d) @ q.T).view(s, hkv, ps, hkv, g)
    scores = scores.diagonal(dim1=1, dim2=3).permute(3, 2, 0, 1)  # [Hkv, G, S, ps], own heads only
    scores = (scores * scale).masked_fill(~mask[:, None], float("-inf")).reshape(hkv, g, s * ps)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = probs.masked_fill((lens == 0).view(hkv, 1, 1), 0.0)  # a head without keys gives zeros
    full = q.new_zeros(hkv, g, s, hkv, ps)
    full.diagonal(dim1=0, dim2=3).copy_(probs.view(hkv, g, s, ps).permute(1, 2, 3, 0))
    return full.view(hq, s * hkv * ps) @ vb.reshape(s * hkv * ps, d)
