"""Plain-torch reference of block-sparse prefill over paged KV: the oracle of `paged_sparse_prefill` and its
CPU path.

Semantics: `sparse_prefill_ref`'s, with keys and values read through a page table instead of contiguous
``[Hkv, Nk, d]`` tensors. ``k_pages`` / ``v_pages``: one layer's pools ``[num_pages, Hkv, page_size, d]``;
``block_table``: int32 or int64 ``[Hkv, P]``, KV head ``h``'s pages in order, so its key at position ``p``
is ``k_pages[block_table[h, p // page_size], h, p % page_size]``; keys ``[0, kv_len)`` are valid
(``kv_len >= q_offset + Nq``, ``P * page_size >= kv_len``). The reference gathers those keys into contiguous
tensors and runs `sparse_prefill_attention_ref`.
"""

from __future__ import annotations

import torch

from entropyinfer.kernels.block_layout import check_sparse_prefill_args
from entropyinfer.kernels.paged_decode_attention_ref import gather_pages
from entropyinfer.kernels.sparse_prefill_ref import sparse_prefill_attention_ref

__all__ = [
    "check_page_table",
    "check_paged_prefill_args",
    "gather_pages_ref",
    "paged_sparse_prefill_attention_ref",
]


def check_paged_prefill_args(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    kv_len: int,
    segment_size: int,
    block_size: int,
    q_offset: int,
) -> None:
    """Shape and dtype checks (no device sync), shared by the kernel launcher and the reference."""
    if k_pages.dim() != 4 or v_pages.shape != k_pages.shape:
        raise ValueError(
            f"k_pages {tuple(k_pages.shape)} and v_pages {tuple(v_pages.shape)} must be one "
            "[num_pages, Hkv, page_size, d] shape"
        )
    if v_pages.dtype != k_pages.dtype or v_pages.device != k_pages.device:
        raise ValueError(f"v_pages ({v_pages.dtype}, {v_pages.device}) must match k_pages ({k_pages.dtype}, "
                         f"{k_pages.device})")  # fmt: skip
    _, hkv, page_size, d = k_pages.shape
    if page_size & (page_size - 1):
        raise ValueError(f"page_size {page_size} must be a power of two")
    check_page_table(k_pages, block_table, kv_len)
    # the contiguous checks on a [Hkv, kv_len, d] stand-in (zero strides: no memory)
    keys = k_pages.new_empty(()).expand(hkv, kv_len, d)
    check_sparse_prefill_args(q, keys, keys, block_idx, block_cnt, segment_size, block_size, q_offset)


def check_page_table(pool: torch.Tensor, block_table: torch.Tensor, n: int) -> None:
    """``block_table``: int32 / int64 ``[Hkv, P]`` on the pool's device covering positions ``[0, n)`` of
    ``pool [pages, Hkv, page_size, d]`` (no device sync: the ids are checked by `gather_pages_ref`)."""
    hkv, page_size = pool.shape[1], pool.shape[2]
    if block_table.dim() != 2 or block_table.shape[0] != hkv or block_table.device != pool.device:
        raise ValueError(
            f"block_table must be [Hkv={hkv}, pages] on {pool.device}; got {tuple(block_table.shape)} on "
            f"{block_table.device}"
        )
    if block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table must be int32 or int64, got {block_table.dtype}")
    if block_table.shape[1] * page_size < n:
        raise ValueError(f"{n} positions needed; the table covers {block_table.shape[1] * page_size}")


def gather_pages_ref(pool: torch.Tensor, block_table: torch.Tensor, n: int) -> torch.Tensor:
    """Contiguous ``[Hkv, n, d]`` of positions ``[0, n)`` of every head of ``pool [pages, Hkv, ps, d]``
    through ``block_table [Hkv, P]`` (`paged_decode_attention_ref.gather_pages` of its used pages); page ids
    out of the pool raise ``ValueError``."""
    pages, ps = pool.shape[0], pool.shape[2]
    used = block_table[:, : -(-n // ps)]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= pages):
        raise ValueError(f"page ids must lie in [0, {pages})")
    return gather_pages(pool, used[None])[0, :, :n]


def paged_sparse_prefill_attention_ref(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    *,
    kv_len: int,
    segment_size: int,
    block_size: int,
    scale: float | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    """Block-sparse prefill over paged KV, plain torch: gather, then `sparse_prefill_attention_ref`."""
    check_paged_prefill_args(
        q, k_pages, v_pages, block_table, block_idx, block_cnt, kv_len, segment_size, block_size, q_offset
    )
    k = gather_pages_ref(k_pages, block_table, kv_len)
    v = gather_pages_ref(v_pages, block_table, kv_len)
    return sparse_prefill_attention_ref(
        q, k, v, block_idx, block_cnt, segment_size=segment_size, block_size=block_size, scale=scale,
        q_offset=q_offset,
    )  # fmt: skip
