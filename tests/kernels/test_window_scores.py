"""Tests of the fused observation-window scores (`kernels/window_scores.py`) and its reference: both equal a
per-query float64 softmax on fresh random inputs, with ragged lengths, windows longer than a head's
length, GQA groups and windows of sizes that are not powers of two, key counts off the tile size, several
log-sum-exp programs per head, and a sequence-parallel split whose two spans, combined, give the whole."""

from __future__ import annotations

import pytest
import torch
from test_sparse_prefill import DEVICE

from entropyinfer.kernels.window_scores import (
    TILES,
    window_lse,
    window_probs,
    window_scores,
)
from entropyinfer.kernels.window_scores_ref import (
    window_lse_ref,
    window_probs_ref,
    window_scores_ref,
)


def naive(q_obs: torch.Tensor, keys: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """float64, one query at a time: mean over the window's queries of their softmax over visible keys."""
    h, g, w, d = q_obs.shape
    out = torch.zeros(h, g, keys.shape[1], dtype=torch.float64)
    for hi in range(h):
        qs = [i for i in range(w) if lengths[hi] - w + i >= 0]
        for gi in range(g):
            for i in qs:
                pos = lengths[hi] - w + i
                logits = keys[hi, : pos + 1].double() @ q_obs[hi, gi, i].double() * d**-0.5
                out[hi, gi, : pos + 1] += torch.softmax(logits, 0) / len(qs)
    return out


CASES = [  # (H, G, W, d, S, lengths)
    (2, 4, 32, 16, 100, [100, 37]),
    (3, 3, 20, 32, 130, [5, 130, 64]),  # a head shorter than its window; G and W not powers of two
    (1, 1, 1, 64, 65, [65]),
    (1, 8, 32, 16, 70, [70]),  # 8 query heads a KV head: two tiles of groups
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("h", "g", "w", "d", "s", "lengths"), CASES)
def test_window_scores_equal_a_per_query_softmax(
    h: int, g: int, w: int, d: int, s: int, lengths: list[int], dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(h * 100 + s)
    q = (torch.randn(h, g, w, d, generator=gen) * 2).to(DEVICE, dtype)
    k = torch.randn(h, s, d, generator=gen).to(DEVICE, dtype)
    lens = torch.tensor(lengths)
    want = naive(q.float().cpu(), k.float().cpu(), lengths).float()
    one_head_at_a_time = window_probs_ref(q, k, lens, window_lse_ref(q, k, lens), max_elements=1)
    for got in (
        window_scores(q, k, lens, backend="triton"),
        window_scores_ref(q, k, lens),
        one_head_at_a_time,
    ):
        assert got.shape == (h, g, s) and got.dtype == torch.float32
        torch.testing.assert_close(got.cpu(), want, atol=2e-6, rtol=1e-4)


def test_several_programs_per_head_combine(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 2, 16, 16, generator=gen).to(DEVICE)
    k = torch.randn(2, 300, 16, generator=gen).to(DEVICE)
    lens = torch.tensor([300, 190], device=DEVICE)
    want = window_lse_ref(q, k, lens)
    for per in (128, 256, 384):
        torch.testing.assert_close(window_lse(q, k, lens, keys_per_split=per, backend="triton"), want)
    monkeypatch.setattr(TILES, "probs_keys", 2 * TILES.block_s)  # programs a head, the last one short
    torch.testing.assert_close(
        window_probs(q, k, lens, want, backend="triton"), window_probs_ref(q, k, lens, want)
    )
    with pytest.raises(ValueError, match="positive multiple of"):
        window_lse(q, k, lens, keys_per_split=100, backend="triton")


def test_two_spans_with_a_combined_lse_give_the_whole() -> None:
    """A sequence-parallel split: each rank's span (start, count) scored with the log-sum-exp over both."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 3, 24, 16, generator=gen).to(DEVICE)
    k = torch.randn(2, 150, 16, generator=gen).to(DEVICE)
    lens = torch.tensor([150, 90], device=DEVICE)
    cut = torch.tensor([80, 40], device=DEVICE)
    width = int((lens - cut).max())
    spans = [  # (starts, counts, keys padded to a common width)
        (torch.zeros(2, dtype=torch.long, device=DEVICE), cut, k[:, :80]),
        (cut, lens - cut, torch.stack([torch.nn.functional.pad(k[i, c:], (0, 0, 0, width - (150 - c)))
                                       for i, c in enumerate(cut.tolist())])),
    ]  # fmt: skip
    for backend in ("triton", "torch"):
        local = [window_lse(q, ks, lens, starts=st, counts=cn, backend=backend) for st, cn, ks in spans]
        lse = torch.stack(local).logsumexp(dim=0)
        torch.testing.assert_close(lse, window_lse_ref(q, k, lens))
        parts = [
            window_probs(q, ks, lens, lse, starts=st, counts=cn, backend=backend) for st, cn, ks in spans
        ]
        whole = window_scores_ref(q, k, lens)
        for i, c in enumerate(cut.tolist()):
            torch.testing.assert_close(parts[0][i, :, :c], whole[i, :, :c])
            n = int(lens[i]) - c
            torch.testing.assert_close(parts[1][i, :, :n], whole[i, :, c : c + n])
            assert not parts[1][i, :, n:].any()  # padding past a span's count scores 0


def test_refuses_mismatched_shapes() -> None:
    q, k = torch.randn(2, 2, 8, 16, device=DEVICE), torch.randn(3, 40, 16, device=DEVICE)
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match="do not match"):
            window_scores(q, k, torch.tensor([40, 40]), backend=backend)
    with pytest.raises(ValueError, match="lse must be"):
        window_probs_ref(q, k[:2], torch.tensor([40, 40]), torch.zeros(2, 2, 7, device=DEVICE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_matches_the_reference_at_a_production_shape() -> None:
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(8, 4, 32, 128, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(8, 9000, 128, generator=gen).to("cuda", torch.bfloat16)
    lens = torch.tensor([9000, 8999, 4097, 31, 1, 5000, 8000, 64])
    got, want = window_scores(q, k, lens), window_scores_ref(q, k, lens)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=2e-3)
    torch.testing.assert_close(got.sum(-1), torch.ones(8, 4, device="cuda"), atol=1e-4, rtol=0)
