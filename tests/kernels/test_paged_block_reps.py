"""Tests of key-block representations read from paged KV (`kernels/paged_block_reps.py`) and its reference:
the kernel (interpreted on the CPU) and the reference on a shuffled pool equal the max and min of the
contiguous keys' blocks bit for bit (min and max only pick elements), at page sizes below, at and above the
block size, ragged block counts and every head its own page order."""

from __future__ import annotations

import pytest
import torch
from test_paged_sparse_prefill import page_keys
from test_sparse_prefill import DEVICE

from entropyinfer.kernels.paged_block_reps import paged_block_reps
from entropyinfer.kernels.paged_block_reps_ref import paged_block_reps_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("hkv", "n", "d", "b", "ps", "blocks"), [
    (2, 200, 32, 8, 16, 23), (3, 129, 16, 8, 4, 16), (1, 300, 64, 16, 64, 18), (2, 64, 16, 8, 8, 0),
])  # fmt: skip
def test_paged_reps_equal_contiguous(
    hkv: int, n: int, d: int, b: int, ps: int, blocks: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(hkv * 1000 + n)
    k = torch.randn(hkv, n, d, generator=gen).to(DEVICE, dtype)
    k_pages, _, table = page_keys(k, k, ps, n)
    kb = k[:, : blocks * b].reshape(hkv, blocks, b, d)
    want_max, want_min = kb.amax(dim=2), kb.amin(dim=2)
    for got in (
        paged_block_reps(k_pages, table, blocks, b, backend="triton"),
        paged_block_reps_ref(k_pages, table, blocks, b),
    ):
        assert got[0].shape == (hkv, blocks, d) and got[0].dtype == dtype
        torch.testing.assert_close(got[0], want_max, atol=0, rtol=0)
        torch.testing.assert_close(got[1], want_min, atol=0, rtol=0)


def test_table_too_short_raises() -> None:
    k = torch.randn(2, 40, 16, device=DEVICE)
    k_pages, _, table = page_keys(k, k, 8, 1)
    with pytest.raises(ValueError, match="the table covers"):
        paged_block_reps(k_pages, table[:, :2], 3, 8)
