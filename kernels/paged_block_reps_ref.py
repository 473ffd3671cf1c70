"""Plain-torch reference of the key-block representations read from paged KV (`paged_block_reps`).

Block ``j`` of KV head ``h`` covers positions ``[j*b, (j+1)*b)``; its representations are the element-wise
max and min of those keys (`block_scoring_ref.segment_block_reps_ref`'s ``kmax``, ``kmin``), here with the
keys at ``k_pages[block_table[h, p // page_size], h, p % page_size]``.
"""

from __future__ import annotations

import torch

from entropyinfer.kernels.paged_sparse_prefill_ref import check_page_table, gather_pages_ref

__all__ = ["check_paged_reps_args", "paged_block_reps_ref"]


def check_paged_reps_args(
    k_pages: torch.Tensor, block_table: torch.Tensor, num_blocks: int, block_size: int
) -> None:
    """Shape checks shared by the kernel and the reference (no device sync)."""
    if k_pages.dim() != 4:
        raise ValueError(f"k_pages must be [num_pages, Hkv, page_size, d]; got {tuple(k_pages.shape)}")
    if num_blocks < 0 or block_size <= 0:
        raise ValueError(f"need num_blocks >= 0 and block_size > 0; got {num_blocks}, {block_size}")
    check_page_table(k_pages, block_table, num_blocks * block_size)


def paged_block_reps_ref(
    k_pages: torch.Tensor, block_table: torch.Tensor, num_blocks: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kmax, kmin [Hkv, num_blocks, d]`` in the pool's dtype, of the first ``num_blocks`` key blocks."""
    check_paged_reps_args(k_pages, block_table, num_blocks, block_size)
    hkv, d = k_pages.shape[1], k_pages.shape[3]
    k = gather_pages_ref(k_pages, block_table, num_blocks * block_size)
    kb = k.reshape(hkv, num_blocks, block_size, d)
    return kb.amax(dim=2), kb.amin(dim=2)
