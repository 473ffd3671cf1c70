"""Launch shapes (`kernels/tiling.py`): split counts, tile tables and the row chunk, all from shapes only."""

from __future__ import annotations

import pytest
import torch

from entropyinfer.kernels.tiling import (
    MAX_ROW_CHUNK,
    TileConfig,
    choose_num_splits,
    decode_tiles,
    pow2,
    row_chunk,
    scoring_tiles,
    select_tiles,
    sm_count,
    tile_config,
)


def test_choose_num_splits() -> None:
    # Few (sequence, head) pairs and a long cache: about 2 programs per SM.
    assert choose_num_splits(1, 8, 131072, 132) == 33
    assert choose_num_splits(4, 8, 8192, 132) == 8
    assert choose_num_splits(1, 3, 1 << 20, 132) == 64  # capped
    assert choose_num_splits(8, 3, 8192, 132, head_dim=64) == 16  # d = 64: 3 programs per SM
    # Enough programs already: one split for short caches, two from 512 keys on.
    assert choose_num_splits(256, 8, 256, 132) == 1
    assert choose_num_splits(256, 8, 1024, 132) == 2
    assert choose_num_splits(64, 8, 4096, 132) == 2
    assert choose_num_splits(256, 8, 4096, 132) == 2
    # Short cache: no split shorter than one 64-key tile.
    assert choose_num_splits(1, 3, 300, 132) == 4
    assert choose_num_splits(1, 1, 1, 132) == 1
    for b, h, lm in ((1, 3, 1024), (4, 8, 8192), (16, 8, 32768)):
        s = choose_num_splits(b, h, lm, 132)
        assert 1 <= s <= 64


def test_pow2_and_row_chunk() -> None:
    assert [pow2(n) for n in (0, 1, 2, 3, 16, 17)] == [1, 1, 2, 4, 16, 32]
    assert row_chunk(0) == 1 and row_chunk(1) == 1 and row_chunk(1000) == 1024
    assert row_chunk(4096) == MAX_ROW_CHUNK and row_chunk(10**6) == MAX_ROW_CHUNK  # longer rows loop


@pytest.mark.parametrize(("nseg", "nblk"), [(1, 0), (16, 120), (257, 16384)])
def test_scoring_and_select_tiles(nseg: int, nblk: int) -> None:
    gpu, cpu = scoring_tiles(nseg, nblk, 512, 8), scoring_tiles(nseg, nblk, 512, 8, cuda=False)
    assert gpu.rows == 1 and gpu.chunk == row_chunk(nblk) and (gpu.block_s, gpu.block_j) == (64, 64)
    assert cpu.rows >= 1 and cpu.chunk >= 1 and cpu.block_s >= 16 and cpu.block_j >= 16  # tl.dot needs 16
    for t in (gpu, cpu):
        assert all(pow2(v) == v for v in (t.seg_rows, t.blk_groups, t.block_s, t.block_j, t.rows, t.chunk))
    sel_gpu, sel_cpu = select_tiles(nseg, nblk), select_tiles(nseg, nblk, cuda=False)
    assert (sel_gpu.rows, sel_gpu.chunk, sel_gpu.warps) == (1, row_chunk(nblk), 8)
    assert sel_cpu.rows == pow2(min(nseg, 64)) and sel_cpu.chunk == pow2(min(max(nblk, 1), 4096))


def test_decode_and_prefill_tiles() -> None:
    assert decode_tiles(64, 2) == (128, 4, 2)
    assert decode_tiles(128, 2) == (64, 4, 3) and decode_tiles(128, 4) == (64, 4, 2)  # fp32: 2 stages
    assert decode_tiles(256, 2) == (32, 4, 2)
    assert tile_config(128, torch.bfloat16) == TileConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    assert tile_config(64, torch.float16) == TileConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    assert tile_config(128, torch.float32) == tile_config(256, torch.bfloat16)  # the small tiles
    assert sm_count(torch.device("cpu")) == 4
