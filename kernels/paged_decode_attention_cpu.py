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
    """Inputs as `paged_decode_attention_ref` (shapes checked by the caller; lengths and the page ids they
    use are checked here, raising ``ValueError``); ``[B, Hq, d]`` in q's dtype."""
    d = q.shape[2]
    num_pages, _, ps, _ = k_pages.shape
    max_pages = block_tables.shape[-1]
    if out is None:
        out = torch.empty_like(q)
    qs = q * (d**-0.5 if scale is None else scale)  # the scale folded into the queries
    for b, lens in enumerate(lengths.tolist()):  # a few ints per sequence: plain Python from here
        shortest, longest = min(lens), max(lens)
        if shortest < 0 or longest > max_pages * ps:
            raise ValueError(f"lengths[{b}] = {lens} must lie in [0, {max_pages} pages of {ps}]")
        used = -(-longest // ps)
        if used == 0:
            out[b].zero_()
            continue
        ids = block_tables[b, :, :used].long()  # [Hkv, used]
        if shortest == longest:  # every head uses every entry (an uncompressed sequence)
            lo, hi = int(ids.min()), int(ids.max())
        else:  # a head's entries past its own pages may hold anything: point them at a used page
            own = torch.arange(used) < torch.tensor([-(-n // ps) for n in lens])[:, None]
            lo, hi = int(ids[own].min()), int(ids[own].max())
            ids = ids.masked_fill(~own, lo)
        if lo < 0 or hi >= num_pages:
            raise ValueError(f"block_tables[{b}] uses page ids in [{lo}, {hi}], the pool has {num_pages}")
        if hi - lo + 1 <= _SPREAD * used + 8:
            kb, vb, idx = k_pages[lo : hi + 1], v_pages[lo : hi + 1], ids - lo
        else:
            uniq, idx = torch.unique(ids, return_inverse=True)
            kb, vb = k_pages.index_select(0, uniq), v_pages.index_select(0, uniq)
        out[b] = _block_attention(qs[b], kb, vb, idx, lens)
    return out


def _block_mask(s: int, ps: int, idx: torch.Tensor, lens: list[int]) -> torch.Tensor | None:
    """bool ``[Hkv, S, ps]``: the block's slots each head owns (its table's pages, up to its length);
    None when that is every slot."""
    hkv, used = idx.shape
    longest = max(lens)
    if min(lens) == longest and s == used:  # the block is exactly the sequence's pages, in some order
        rem = longest - (used - 1) * ps
        if rem == ps:
            return None
        mask = torch.ones(hkv, s, ps, dtype=torch.bool)
        mask[torch.arange(hkv), idx[:, used - 1], rem:] = False  # the partly filled last page
        return mask
    slot_ok = torch.arange(used * ps).view(1, used, ps) < torch.tensor(lens).view(hkv, 1, 1)
    owned = torch.zeros(hkv, s, ps, dtype=torch.int32)
    owned.scatter_add_(1, idx[..., None].expand(-1, -1, ps), slot_ok.int())  # past-length entries add 0
    return owned > 0


def _block_attention(
    q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, idx: torch.Tensor, lens: list[int]
) -> torch.Tensor:
    """One sequence: q ``[Hq, d]`` (scaled); kb / vb ``[S, Hkv, ps, d]`` (contiguous); idx ``[Hkv, used]``
    block index of each table entry; lens per head. -> ``[Hq, d]``."""
    s, hkv, ps, d = kb.shape
    hq = q.shape[0]
    g = hq // hkv
    scores = (kb.reshape(-1, d) @ q.T).view(s, hkv, ps, hkv, g)
    scores = scores.diagonal(dim1=1, dim2=3).permute(3, 2, 0, 1)  # [Hkv, G, S, ps], own heads only
    mask = _block_mask(s, ps, idx, lens)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores.reshape(hkv, g, s * ps).float(), dim=-1).to(q.dtype)
    if min(lens) == 0:  # a head without keys gives zeros (its softmax is NaN)
        probs = probs.masked_fill(torch.tensor([n == 0 for n in lens]).view(hkv, 1, 1), 0.0)
    full = q.new_zeros(hkv, g, s, hkv, ps)
    full.diagonal(dim1=0, dim2=3).copy_(probs.view(hkv, g, s, ps).permute(1, 2, 3, 0))
    return full.view(hq, s * hkv * ps) @ vb.reshape(s * hkv * ps, d)
