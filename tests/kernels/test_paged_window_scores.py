"""Tests of the paged observation-window scores (`kernels/paged_window_scores.py`) and its reference: several
layers through one page table equal the contiguous `window_scores_ref` of each layer's gathered keys, on a
noisy pool with each head its own page order; and on the GPU, a sequence of another length compiles
nothing new."""

from __future__ import annotations

import pytest
import torch
from test_sparse_prefill import DEVICE

from entropyinfer.kernels.paged_window_scores import paged_window_scores
from entropyinfer.kernels.paged_window_scores_ref import paged_window_scores_ref
from entropyinfer.kernels.window_scores_ref import window_scores_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("nl", "h", "g", "w", "d", "ps", "pages"), [
    (3, 2, 4, 32, 16, 16, 7), (2, 3, 3, 20, 32, 8, 20), (1, 1, 1, 1, 16, 64, 2),
])  # fmt: skip
def test_paged_scores_of_several_layers_equal_the_gathered_keys(
    nl: int, h: int, g: int, w: int, d: int, ps: int, pages: int, dtype: torch.dtype
) -> None:
    """Every layer at once through one page table (each head its own page order in a noisy pool) equals
    `window_scores` of each layer's keys gathered: ragged lengths per (layer, head), a head shorter than
    the window, a length ending inside a page."""
    gen = torch.Generator().manual_seed(nl * 100 + pages)
    pool = torch.randn(nl, pages * h + 3, h, ps, d, generator=gen).to(DEVICE, dtype)
    table = torch.stack([torch.randperm(pages * h + 3, generator=gen)[:pages] for _ in range(h)]).to(DEVICE)
    top = pages * ps
    lengths = torch.randint(1, top + 1, (nl, h), generator=gen)
    lengths[0, 0], lengths[-1, -1] = top, min(3, top)
    q = torch.randn(nl, h, g, w, d, generator=gen).to(DEVICE, dtype)
    heads = torch.arange(h, device=DEVICE)[:, None]
    want = torch.stack(
        [window_scores_ref(q[li], pool[li][table, heads].reshape(h, top, d), lengths[li]) for li in range(nl)]
    )
    for got in (
        paged_window_scores(q, pool, table, lengths, backend="triton"),
        paged_window_scores_ref(q, pool, table, lengths),
    ):
        assert got.shape == (nl, h, g, top)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-4)


def test_paged_scores_refuse_a_length_past_the_table() -> None:
    q, pool = torch.randn(1, 2, 2, 8, 16, device=DEVICE), torch.randn(1, 6, 2, 8, 16, device=DEVICE)
    table = torch.tensor([[0, 1], [2, 3]], device=DEVICE)
    with pytest.raises(ValueError, match="exceeds the table"):
        paged_window_scores(q, pool, table, torch.tensor([[16, 17]]), backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_paged_scores_of_another_length_compile_nothing_new() -> None:
    """A compression runs mid-decode: scoring a sequence of another length (other page-table widths,
    strides off multiples of 16) after a first one compiles no Triton kernel (a compile costs about 1 s)."""
    import triton

    def score(pages: int, length: int) -> None:
        pool = torch.randn(4, 2 * pages + 5, 8, 16, 128, device="cuda", dtype=torch.bfloat16)
        table = torch.randperm(2 * pages + 5, device="cuda")[:pages][None].expand(8, -1).contiguous()
        q = torch.randn(4, 8, 4, 32, 128, device="cuda", dtype=torch.bfloat16)
        paged_window_scores(q, pool, table, torch.full((4, 8), length, device="cuda"))
        torch.cuda.synchronize()

    score(1024, 16380)
    compiled: list[str] = []
    knobs = triton.knobs.runtime
    before = knobs.jit_post_compile_hook
    knobs.jit_post_compile_hook = lambda *a, **kw: compiled.append(str(kw.get("repr"))[:300]) and None
    try:
        score(8193, 131070)
        score(333, 5321)
    finally:
        knobs.jit_post_compile_hook = before
    assert compiled == []
