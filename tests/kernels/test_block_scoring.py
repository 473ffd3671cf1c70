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
