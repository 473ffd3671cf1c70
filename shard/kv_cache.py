"""Preallocated KV cache: one tensor [layers, 2, batch, kv_heads, capacity, head_dim]."""

from __future__ import annotations

import torch

from entropyinfer.shard.arch import ModelArch


class KVCache:
    def __init__(self, arch: ModelArch, batch: int, capacity: int, device: torch.device, dtype: torch.dtype):
        self.batch, self.capacity = batch, capacity
        # Zeroed: slots past a head's length are never attended, but 0 * garbage-NaN would still poison sums.
        self.data = torch.zeros(
            arch.num_layers, 2, batch, arch.num_kv_heads, capacity, arch.head_dim, device=device, dtype=dtype
        )
        # Valid keys per (sequence, KV head); equal across heads for a dense cache.
        self.lengths = torch.zeros(batch, arch.num_kv_heads, dtype=torch.int32, device=device)

    def k(self, layer: int) -> torch.Tensor:
        return self.data[layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        return self.data[layer, 1]

    def tokens_kept(self, slot: int) -> int:
        """KV positions held for a sequence, summed over KV heads and layers' mean (one layer's worth)."""
        return int(self.lengths[slot].max().item())

    def bytes_used(self, slot: int) -> int:
        """Bytes of K and V held for one sequence across all layers (per-head lengths respected)."""
        per_token_head = 2 * self.data.shape[0] * self.data.shape[-1] * self.data.element_size()
        return int(self.lengths[slot].sum().item()) * per_token_head

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
