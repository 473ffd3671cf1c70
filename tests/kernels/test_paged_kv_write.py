"""The decode step's KV write (`kernels/paged_kv_write.py`) against its torch reference.

``backend="triton"`` forces the kernel: without CUDA it runs in Triton's interpreter (float32 / float16);
with a CUDA device compiled, bfloat16 added. The whole pool is compared, so a write to a wrong slot fails.
"""

from __future__ import annotations

import pytest
import torch

from entropyinfer.kernels.paged_kv_write import paged_kv_write
from entropyinfer.kernels.paged_kv_write_ref import paged_kv_write_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def destinations(batch: int, hkv: int, pages: int, ps: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct (page, offset) slots per KV head for the batch's sequences, as the page tables give."""
    out = torch.empty(2, batch, hkv, dtype=torch.long)
    for h in range(hkv):
        slots = torch.randperm(pages * ps, generator=gen)[:batch]
        out[0, :, h], out[1, :, h] = slots // ps, slots % ps
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "hkv", "d", "ps", "pages"),
    [(1, 1, 64, 16, 1), (3, 8, 128, 16, 5), (17, 3, 64, 1, 20), (5, 2, 100, 7, 3), (2, 4, 32, 128, 2)],
)
def test_kernel_writes_exactly_what_the_reference_writes(
    dtype: torch.dtype, batch: int, hkv: int, d: int, ps: int, pages: int
) -> None:
    gen = torch.Generator().manual_seed(batch * 1000 + hkv * 10 + d)
    pool = torch.randn(2, pages + 1, hkv, ps, d, generator=gen).to(DEVICE, dtype)
    # k and v as views of one fused projection output (strided rows), in float32 (cast on store)
    fused = torch.randn(batch, 3, hkv, d + 5, generator=gen).to(DEVICE)
    k, v = fused[:, 0, :, :d], fused[:, 2, :, :d]
    page, offset = destinations(batch, hkv, pages + 1, ps, gen).to(DEVICE)
    want = pool.clone()
    paged_kv_write_ref(k, v, want, page, offset)
    got = pool.clone()
    paged_kv_write(k, v, got, page.int(), offset.t().contiguous().t(), backend="triton")  # int32, strided
    assert torch.equal(got, want)
    assert not torch.equal(got, pool)  # something was written


def test_an_empty_batch_writes_nothing() -> None:
    pool = torch.randn(2, 3, 2, 4, 16, device=DEVICE)
    k = torch.empty(0, 2, 16, device=DEVICE)
    idx = torch.empty(0, 2, dtype=torch.long, device=DEVICE)
    got = pool.clone()
    paged_kv_write(k, k, got, idx, idx, backend="triton")
    assert torch.equal(got, pool)


@pytest.mark.parametrize(
    ("k_shape", "pool_shape", "idx_shape", "match"),
    [
        ((2, 2, 16), (3, 2, 4, 16), (2, 2), "kv_pages must be"),
        ((2, 3, 16), (2, 3, 2, 4, 16), (2, 2), "k and v must be"),
        ((2, 2, 8), (2, 3, 2, 4, 16), (2, 2), "k and v must be"),
        ((2, 2, 16), (2, 3, 2, 4, 16), (3, 2), "page and offset must be"),
    ],
)
def test_bad_shapes_are_refused_with_their_sizes(
    k_shape: tuple[int, ...], pool_shape: tuple[int, ...], idx_shape: tuple[int, ...], match: str
) -> None:
    k = torch.zeros(*k_shape, device=DEVICE)
    idx = torch.zeros(*idx_shape, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        paged_kv_write(k, k, torch.zeros(*pool_shape, device=DEVICE), idx, idx, backend="triton")


def test_float_page_ids_are_refused() -> None:
    k, idx = torch.zeros(2, 2, 16, device=DEVICE), torch.zeros(2, 2, device=DEVICE)
    with pytest.raises(ValueError, match="integer"):
        paged_kv_write(k, k, torch.zeros(2, 3, 2, 4, 16, device=DEVICE), idx, idx.long(), backend="triton")
