"""One layer's keys and values of a prefill chunk as they lie in the sequence's KV pages.

`Engine.prefill_pages` writes a chunk's keys and values into the pages first, then hands the attention a
`PagedPrefix`: the layer's pools, the sequence's page table covering ``[0, end)`` and the chunk's own
contiguous keys. A sparse attention reads the pages in place (`kernels.paged_sparse_prefill` for the chunk's
selected blocks, `kernels.paged_block_reps` for profiling the prefix); anything that needs contiguous keys
(a chunk whose every segment is dense: fused SDPA cannot read pages) calls `contiguous`, one gather of
``[0, end)`` per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from entropyinfer.shard.kv_pages import gather_heads

__all__ = ["PagedPrefix"]


@dataclass(frozen=True)
class PagedPrefix:
    """Keys ``[0, end)`` of one layer: ``k_pages`` / ``v_pages`` ``[pages, Hkv, page_size, d]`` read through
    ``table`` (int64 ``[Hkv, P]`` on the device, ``P * page_size >= end``); ``k_chunk`` / ``v_chunk``
    ``[Hkv, end - start, d]`` the chunk's own keys and values (already written to the pages); ``in_place``:
    whether a sparse attention may read the pages in place (`EngineConfig.paged_prefix_reads` on this
    device), else it gathers like a dense one."""

    k_pages: torch.Tensor
    v_pages: torch.Tensor
    table: torch.Tensor
    k_chunk: torch.Tensor
    v_chunk: torch.Tensor
    start: int
    end: int
    in_place: bool = False

    def contiguous(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``k, v [Hkv, end, d]``: the chunk's own when it starts at 0, else one gather from the pages."""
        if self.start == 0:
            return self.k_chunk, self.v_chunk
        k = gather_heads(self.k_pages, self.table)[:, : self.end]
        return k, gather_heads(self.v_pages, self.table)[:, : self.end]
