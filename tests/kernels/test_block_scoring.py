"""Entropy profiling kernels (`kernels/block_scoring.py`) against their torch reference
(`block_scoring_ref.py`).

``backend="triton"`` forces the kernels: without CUDA they run in Triton's interpreter (TRITON_INTERPRET=1 is
set in tests/conftest.py before triton is imported), in float32 / float16 on small shapes. With a CUDA device
the same tests run compiled, and `test_bf16_matches_reference_gpu` adds bf16 at a longer length.
"""

from __future__ import annotations

import pytest
import torch

from entropyinfer.kernels.block_layout import num_blocks, num_segments, visible_blocks
from entropyinfer.kernels.block_scoring import block_scores
from entropyinfer.kernels.block_scoring_ref import block_scores_ref, segment_block_reps_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rand_qk(hq: int, hkv: int, n: int, d: int, seed: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, n, d, generator=gen)
    k = torch.randn(hkv, n, d, generator=gen)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype)


def visible_mask(nseg: int, nblk: int, seg: int, b: int) -> torch.Tensor:
    vis = visible_blocks(nseg, seg, b, DEVICE)
    return torch.arange(nblk, device=DEVICE)[None, None, :] < vis[None, :, None]


# (Hq, Hkv, N, d, S, b): GQA groups 1, 4 and 8; ragged N (not a multiple of S nor of b); one full segment;
# one partial segment; N a multiple of S; d not a power of two
SHAPES = [
    (4, 4, 301, 16, 32, 8),
    (8, 2, 1000, 32, 64, 8),
    (16, 2, 517, 64, 64, 16),
    (8, 1, 64, 16, 64, 8),
    (4, 1, 37, 16, 64, 8),
    (4, 2, 256, 16, 64, 8),
    (6, 3, 203, 24, 32, 4),
]


@pytest.mark.parametrize(("hq", "hkv", "n", "d", "seg", "b"), SHAPES)
def test_scores_match_reference(hq: int, hkv: int, n: int, d: int, seg: int, b: int) -> None:
    q, k = rand_qk(hq, hkv, n, d, seed=n)
    got = block_scores(q, k, seg, b, backend="triton")
    ref = block_scores_ref(q, k, seg, b)
    nseg, nblk = num_segments(n, seg), num_blocks(n, seg, b)
    assert got.logits.shape == (hkv, nseg, nblk)
    assert got.entropy.shape == (hkv, nseg)
    vis = visible_mask(nseg, nblk, seg, b).expand(hkv, -1, -1)
    torch.testing.assert_close(got.logits[vis], ref.logits[vis], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.entropy, ref.entropy, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.probs(), ref.probs(), rtol=1e-4, atol=1e-6)


def test_reps_partial_last_segment() -> None:
    q, k = rand_qk(2, 1, 70, 8, seed=1)
    qmax, _, kmax, kmin = segment_block_reps_ref(q, k, 32, 8)
    assert qmax.shape == (2, 3, 8) and kmax.shape == (1, 8, 8)
    torch.testing.assert_close(qmax[:, 2], q[:, 64:].amax(dim=1))
    torch.testing.assert_close(kmin[:, 7], k[:, 56:64].amin(dim=1))


