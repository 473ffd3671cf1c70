"""Sparse-kernel warm-up: run the sparse policies once per kernel size class on random data at start (GPU
only, `EngineConfig.warm_up_kernels`), one shot and, where the engine reads a chunk's prefix in its KV pages
(`EngineConfig.paged_prefix_reads`), as a second chunk over pages, so that no request waits for a Triton
compile (the paged variants compile apart from the contiguous ones)."""

from __future__ import annotations

import dataclasses

import torch

from entropyinfer.kernels.tiling import row_chunk
from entropyinfer.policies.config import SparsePrefillConfig
from entropyinfer.policies.registry import SELECTIONS
from entropyinfer.shard.paged_prefix import PagedPrefix
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
    page_size: int | None = None,
) -> None:
    """Run both sparse policies once at every `warm_up_lengths` length on random data (GPU only), and
    `fixed` with the other block ranking (`ranking`, at the config's `ranking_stride`: a request that asks
    another stride compiles its variant), so that requests never wait for a kernel compile; a no-op on the
    CPU (the torch references need none). With `page_size` (the engine reads prefixes in place), each
    chunkable policy also prefills the prompt in two chunks, the second over pages of that size
    (`SparsePrefill.chunk_paged`)."""
    if device.type != "cuda":
        return
    gen = torch.Generator(device=device).manual_seed(0)
    for n in warm_up_lengths(config, max_len):
        q = torch.randn(num_heads, n, head_dim, device=device, dtype=dtype, generator=gen)
        k = torch.randn(num_kv_heads, n, head_dim, device=device, dtype=dtype, generator=gen)
        # every policy as configured, and `fixed` with the other block ranking (a per-request option), whose
        # kernels do not depend on the policy
        other = dataclasses.replace(config, ranking="queries" if config.ranking == "box" else "box")
        for policy, cfg in [(p, config) for p in SELECTIONS] + [("fixed", other)]:
            attn = SparsePrefill(policy, cfg)
            attn(1, q, k, k)
            if page_size is not None and attn.chunkable:
                warm_up_paged_chunk(attn, q, k, page_size)
    torch.cuda.synchronize(device)


def warm_up_paged_chunk(
    attn: SparsePrefill, q: torch.Tensor, k: torch.Tensor, page_size: int
) -> torch.Tensor:
    """Prefill ``q``'s prompt (keys = values = ``k [Hkv, N, d]``) in two chunks through layer 1, the second
    reading the first's keys from pages of `page_size` tokens (every head's pages in order) -> the
    second chunk's output."""
    hkv, n, d = k.shape
    cut = n // 2 // attn.segment_size * attn.segment_size
    pages = -(-n // page_size)
    pool = k.new_zeros(hkv, pages * page_size, d)
    pool[:, :n] = k
    pool = pool.reshape(hkv, pages, page_size, d).transpose(0, 1).contiguous()  # [pages, Hkv, ps, d]
    table = torch.arange(pages, device=k.device).expand(hkv, pages)
    attn.begin(2, n)
    attn.chunk(1, q[:, :cut], k[:, :cut], k[:, :cut], 0, n)
    prefix = PagedPrefix(pool, pool, table, k[:, cut:], k[:, cut:], cut, n, in_place=True)
    return attn.chunk_paged(1, q[:, cut:], prefix, cut, n)
