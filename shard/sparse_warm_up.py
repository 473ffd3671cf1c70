"""Sparse-kernel warm-up: run the sparse policies once per kernel size class on random data at start (GPU
only, `EngineConfig.warm_up_kernels`), so that no request waits for a Triton compile."""

from __future__ import annotations

import torch

from entropyinfer.kernels.tiling import row_chunk
from entropyinfer.policies.config import SparsePrefillConfig
from entropyinfer.policies.registry import SELECTIONS
from entropyinfer.shard.sparse_attention import SparsePrefill

__all__ = ["warm_up_lengths", "warm_up_sparse_prefill"]


def warm_up_lengths(config: SparsePrefillConfig, max_len: int) -> list[int]:
    """Prompt lengths (<= max_len) whose sparse prefill compiles every kernel variant a request can need.

    The profiling kernels are compiled per `row_chunk` of the key-block count (and whether a row fits one
    chunk): the shortest prompt of each such class, and each also one token shorter, since Triton compiles
    integer arguments divisible by 16 apart."""
    s_len, bps = config.segment_size, config.segment_size // config.block_size
    shortest = max(config.threshold_len, s_len) + s_len + 1
    seen: set[tuple[int, bool]] = set()
    lengths = []
    for nseg in range(-(-shortest // s_len), max_len // s_len + 1):
        nblk = (nseg - 1) * bps
        variant = (row_chunk(nblk), nblk <= row_chunk(nblk))
        if variant not in seen:
            seen.add(variant)
            lengths += [n for n in (nseg * s_len, nseg * s_len - 1) if n >= shortest]
    return lengths


@torch.inference_mode()
def warm_up_sparse_prefill(
    config: SparsePrefillConfig,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_len: int,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Run both sparse policies once at every `warm_up_lengths` length on random data (GPU only), so that
    requests never wait for a kernel compile; a no-op on the CPU (the torch references need none)."""
    if device.type != "cuda":
        return
    gen = torch.Generator(device=device).manual_seed(0)
    for n in warm_up_lengths(config, max_len):
        q = torch.randn(num_heads, n, head_dim, device=device, dtype=dtype, generator=gen)
        k = torch.randn(num_kv_heads, n, head_dim, device=device, dtype=dtype, generator=gen)
        for policy in SELECTIONS:
            SparsePrefill(policy, config)(1, q, k, k)
    torch.cuda.synchronize(device)