def test_fp16_inputs_match_reference() -> None:
    q, k = rand_qk(8, 2, 700, 32, seed=3, dtype=torch.float16)
    got = block_scores(q, k, 64, 8, backend="triton")
    ref = block_scores_ref(q, k, 64, 8)  # the reference scores the same fp16 values in float32
    vis = visible_mask(11, 80, 64, 8).expand(2, -1, -1)
    torch.testing.assert_close(got.logits[vis], ref.logits[vis], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got.entropy, ref.entropy, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_matches_reference_gpu() -> None:
    q, k = rand_qk(32, 8, 8192 + 77, 128, seed=0, dtype=torch.bfloat16)
    got = block_scores(q, k, 512, 8, backend="triton")
    ref = block_scores_ref(q, k, 512, 8)  # float32 scoring of the same bf16 values
    vis = visible_mask(17, 1024, 512, 8).expand(8, -1, -1)
    torch.testing.assert_close(got.logits[vis], ref.logits[vis], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got.entropy, ref.entropy, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- prefill chunks (segment_offset)

# (Hq, Hkv, N, d, S, b, chunk segments): chunks of 1 / 2 / 3 segments, a ragged last chunk, GQA 1 / 3 / 4
CHUNKED = [
    (4, 4, 301, 16, 32, 8, 1),
    (8, 2, 1000, 32, 64, 8, 3),
    (6, 2, 517, 64, 64, 16, 2),
    (6, 3, 203, 24, 32, 4, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("hq", "hkv", "n", "d", "seg", "b", "per"), CHUNKED)
def test_chunk_scores_kernel_matches_reference(
    hq: int, hkv: int, n: int, d: int, seg: int, b: int, per: int, dtype: torch.dtype
) -> None:
    """Each chunk of a prompt (queries from segment s0, keys from 0) scored by the kernels against the
    reference, and both against the rows of the whole prompt's profiling."""
    q, k = rand_qk(hq, hkv, n, d, seed=n + per, dtype=dtype)
    nseg, nblk = num_segments(n, seg), num_blocks(n, seg, b)
    whole = block_scores_ref(q, k, seg, b, spread_logit_scale=0.25, row_invariant=True)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    for s0 in range(0, nseg, per):
        q0, q1 = s0 * seg, min((s0 + per) * seg, n)
        kw = dict(segment_offset=s0, num_key_blocks=nblk, spread_logit_scale=0.25)
        got = block_scores(q[:, q0:q1], k[:, :q1], seg, b, backend="triton", **kw)  # type: ignore[arg-type]
        ref = block_scores(q[:, q0:q1], k[:, :q1], seg, b, backend="torch", row_invariant=True, **kw)  # type: ignore[arg-type]
        nc = ref.entropy.shape[1]
        assert got.logits.shape == ref.logits.shape == (hkv, nc, nblk) and got.segment_offset == s0
        vis = (
            torch.arange(nblk, device=DEVICE)[None, None, :]
            < visible_blocks(nc, seg, b, DEVICE, s0)[None, :, None]
        )
        vis = vis.expand(hkv, -1, -1)
        torch.testing.assert_close(got.logits[vis], ref.logits[vis], **tol)  # type: ignore[arg-type]
        torch.testing.assert_close(got.entropy, ref.entropy, **tol)  # type: ignore[arg-type]
        torch.testing.assert_close(got.spread, ref.spread, **tol)  # type: ignore[arg-type]
        torch.testing.assert_close(got.probs(), ref.probs(), **tol)  # type: ignore[arg-type]
        # the torch path, row-invariant: bit for bit the whole prompt's rows
        rows = slice(s0, s0 + nc)
        assert torch.equal(ref.logits[vis], whole.logits[:, rows][vis])
        assert whole.spread is not None and ref.spread is not None
        if DEVICE == "cpu":
            assert torch.equal(ref.entropy, whole.entropy[:, rows])
            assert torch.equal(ref.spread, whole.spread[:, rows])
        else:  # on an H200 the reductions over fewer rows differed in the last bit (spread 2026-12-02,
            # entropy 2026-12-04: 8 x 2 heads, N=1000, 3-segment chunks)
            torch.testing.assert_close(ref.entropy, whole.entropy[:, rows], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(ref.spread, whole.spread[:, rows], rtol=1e-6, atol=1e-6)


def test_chunk_scores_reject_missing_keys() -> None:
    q, k = rand_qk(4, 2, 300, 16, seed=0)
    with pytest.raises(ValueError, match="cover"):
        block_scores(q[:, 128:256], k[:, :100], 64, 8, segment_offset=2, num_key_blocks=32)
