"""Paged decode attention for CPU tensors (what `paged_decode_attention` runs on the CPU; same layout and
result as `paged_decode_attention_ref`, to float rounding).

The reference gathers every (sequence, KV head)'s pages with advanced indexing into a cache padded to the
batch's widest table, then runs an einsum / masked softmax / einsum chain: on a 2-core CPU that cost as
much as the rest of SmolLM2's decode step at 4k tokens. Here, per sequence:

- gather only its own pages, as rows of the pool viewed ``[num_pages * Hkv, page_size * d]``
  (``index_select`` of contiguous ``page_size * d`` rows: a plain copy, up to its longest head's length);
- one fused SDPA call (the CPU flash kernel) with the ``G`` query heads of a KV head as ``G`` query rows:
  ``q [1, Hkv, G, d]`` over ``k, v [1, Hkv, L, d]``; no mask when every head has the same length (an
  uncompressed sequence), else a boolean ``[1, Hkv, 1, L]`` mask of each head's own length;
- a head with no keys gives zeros.

What is gathered (pool rows, masks, checks) is planned once per decode step: the layers share the block
tables and, for an uncompressed sequence, the lengths (`_plan`).

(Reading the pool in place instead, as one GEMM of all heads' keys against all queries, avoids the copy but
wastes ``Hkv`` x the work and was no faster at ``Hkv = 3``, much slower at 8.)
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

__all__ = ["paged_decode_attention_cpu"]


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
    hq, d = q.shape[1:]
    hkv = k_pages.shape[1]
    if out is None:
        out = torch.empty_like(q)
    k_rows, v_rows = _rows(k_pages), _rows(v_pages)
    for b, (lens, used, rows, mask, empty) in enumerate(_plan(block_tables, lengths, k_pages.shape)):
        if used == 0:
            out[b].zero_()
            continue
        longest = max(lens)
        k = k_rows.index_select(0, rows).view(1, hkv, used * k_pages.shape[2], d)[:, :, :longest]
        v = v_rows.index_select(0, rows).view(1, hkv, used * k_pages.shape[2], d)[:, :, :longest]
        o = F.scaled_dot_product_attention(q[b].view(1, hkv, hq // hkv, d), k, v, attn_mask=mask, scale=scale)
        if empty is not None:  # a head without keys: zeros (its softmax over nothing is NaN)
            o = o.masked_fill(empty, 0.0)
        out[b] = o.view(hq, d)
    return out


_Plan = list[tuple[list[int], int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]
_cache = threading.local()  # the last block tables seen (a copy) and the plans made for them


def _plan(block_tables: torch.Tensor, lengths: torch.Tensor, pool: torch.Size) -> _Plan:
    """Per sequence: (its heads' lengths, pages used, the pool rows to gather, the length mask of ragged
    heads, the mask of heads without keys). The layers of a decode step share their block tables and,
    uncompressed, their lengths: the plan is made once per step, not once per layer (each is about ten
    small tensor ops per sequence), and kept while the tables' content stays the same."""
    key = (tuple(pool), tuple(map(tuple, lengths.tolist())))
    tables: torch.Tensor | None = getattr(_cache, "tables", None)
    if (
        tables is None
        or tables.shape != block_tables.shape
        or tables.dtype != block_tables.dtype
        or not torch.equal(tables, block_tables)
    ):
        _cache.tables, _cache.plans = block_tables.clone(), {}
    plans: dict[tuple, _Plan] = _cache.plans
    plan = plans.get(key)
    if plan is None:
        if len(plans) >= 64:
            plans.clear()
        plan = plans[key] = _make_plan(block_tables, key[1], pool)
    return plan


def _make_plan(block_tables: torch.Tensor, lengths: tuple, pool: torch.Size) -> _Plan:
    num_pages, hkv, ps, _ = pool
    max_pages = block_tables.shape[-1]
    heads = torch.arange(hkv)[:, None]
    plan: _Plan = []
    for b, lens in enumerate(map(list, lengths)):  # a few ints per sequence: plain Python from here
        shortest, longest = min(lens), max(lens)
        if shortest < 0 or longest > max_pages * ps:
            raise ValueError(f"lengths[{b}] = {lens} must lie in [0, {max_pages} pages of {ps}]")
        used = -(-longest // ps)
        if used == 0:
            plan.append((lens, 0, heads, None, None))
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
        rows = (ids * hkv + heads).view(-1)
        mask = None
        if shortest < longest:
            mask = (torch.arange(longest) < torch.tensor(lens)[:, None]).view(1, hkv, 1, longest)
        empty = torch.tensor([n == 0 for n in lens]).view(1, hkv, 1, 1) if shortest == 0 else None
        plan.append((lens, used, rows, mask, empty))
    return plan


def _rows(pages: torch.Tensor) -> torch.Tensor:
    """The pool as ``[num_pages * Hkv, page_size * d]`` rows (a view of a contiguous pool)."""
    n, hkv, ps, d = pages.shape
    if not pages.is_contiguous():  # e.g. a strided view: copy once per call
        pages = pages.contiguous()
    return pages.view(n * hkv, ps * d)
