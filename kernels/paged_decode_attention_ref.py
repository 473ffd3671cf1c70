"""Torch reference of paged decode attention: one query token per sequence over KV held in a page pool.

Layout
------
- ``q``: ``[B, Hq, d]``, one new token per sequence.
- ``k_pages`` / ``v_pages``: ``[num_pages, Hkv, page_size, d]``, the page pool of one layer. A page holds
  ``page_size`` consecutive positions of every KV head (an uncompressed sequence), or, once latent
  compression gave each head its own kept entries, a page is read for one head only (the head whose table
  names it).
- ``block_tables``: int32 ``[B, Hkv, max_pages]``: for sequence ``b`` and KV head ``h``, the ids of the
  pages holding its positions in order (entry ``i`` holds positions ``i * page_size ..
  (i + 1) * page_size - 1``). Entries past the head's used pages are ignored (they may be ``-1``). Any
  strides: an uncompressed batch passes one ``[B, 1, max_pages]`` table expanded over heads (stride 0).
- ``lengths``: int32 ``[B, Hkv]``: valid entries per (sequence, KV head), ``0 <= len <= max_pages *
  page_size``. A length of 0 gives zeros (a padded batch row of a CUDA graph).
- GQA: ``Hq = G * Hkv``; query head ``h`` reads KV head ``h // G``.
- Returns ``[B, Hq, d]`` in ``q``'s dtype; computed in float32.

Algorithm: gather each (sequence, KV head)'s pages into a contiguous ``[B, Hkv, max_pages * page_size, d]``
cache and run `decode_attention_ref` on it. Meant for tests and the CPU path, not for speed.
`check_paged_inputs` holds the checks shared with the Triton launcher (`paged_decode_attention`).
"""

from __future__ import annotations

import torch

from entropyinfer.kernels.decode_attention_ref import decode_attention_ref

__all__ = ["check_paged_inputs", "check_paged_values", "gather_pages", "paged_decode_attention_ref"]

_INDEX_DTYPES = (torch.int32, torch.int64)


def check_paged_inputs(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    out: torch.Tensor | None = None,
) -> None:
    """Shape, dtype, device and stride checks; metadata only (no device sync, safe in a CUDA graph)."""
    if q.dim() != 3 or k_pages.dim() != 4 or v_pages.shape != k_pages.shape:
        raise ValueError(
            "expected q [B, Hq, d] and k_pages/v_pages [num_pages, Hkv, page_size, d] of one shape; "
            f"got q {tuple(q.shape)}, k_pages {tuple(k_pages.shape)}, v_pages {tuple(v_pages.shape)}"
        )
    batch, hq, d = q.shape
    _, hkv, page_size, kd = k_pages.shape
    if kd != d or hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit k_pages {tuple(k_pages.shape)}: need the same d and Hq a "
            "multiple of Hkv"
        )
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size (k_pages.shape[2]) must be a power of two, got {page_size}")
    if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise ValueError(
            f"q, k_pages and v_pages must share a dtype; got {q.dtype}, {k_pages.dtype}, {v_pages.dtype}"
        )
    if block_tables.dim() != 3 or tuple(block_tables.shape[:2]) != (batch, hkv):
        raise ValueError(
            f"block_tables must be [B, Hkv, max_pages] = [{batch}, {hkv}, max_pages], "
            f"got {tuple(block_tables.shape)}"
        )
    if tuple(lengths.shape) != (batch, hkv):
        raise ValueError(f"lengths must be [B, Hkv] = [{batch}, {hkv}], got {tuple(lengths.shape)}")
    for name, t in (("block_tables", block_tables), ("lengths", lengths)):
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be int32 (or int64), got {t.dtype}")
    devices = {q.device, k_pages.device, v_pages.device, block_tables.device, lengths.device}
    if out is not None:
        devices.add(out.device)
    if len(devices) != 1:
        raise ValueError(
            f"q, k_pages, v_pages, block_tables, lengths (and out) must be on one device; got {devices}"
        )
    for name, t in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} needs a contiguous last dim (stride 1), got strides {t.stride()}")
    if out is not None:
        if tuple(out.shape) != (batch, hq, d) or out.dtype != q.dtype:
            raise ValueError(
                f"out must be [B, Hq, d] = {tuple(q.shape)} in {q.dtype}; got {tuple(out.shape)} {out.dtype}"
            )
        if out.stride(-1) != 1 and d > 1:
            raise ValueError(f"out needs a contiguous last dim, got strides {out.stride()}")


def check_paged_values(
    block_tables: torch.Tensor, lengths: torch.Tensor, num_pages: int, page_size: int
) -> None:
    """Value checks: ``0 <= lengths <= max_pages * page_size`` and every page a length uses is a valid id.

    Reads the tensors' values, so on CUDA it synchronises (never call it inside a CUDA graph capture).
    """
    max_pages = block_tables.shape[-1]
    lens = lengths.long()
    if lens.numel() and int(lens.min()) < 0:
        raise ValueError(f"lengths must be >= 0, got min {int(lens.min())}")
    if lens.numel() and int(lens.max()) > max_pages * page_size:
        bad = (lens > max_pages * page_size).nonzero()[0].tolist()
        raise ValueError(
            f"block_tables too short: lengths[{bad[0]}, {bad[1]}] = {int(lens[bad[0], bad[1]])} needs "
            f"{-(-int(lens[bad[0], bad[1]]) // page_size)} pages of {page_size}, the table holds {max_pages}"
        )
    used = torch.arange(max_pages, device=lens.device) < (lens.unsqueeze(-1) + page_size - 1) // page_size
    ids = block_tables.long()
    bad_ids = used & ((ids < 0) | (ids >= num_pages))
    if bool(bad_ids.any()):
        b, h, i = bad_ids.nonzero()[0].tolist()
        raise ValueError(
            f"block_tables[{b}, {h}, {i}] = {int(ids[b, h, i])} is not a page id in [0, {num_pages}) but "
            f"lengths[{b}, {h}] = {int(lens[b, h])} uses it"
        )


def gather_pages(pages: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """``[num_pages, Hkv, page_size, d]`` pages -> the contiguous ``[B, Hkv, max_pages * page_size, d]``
    cache the tables describe (unused entries, e.g. -1, read page 0: mask them by length)."""
    num_pages, hkv, page_size, d = pages.shape
    batch, _, max_pages = block_tables.shape
    ids = block_tables.long().clamp(0, max(num_pages - 1, 0))  # [B, Hkv, P]
    heads = torch.arange(hkv, device=pages.device).view(1, hkv, 1)
    gathered = pages[ids, heads]  # [B, Hkv, P, page_size, d]
    return gathered.reshape(batch, hkv, max_pages * page_size, d)


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over the first ``lengths[b, h]`` entries of each KV head,
    read through ``block_tables[b, h]`` from the page pool.

    Raises ``ValueError`` on bad shapes or dtypes, on a length the table cannot hold, and on an invalid page
    id among the pages a length uses. Returns ``[B, Hq, d]`` in ``q``'s dtype; computed in float32.
    """
    check_paged_inputs(q, k_pages, v_pages, block_tables, lengths)
    num_pages, _, page_size, _ = k_pages.shape
    check_paged_values(block_tables, lengths, num_pages, page_size)
    batch, hq, _ = q.shape
    if batch == 0 or hq == 0 or block_tables.shape[-1] == 0 or num_pages == 0:
        return torch.zeros_like(q)
    k = gather_pages(k_pages, block_tables)
    v = gather_pages(v_pages, block_tables)
    return decode_attention_ref(q, k, v, lengths, scale=scale)
