"""Launch shapes of the kernels: tile sizes, warps, stages and split counts, chosen from shapes only.

- Profiling and selection (`block_scoring`, `block_selection`): `scoring_tiles`, `select_tiles`, and
  `row_chunk`, the GPU row kernels' chunk (a compile-time constant: the warm-up derives its lengths from it).
- Decode (`decode_attention`): `choose_num_splits` (split-K), `decode_tiles`, `sm_count`.
- Paged decode (`paged_decode_attention`): `choose_paged_num_splits`, `paged_decode_tiles`.
- Sparse prefill (`sparse_prefill`): `TileConfig`, `tile_config`.

GPU choices were measured on an H200; under the interpreter (CPU tensors) the tiles are few and large, since
every operation of every program is a numpy call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = [
    "MAX_ROW_CHUNK",
    "ScoringTiles",
    "SelectTiles",
    "TileConfig",
    "choose_num_splits",
    "choose_paged_num_splits",
    "decode_tiles",
    "paged_decode_tiles",
    "pow2",
    "row_chunk",
    "scoring_tiles",
    "select_tiles",
    "sm_count",
    "tile_config",
]


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 for the interpreter (few splits keep CPU tests fast)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 4


# ----------------------------------------------------------------------------------------------------
# profiling and selection

MAX_ROW_CHUNK = 4096  # blocks per step of the entropy and selection kernels on GPU; longer rows loop


def row_chunk(nblocks: int) -> int:
    """The GPU row kernels' chunk for rows of `nblocks` blocks. It is a compile-time constant, as is whether
    a row fits one chunk (``nblocks <= row_chunk(nblocks)``): each distinct pair is one more compile."""
    return min(pow2(max(nblocks, 1)), MAX_ROW_CHUNK)


@dataclass(frozen=True)
class ScoringTiles:
    """Tile sizes and launch parameters of the profiling kernels (`block_scoring`)."""

    seg_groups: int  # query segments per `_minmax_kernel` program
    seg_rows: int  # query rows of a segment loaded per step
    blk_groups: int  # key blocks per `_minmax_kernel` program
    reps_warps: int
    block_s: int  # segments per `_logits_kernel` tile
    block_j: int  # blocks per `_logits_kernel` tile
    logits_warps: int
    logits_stages: int
    rows: int  # segments per `_entropy_kernel` program
    chunk: int  # blocks per step along a row in `_entropy_kernel`
    row_warps: int


def scoring_tiles(
    nseg: int, nblocks: int, segment_size: int, block_size: int, dim: int = 128, *, cuda: bool = True
) -> ScoringTiles:
    """GPU: tensor-core tiles of 64 segments x 64 blocks (d <= 128), one row per program for the row kernel.
    Interpreter (CPU): few, large programs."""
    block_d = max(pow2(dim), 16)
    nblk = max(nblocks, 1)
    if cuda:
        return ScoringTiles(
            # measured at 128k (32/8 heads, d=128, bf16): query reps 0.30 ms with 8-row steps (1 GB read),
            # key reps 0.09 ms with 8 blocks a program
            seg_groups=1,
            seg_rows=max(min(pow2(segment_size), 1024 // block_d), 1),
            blk_groups=max(min(64, 8192 // (block_d * pow2(block_size))), 1),
            reps_warps=4,
            block_s=64,
            block_j=64 if block_d > 64 else 128,
            logits_warps=4,
            logits_stages=2,
            rows=1,
            chunk=row_chunk(nblk),
            row_warps=8,
        )
    return ScoringTiles(
        seg_groups=pow2(min(nseg, 16)),
        seg_rows=pow2(segment_size),
        blk_groups=pow2(min(nblk, 256)),
        reps_warps=4,
        block_s=max(pow2(min(nseg, 64)), 16),
        block_j=max(pow2(min(nblk, 256)), 16),
        logits_warps=4,
        logits_stages=1,
        rows=pow2(min(nseg, 64)),
        chunk=pow2(min(nblk, 4096)),
        row_warps=4,
    )


@dataclass(frozen=True)
class SelectTiles:
    """Launch parameters of the top-k selection kernel (`block_selection`)."""

    rows: int  # segments per `_select_kernel` program
    chunk: int  # blocks per step along a row; a row within one chunk stays in registers
    warps: int


def select_tiles(nseg: int, nblocks: int, *, cuda: bool = True) -> SelectTiles:
    """GPU: one row per program, `row_chunk` blocks a step. Interpreter (CPU): few, large programs."""
    nblk = max(nblocks, 1)
    if cuda:
        return SelectTiles(rows=1, chunk=row_chunk(nblk), warps=8)
    return SelectTiles(rows=pow2(min(nseg, 64)), chunk=pow2(min(nblk, 4096)), warps=4)


# ----------------------------------------------------------------------------------------------------
# decode

# Split heuristics (see `choose_num_splits`), fitted on an H200 (132 SMs) in bf16.
_PROGRAMS_PER_SM = 2
_TWO_SPLITS_FROM = 512
_MIN_KEYS_PER_SPLIT = 64
_MAX_SPLITS = 64


def choose_num_splits(batch: int, num_kv_heads: int, l_max: int, sm_count: int, head_dim: int = 128) -> int:
    """Splits per (sequence, KV head) of decode attention for a dense-ish batch; static for a given shape.

    About ``_PROGRAMS_PER_SM`` programs per SM in all (3 for ``d <= 64``, whose keys are half the bytes),
    at least 2 splits once ``L_max >= _TWO_SPLITS_FROM``, at most one ``_MIN_KEYS_PER_SPLIT``-key tile of
    ``L_max`` per split and ``_MAX_SPLITS``. Depends on shapes only (never on ``lengths``' values), so one
    captured graph serves every step. Batches with very uneven lengths run 10-20% faster with 2-8x more
    splits (pass ``num_splits``); the kernel cannot see that from shapes.
    """
    per_sm = _PROGRAMS_PER_SM + (1 if head_dim <= 64 else 0)
    want = round(per_sm * sm_count / max(1, batch * num_kv_heads))
    if l_max >= _TWO_SPLITS_FROM:
        want = max(want, 2)
    by_length = max(1, l_max // _MIN_KEYS_PER_SPLIT)
    return max(1, min(want, by_length, _MAX_SPLITS))


def decode_tiles(block_d: int, elem_bytes: int) -> tuple[int, int, int]:
    """``(BLOCK_N, num_warps, num_stages)`` of the decode split kernel, measured on an H200 in bf16.

    K and V tiles of 16 KiB each (128 x 64 or 64 x 128 bf16), 4 warps; 3 stages at ``d = 128``, 2 at
    ``d = 64`` and for float32 (shared memory).
    """
    if block_d <= 64:
        return 128, 4, 2
    if block_d <= 128:
        return 64, 4, (2 if elem_bytes > 2 else 3)
    return 32, 4, 2


# ----------------------------------------------------------------------------------------------------
# sparse prefill


@dataclass(frozen=True)
class TileConfig:
    """Sparse prefill tile shape and launch parameters. ``block_m`` counts stacked rows (G heads x
    positions)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def tile_config(head_dim: int, dtype: torch.dtype) -> TileConfig:
    """Default sparse prefill tiles, keyed on head dim and dtype (Hopper-minded; sweep with ``config=``).

    16-bit, d <= 64: 128 x 64 tiles, 4 warps. 16-bit, d = 128: 128 x 64 tiles, 8 warps (two warpgroups of
    64 rows keep the 128 x 128 float32 accumulator at 64 registers a thread). 3 stages: K and V tiles of
    16 KiB each (d = 128, bf16) x 3 plus the Q tile is about 128 KiB of shared memory. float32 (not a speed
    path) and d > 128 use smaller tiles.
    """
    if dtype == torch.float32 or head_dim > 128:
        return TileConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return TileConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    return TileConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)


# ----------------------------------------------------------------------------------------------------
# paged decode


def choose_paged_num_splits(
    batch: int, num_kv_heads: int, max_pages: int, page_size: int, sm_count: int, head_dim: int = 128
) -> int:
    """Splits per (sequence, KV head) of paged decode attention (`paged_decode_attention`).

    The paged kernel walks a head's keys in the same tiles as the contiguous one, so the split rule is
    `choose_num_splits` with the table's capacity ``max_pages * page_size`` as ``L_max``: shapes only, one
    captured graph per (batch, max_pages) serves every step.
    """
    return choose_num_splits(batch, num_kv_heads, max_pages * page_size, sm_count, head_dim)


def paged_decode_tiles(block_d: int, elem_bytes: int, page_size: int) -> tuple[int, int, int]:
    """``(BLOCK_N, num_warps, num_stages)`` of the paged decode split kernel.

    The contiguous kernel's tiles (`decode_tiles`): a tile gathers its keys row by row through the block
    table, so any power-of-two page size works with any ``BLOCK_N`` (a tile spans several small pages or
    part of a large one); ``page_size`` is an argument so that a measured per-page-size choice has a home.
    """
    del page_size
    return decode_tiles(block_d, elem_bytes)
