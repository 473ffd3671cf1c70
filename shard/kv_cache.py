"""KV caches of one batch of sequences.

`KVCache`: the full cache written by prefill, one tensor [layers, 2, batch, kv_heads, capacity, head_dim],
with one length per (sequence, KV head) shared by all layers; decode writes token p at position p.

`CompactKVCache`: what decode-time compression (`shard/compression.py`) leaves: a fixed-capacity buffer
[layers, 2, batch, kv_heads, slots, head_dim] (the kept tokens plus room for the tokens still to generate),
with its own length per (layer, sequence, KV head). Decode appends each new token at index
``lengths[layer, b, h]`` of its head (rope still uses the true position), so shapes stay static for CUDA
graphs. ``positions`` records the true position of every entry (for tests and re-compression).
"""

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
        self.num_layers, self.head_dim = arch.num_layers, arch.head_dim

    def k(self, layer: int) -> torch.Tensor:
        return self.data[layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        return self.data[layer, 1]

    def layer_lengths(self, layer: int) -> torch.Tensor:
        """Valid keys per (sequence, KV head) of one layer: int32 [batch, kv_heads]."""
        return self.lengths

    def tokens_kept(self, slot: int) -> int:
        """KV positions held for a sequence, summed over KV heads and layers' mean (one layer's worth)."""
        return int(self.lengths[slot].max().item())

    def tokens_per_layer(self, slot: int) -> list[float]:
        """Positions held per layer, averaged over the KV heads."""
        return [float(self.lengths[slot].float().mean().item())] * self.num_layers

    def bytes_used(self, slot: int) -> int:
        """Bytes of K and V held for one sequence across all layers (per-head lengths respected)."""
        per_token_head = 2 * self.num_layers * self.head_dim * self.data.element_size()
        return int(self.lengths[slot].sum().item()) * per_token_head

    def release(self) -> None:
        """Free the K/V storage (after compression moved what is kept into a `CompactKVCache`)."""
        self.data = self.data.new_empty((self.num_layers, 2, self.batch, 0, 0, 0))

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class CompactKVCache:
    def __init__(self, arch: ModelArch, batch: int, slots: int, device: torch.device, dtype: torch.dtype):
        self.batch, self.capacity, self.num_layers = batch, slots, arch.num_layers
        shape = (arch.num_layers, 2, batch, arch.num_kv_heads, slots, arch.head_dim)
        self.data = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(shape[:1] + shape[2:4], dtype=torch.int32, device=device)
        self.positions = torch.full(shape[:1] + shape[2:5], -1, dtype=torch.int32, device=device)

    def k(self, layer: int) -> torch.Tensor:
        return self.data[layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        return self.data[layer, 1]

    def layer_lengths(self, layer: int) -> torch.Tensor:
        return self.lengths[layer]

    def tokens_kept(self, slot: int) -> float:
        """Positions held per (layer, KV head) of a sequence, averaged (= tokens of one layer's worth)."""
        return float(self.lengths[:, slot].double().mean().item())

    def tokens_per_layer(self, slot: int) -> list[float]:
        return self.lengths[:, slot].double().mean(dim=1).tolist()

    def bytes_used(self, slot: int) -> int:
        per_token_head = 2 * self.data.shape[-1] * self.data.element_size()
        return int(self.lengths[:, slot].long().sum().item()) * per_token_head

    @property
    def nbytes(self) -> int:
        kv = self.data.numel() * self.data.element_size()
        return kv + self.positions.numel() * 4 + self.lengths.numel() * 4
