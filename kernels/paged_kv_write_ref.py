"""Plain-torch reference of the decode step's KV write into the page pool (`paged_kv_write`).

One new token per (sequence, KV head): its key goes to ``kv_pages[0, page[b, h], h, offset[b, h]]`` and its
value to ``kv_pages[1, page[b, h], h, offset[b, h]]``, where ``kv_pages`` is one layer of the pool
(`KVPages.kv`: ``[2, num_pages, Hkv, page_size, d]``).
"""

from __future__ import annotations

import torch

__all__ = ["check_kv_write_args", "paged_kv_write_ref"]


def check_kv_write_args(
    k: torch.Tensor, v: torch.Tensor, kv_pages: torch.Tensor, page: torch.Tensor, offset: torch.Tensor
) -> None:
    """Shape checks shared by the kernel and the reference (no device sync)."""
    if kv_pages.dim() != 5 or kv_pages.shape[0] != 2:
        raise ValueError(f"kv_pages must be [2, num_pages, Hkv, page_size, d]; got {tuple(kv_pages.shape)}")
    _, _, hkv, _, d = kv_pages.shape
    if k.dim() != 3 or k.shape[1:] != (hkv, d) or v.shape != k.shape:
        raise ValueError(f"k and v must be [B, {hkv}, {d}]; got {tuple(k.shape)} and {tuple(v.shape)}")
    want = tuple(k.shape[:2])
    if tuple(page.shape) != want or tuple(offset.shape) != want:
        raise ValueError(f"page and offset must be {want}; got {tuple(page.shape)} and {tuple(offset.shape)}")
    if page.dtype.is_floating_point or offset.dtype.is_floating_point:
        raise ValueError("page and offset must be integer tensors")


def paged_kv_write_ref(
    k: torch.Tensor, v: torch.Tensor, kv_pages: torch.Tensor, page: torch.Tensor, offset: torch.Tensor
) -> None:
    """Write ``k, v [B, Hkv, d]`` into ``kv_pages`` in place at ``(page, head, offset)`` per (b, head)."""
    check_kv_write_args(k, v, kv_pages, page, offset)
    heads = torch.arange(k.shape[1], device=k.device)[None, :]
    page, offset = page.long(), offset.long()
    kv_pages[0][page, heads, offset] = k.to(kv_pages.dtype)
    kv_pages[1][page, heads, offset] = v.to(kv_pages.dtype)
