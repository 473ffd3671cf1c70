"""Attention execution on one shard: dense causal prefill and decode over the KV cache.

On a GPU the Triton kernels run; on the CPU their plain-torch references do (ARCHITECTURE.md), whatever
TRITON_INTERPRET says: the interpreter is for testing kernels, not for serving. Each kernel op decides
that itself (`kernels/backend.py`); this module passes no backend.

Sparse prefill (entropy / fixed policies) plugs in through `PrefillAttention`: the policy decides the
blocks (`policies/`), a kernel (`kernels/`) computes; this module only dispatches.

A prefill runs in one shot (``attention(layer, q, k, v)`` per layer over the whole prompt) or in chunks
(``attention.chunk(layer, q, k, v, q_offset, seq_len)``: queries ``[q0, q1)`` over keys ``[0, q1)``, every
layer of a chunk before the next chunk; the engine calls ``chunk_paged(layer, q, prefix, ...)`` with the
keys where they lie, a `paged_prefix.PagedPrefix`) where ``chunkable``: dense, `fixed`, and the causal
entropy modes (`causal`, `spread`). Chunked output and blocks equal one-shot's; the per-layer state
between chunks is a `prefill_state.LayerRecord`, and ``state_at`` / ``resume`` carry it across requests for
prefix caching.

Which policy prefills how is the registry's table (`policies/registry.py`): `build_prefill_attention` turns
a policy's `prefill` kind ("dense" / "sparse") and `selection` rule into `DensePrefill` (below) or
`SparsePrefill` (`shard/sparse_attention.py`). Compiling the sparse kernels before the first request is
`shard/sparse_warm_up.py`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from entropyinfer.kernels.decode_attention import decode_attention
from entropyinfer.policies.config import SparsePrefillConfig
from entropyinfer.policies.registry import get_policy
from entropyinfer.shard.dense_attention import dense_causal_attention, dense_chunk_attention
from entropyinfer.shard.paged_prefix import PagedPrefix
from entropyinfer.shard.prefill_state import PrefillState
from entropyinfer.shard.sparse_attention import SparsePrefill

__all__ = [
    "DensePrefill",
    "PrefillAttention",
    "build_prefill_attention",
    "cached_decode_attention",
    "prompt_attention",
]


class PrefillAttention(Protocol):
    """Attention over a prompt for one layer: one shot, ``q [Hq, N, d]``, ``k`` and ``v [Hkv, N, d]`` ->
    ``[Hq, N, d]``; or one chunk (`chunk` over contiguous keys, `chunk_paged` over the sequence's KV pages,
    where ``chunkable``). ``begin(num_layers, seq_len)`` once per
    prompt before its first layer (`Engine.prefill` calls it; SparsePrefill solves the `fixed` policy's
    budget for a target density there and resets its per-layer state)."""

    @property
    def chunkable(self) -> bool: ...

    @property
    def prefix_cacheable(self) -> bool: ...

    @property
    def segment_size(self) -> int: ...

    def begin(self, num_layers: int, seq_len: int) -> None: ...

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    def chunk(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, seq_len: int
    ) -> torch.Tensor: ...

    def chunk_paged(
        self, layer: int, q: torch.Tensor, prefix: PagedPrefix, q_offset: int, seq_len: int
    ) -> torch.Tensor: ...

    def state_at(self, segments: int) -> PrefillState: ...

    def resume(self, state: PrefillState) -> None: ...

    def stats(self) -> dict: ...


class DensePrefill:
    """Exact causal attention (fused SDPA), one shot or chunk by chunk (`dense_attention`). Chunks may start
    anywhere (``segment_size`` 1: a "segment" is a token); its prefix state is empty."""

    chunkable = True
    prefix_cacheable = True
    segment_size = 1

    def begin(self, num_layers: int, seq_len: int) -> None:
        """Nothing to prepare."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dense_causal_attention(q, k, v)

    def chunk(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, seq_len: int
    ) -> torch.Tensor:
        """``q [Hq, q1 - q0, d]`` at positions ``[q_offset, q1)`` over ``k``, ``v`` ``[Hkv, q1, d]``."""
        return dense_chunk_attention(q, k, v, q_offset)

    def chunk_paged(
        self, layer: int, q: torch.Tensor, prefix: PagedPrefix, q_offset: int, seq_len: int
    ) -> torch.Tensor:
        """`chunk` over the keys in the sequence's pages: fused SDPA needs them contiguous (one gather)."""
        return dense_chunk_attention(q, *prefix.contiguous(), q_offset)

    def state_at(self, segments: int) -> PrefillState:
        return PrefillState("dense", "dense", 1, segments)

    def resume(self, state: PrefillState) -> None:
        if state.key != "dense":
            raise ValueError(f"a dense prefill cannot resume a {state.policy!r} state")

    def stats(self) -> dict:
        return {"density": 1.0, "rigid_fraction": 0.0}


def cached_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """q [B, Hq, d] over k_cache/v_cache [B, Hkv, capacity, d] with lengths [B, Hkv] -> [B, Hq, d]."""
    return decode_attention(q, k_cache, v_cache, lengths)


def build_prefill_attention(policy: str, config: SparsePrefillConfig) -> PrefillAttention:
    """The prefill attention of a registered policy (`UnknownPolicyError` for an unknown name)."""
    entry = get_policy(policy)
    if entry.prefill == "sparse" and entry.selection is not None:
        return SparsePrefill(entry.selection, config)
    return DensePrefill()


def prompt_attention(
    policy: str, config: SparsePrefillConfig, num_layers: int, seq_len: int
) -> PrefillAttention:
    """`build_prefill_attention` for one `seq_len`-token prompt, its `begin` already called."""
    attention = build_prefill_attention(policy, config)
    attention.begin(num_layers, seq_len)
    return attention
