"""Tests of block-sparse prefill over paged KV (`kernels/paged_sparse_prefill.py`) and its torch reference.

The kernel (Triton's interpreter on the CPU, float32/float16) reading a shuffled page pool must equal the
contiguous kernel and the contiguous reference on the same keys laid out in order: chunks at an offset,
ragged lengths (the last page partly filled, a tail past the last block), page sizes below, equal to and
above the key tile, GQA groups that are not a power of two, and a pool whose pages hold other heads' data.
"""

from __future__ import annotations

import pytest
import torch
from test_sparse_prefill import DEVICE, assert_close, make_blocks, make_qkv

from entropyinfer.kernels.paged_sparse_prefill import paged_sparse_prefill_attention
from entropyinfer.kernels.paged_sparse_prefill_ref import gather_pages_ref, paged_sparse_prefill_attention_ref
from entropyinfer.kernels.sparse_prefill import sparse_prefill_attention
from entropyinfer.kernels.sparse_prefill_ref import sparse_prefill_attention_ref


def page_keys(
    k: torch.Tensor, v: torch.Tensor, page_size: int, seed: int, spare: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k, v [Hkv, N, d]`` written into a pool with `spare` extra pages of noise, each head's pages in a
    random order of its own -> ``(k_pages, v_pages, table [Hkv, P] int32)``."""
    hkv, n, d = k.shape
    per_head = -(-n // page_size)
    pages = hkv * per_head + spare
    gen = torch.Generator().manual_seed(seed)
    k_pages = torch.randn(pages, hkv, page_size, d, generator=gen).to(DEVICE, k.dtype) * 50
    v_pages = torch.randn(pages, hkv, page_size, d, generator=gen).to(DEVICE, k.dtype) * 50
    order = torch.randperm(pages, generator=gen)[: hkv * per_head].reshape(hkv, per_head)
    pad = per_head * page_size - n
    for h in range(hkv):
        for t, x in ((k_pages, k), (v_pages, v)):
            # the last page's slots past N hold NaN: a kernel reading past kv_len fails by construction
            rows = torch.cat([x[h], x.new_full((pad, d), float("nan"))]).reshape(per_head, page_size, d)
            t[order[h].to(DEVICE), h] = rows
    return k_pages, v_pages, order.to(torch.int32).to(DEVICE)


CASES = [
    # hq, hkv, d, n_total, q_offset, seg, b, page_size, mode
    (4, 2, 32, 200, 0, 32, 8, 16, "random"),
    (6, 2, 16, 181, 64, 32, 8, 8, "mixed"),  # G=3, a chunk at 64, ragged end
    (2, 2, 32, 250, 128, 64, 16, 64, "random"),  # page larger than a key tile
    (8, 1, 16, 129, 96, 32, 8, 4, "all"),  # one KV head, tiny pages
    (4, 4, 16, 96, 32, 32, 8, 32, "zero"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("hq", "hkv", "d", "n", "q_offset", "seg", "b", "ps", "mode"), CASES)
def test_paged_kernel_equals_contiguous(
    hq: int, hkv: int, d: int, n: int, q_offset: int, seg: int, b: int, ps: int, mode: str, dtype: torch.dtype
) -> None:
    seed = hash((hq, hkv, n, q_offset, ps, mode)) % 10_000
    q, k, v = make_qkv(hq, hkv, n, d, dtype, seed)
    q = q[:, q_offset:]
    idx, cnt = make_blocks(hkv, n, seg, b, mode, seed + 1)
    k_pages, v_pages, table = page_keys(k, v, ps, seed + 2)
    kw = {"segment_size": seg, "block_size": b, "q_offset": q_offset}
    out = paged_sparse_prefill_attention(
        q, k_pages, v_pages, table, idx, cnt, kv_len=n, backend="triton", **kw
    )
    contiguous = sparse_prefill_attention(q, k, v, idx, cnt, backend="triton", **kw)
    ref = sparse_prefill_attention_ref(q, k, v, idx, cnt, **kw)
    assert_close(out, ref, dtype)
    assert_close(out, contiguous, dtype)
    paged_ref = paged_sparse_prefill_attention_ref(q, k_pages, v_pages, table, idx, cnt, kv_len=n, **kw)
    torch.testing.assert_close(paged_ref, ref, atol=0, rtol=0)


def test_table_wider_than_needed_and_int64() -> None:
    """A table with pages past kv_len (the sequence's pages reach further) and int64 ids reads the same."""
    q, k, v = make_qkv(4, 2, 100, 16, torch.float32, 7)
    idx, cnt = make_blocks(2, 100, 32, 8, "random", 8)
    k_pages, v_pages, table = page_keys(k, v, 16, 9, spare=6)
    # two more columns per head naming a page outside the pool: reading past the used part would fault
    spare = torch.full((2, 2), k_pages.shape[0] + 1000, dtype=torch.long, device=DEVICE)
    wide = torch.cat([table.long(), spare], dim=1)
    kw = {"segment_size": 32, "block_size": 8}
    out = paged_sparse_prefill_attention(
        q, k_pages, v_pages, wide, idx, cnt, kv_len=100, backend="triton", **kw
    )
    assert_close(out, sparse_prefill_attention_ref(q, k, v, idx, cnt, **kw), torch.float32)


def test_a_transposed_table_reads_the_same() -> None:
    """A table that is not row-contiguous (a column-major copy) gives the same output."""
    q, k, v = make_qkv(4, 2, 100, 16, torch.float32, 17)
    idx, cnt = make_blocks(2, 100, 32, 8, "random", 18)
    k_pages, v_pages, table = page_keys(k, v, 16, 19)
    column_major = table.t().contiguous().t()
    assert column_major.stride(1) != 1
    kw = {"segment_size": 32, "block_size": 8}
    out = paged_sparse_prefill_attention(
        q, k_pages, v_pages, column_major, idx, cnt, kv_len=100, backend="triton", **kw
    )
    assert_close(out, sparse_prefill_attention_ref(q, k, v, idx, cnt, **kw), torch.float32)


def test_gather_pages_ref_reads_in_order_and_checks_ids() -> None:
    _, k, _ = make_qkv(2, 3, 37, 16, torch.float32, 1)
    k_pages, _, table = page_keys(k, k, 8, 2)
    torch.testing.assert_close(gather_pages_ref(k_pages, table, 37), k, atol=0, rtol=0, equal_nan=True)
    bad = table.clone()
    bad[1, 0] = k_pages.shape[0]
    with pytest.raises(ValueError, match="page ids"):
        gather_pages_ref(k_pages, bad, 37)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("short_table", "covers"),
        ("page_size", "power of two"),
        ("table_heads", "block_table must be"),
        ("kv_len", "keys must cover"),
        ("v_dtype", "must match k_pages"),
    ],
)
def test_bad_arguments_raise(change: str, message: str) -> None:
    q, k, v = make_qkv(4, 2, 64, 16, torch.float32, 3)
    idx, cnt = make_blocks(2, 64, 32, 8, "random", 4)
    k_pages, v_pages, table = page_keys(k, v, 16, 5)
    kv_len = 64
    if change == "short_table":
        table = table[:, :2]
    elif change == "page_size":
        k_pages, v_pages = k_pages[:, :, :12], v_pages[:, :, :12]
    elif change == "table_heads":
        table = table[:1]
    elif change == "v_dtype":
        v_pages = v_pages.double()
    else:
        kv_len = 40
    with pytest.raises(ValueError, match=message):
        paged_sparse_prefill_attention(
            q, k_pages, v_pages, table, idx, cnt, kv_len=kv_len, segment_size=32, block_size=8
        )
