"""Entropy profiling kernels (`kernels/block_scoring.py`) against their torch reference (`*_ref.py`).

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set before triton is imported, here and in this
folder's conftest), in float32 / float16 on small shapes. With a CUDA device the same tests run compiled, and
`test_bf16_matches_reference_gpu` adds bf16 at a longer length.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from entropyinfer.kernels.block_scoring import (
    block_counts,
    block_scores,
    interpreter_ready,
    select_blocks,
)
from entropyinfer.kernels.block_scoring_ref import (
    block_counts_ref,
    block_scores_ref,
    num_blocks,
    num_segments,
    segment_block_reps_ref,
    select_blocks_ref,
    visible_blocks,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _triton_runs_here() -> None:
    if DEVICE == "cpu" and not interpreter_ready():
        pytest.fail(
            "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on CPU; "
            "set TRITON_INTERPRET=1 in the environment (or a conftest loaded before any test imports triton)"
        )


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


@pytest.mark.parametrize(
    ("seq_len", "seg", "b", "threshold", "fixed"),
    [
        (1000, 64, 8, 256, None),  # ragged last segment, 16 segments
        (1024, 128, 8, 512, None),  # N a multiple of S
        (64, 64, 8, 0, None),  # one segment: nothing to profile, never rigid
        (130, 64, 8, 64, None),  # two full segments and a 2-token one
        (4100, 256, 16, 0, None),  # threshold 0: every full segment may be sparse
        (1000, 64, 8, 256, 200.0),  # the fixed baseline
        (70000, 512, 8, 4096, None),  # 137 segments: more than one chunk of the rigid test
    ],
)
def test_block_counts_match_reference(
    seq_len: int, seg: int, b: int, threshold: int, fixed: float | None
) -> None:
    nseg = num_segments(seq_len, seg)
    gen = torch.Generator().manual_seed(seq_len + seg)
    # entropies over many scales, near-rigid ones included (H ~ 1e-28 .. 5 nats)
    entropy = torch.exp(torch.empty(4, nseg).uniform_(-64.0, 1.6, generator=gen))
    entropy[1] = 0.01 * 1.6 ** torch.arange(nseg)  # growing by 60% a segment: the budget climbs
    entropy[2, 1:] = 1e-7  # rigid (below e_t = 1e-5 after segment 0)
    entropy[3, 1:] = 1e-7
    entropy[3, -1] = 1e-5  # not rigid: one segment at the threshold
    kw = dict(
        seq_len=seq_len, segment_size=seg, block_size=b, threshold_len=threshold,
        entropy_threshold=1e-5, base_budget=256.0, alpha=0.5, delta=0.4, fixed_budget=fixed,
    )  # fmt: skip
    got = block_counts(entropy.to(DEVICE), **kw, backend="triton")  # type: ignore[arg-type]
    ref = block_counts_ref(entropy.to(DEVICE), **kw)  # type: ignore[arg-type]
    for name in ("rigid", "budgets", "counts", "kernel_counts", "dense_segments"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=0, msg=name)
    assert got.rigid.tolist() == [False, False, nseg >= 2, False]
    if fixed is None:
        assert bool((got.budgets >= 256).all()) and bool((got.budgets <= 768).all())
        if nseg > 4:
            assert float(got.budgets[1].max()) > 256  # the growing head gets more than B0
    assert bool((got.counts[:, 0] == 0).all())
    assert bool((got.kernel_counts[:, got.dense_segments] == -1).all())
    assert bool(got.dense_segments[-1]) and bool(got.dense_segments[0] == (threshold > 0 or nseg == 1))


def rand_counts(hkv: int, nseg: int, seg: int, b: int, max_count: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    vis = visible_blocks(nseg, seg, b, "cpu").clamp(max=max_count)
    counts = (torch.rand(hkv, nseg, generator=gen) * (vis + 1)).floor().to(torch.int32)
    counts[0] = vis.to(torch.int32)  # every visible block
    counts[-1, 1:] = 0  # none
    return counts.to(DEVICE)


@pytest.mark.parametrize(
    ("hkv", "nseg", "seg", "b", "max_count"), [(3, 16, 128, 8, 96), (2, 5, 64, 8, 40), (1, 1, 64, 8, 0)]
)
def test_select_matches_topk(hkv: int, nseg: int, seg: int, b: int, max_count: int) -> None:
    nblk = (nseg - 1) * seg // b
    gen = torch.Generator().manual_seed(nseg)
    logits = (torch.randn(hkv, nseg, nblk, generator=gen) * 30).to(DEVICE)
    counts = rand_counts(hkv, nseg, seg, b, max_count, seed=nseg)
    got = select_blocks(logits, counts, seg, b, max_count, backend="triton")
    ref = select_blocks_ref(logits, counts, seg, b, max_count)
    assert got.dtype == torch.int32 and got.shape == (hkv, nseg, max(max_count, 1))
    assert torch.equal(got, ref)  # continuous random scores: no ties, one answer


def test_select_with_ties_takes_top_values() -> None:
    hkv, nseg, seg, b = 2, 6, 64, 8
    nblk = (nseg - 1) * seg // b
    gen = torch.Generator().manual_seed(7)
    # few distinct values, negative and positive zero included: many ties at the threshold
    logits = torch.randint(-3, 3, (hkv, nseg, nblk), generator=gen).float()
    logits[logits == 0] = -0.0
    logits = logits.to(DEVICE)
    counts = rand_counts(hkv, nseg, seg, b, 40, seed=7)
    got = select_blocks(logits, counts, seg, b, 40, backend="triton")
    for h in range(hkv):
        for s in range(nseg):
            c, vis = int(counts[h, s]), s * seg // b
            ids = got[h, s, :c].long()
            assert bool((got[h, s, c:] == -1).all())
            assert ids.tolist() == sorted(set(ids.tolist())) and bool((ids < vis).all())
            top = logits[h, s, :vis].topk(c).values
            assert torch.equal(logits[h, s, ids].sort(descending=True).values, top)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_matches_reference_gpu() -> None:
    q, k = rand_qk(32, 8, 8192 + 77, 128, seed=0, dtype=torch.bfloat16)
    got = block_scores(q, k, 512, 8, backend="triton")
    ref = block_scores_ref(q, k, 512, 8)  # float32 scoring of the same bf16 values
    vis = visible_mask(17, 1024, 512, 8).expand(8, -1, -1)
    torch.testing.assert_close(got.logits[vis], ref.logits[vis], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got.entropy, ref.entropy, rtol=1e-4, atol=1e-4)
