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


def test_a_transposed_table_reads_the_same() -> None:
    k = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    k_pages, _, table = page_keys(k, k, 8, 4)
    got = paged_block_reps(k_pages, table.t().contiguous().t(), 8, 8, backend="triton")
    torch.testing.assert_close(got[0], k.reshape(2, 8, 8, 16).amax(dim=2), atol=0, rtol=0)


def test_block_scores_refuses_too_few_key_reps() -> None:
    from entropyinfer.kernels.block_scoring import block_scores

    q, k = torch.randn(4, 96, 16, device=DEVICE), torch.randn(2, 160, 16, device=DEVICE)
    few = (k[:, :10], k[:, :10])  # the chunk's last segment sees 16 blocks
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match="key_reps must be"):
            block_scores(q, k, 32, 8, segment_offset=2, num_key_blocks=20, key_reps=few, backend=backend)


def test_table_too_short_raises() -> None:
    k = torch.randn(2, 40, 16, device=DEVICE)
    k_pages, _, table = page_keys(k, k, 8, 1)
    with pytest.raises(ValueError, match="the table covers"):
        paged_block_reps(k_pages, table[:, :2], 3, 8)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_block_scores_from_paged_reps_equal_scores_from_keys(backend: str) -> None:
    """A chunk profiled from the pages' block representations (keys only a zero-stride shape) scores as
    from the contiguous keys: same visible logits, entropy and softmax statistics."""
    from entropyinfer.kernels.block_scoring import block_scores

    seg, b, n, offset = 32, 8, 160, 2  # a chunk of segments 2..4 of a 160-token prompt
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(4, n - offset * seg, 16, generator=gen).to(DEVICE)
    k = torch.randn(2, n, 16, generator=gen).to(DEVICE)
    k_pages, _, table = page_keys(k, k, 16, 6)
    visible = (offset + 2) * seg // b  # blocks the chunk's last segment sees
    reps = paged_block_reps(k_pages, table, visible, b, backend=backend)  # type: ignore[arg-type]
    kw = dict(segment_offset=offset, num_key_blocks=n // b, row_invariant=True, backend=backend)
    want = block_scores(q, k, seg, b, **kw)  # type: ignore[arg-type]
    shape_only = k.new_empty(()).expand(2, n, 16)
    got = block_scores(q, shape_only, seg, b, key_reps=reps, **kw)  # type: ignore[arg-type]
    for name in ("entropy", "row_max", "row_sum"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=0, rtol=0)
    for i in range(3):  # the visible logits of each segment (the kernel leaves the others unwritten)
        sees = (offset + i) * seg // b
        torch.testing.assert_close(got.logits[:, i, :sees], want.logits[:, i, :sees], atol=0, rtol=0)
