"""Block counts and top-k selection kernels (`kernels/block_selection.py`) against their torch reference
(`block_selection_ref.py`).

``backend="triton"`` forces the kernels: without CUDA they run in Triton's interpreter (TRITON_INTERPRET=1 is
set in tests/conftest.py before triton is imported); with a CUDA device the same tests run compiled.
"""

from __future__ import annotations

import pytest
import torch

from entropyinfer.kernels.block_layout import num_segments, visible_blocks
from entropyinfer.kernels.block_selection import block_counts, select_blocks
from entropyinfer.kernels.block_selection_ref import (
    block_counts_ref,
    rigid_heads,
    rigid_so_far_ref,
    select_blocks_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


# ---------------------------------------------------------------------- mode `causal` (rigid so far)


def _causal_entropy(nseg: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    entropy = torch.exp(torch.empty(5, nseg).uniform_(-64.0, 1.6, generator=gen))  # 1e-28 .. 5 nats
    entropy[1] = 0.01 * 1.6 ** torch.arange(nseg)  # growing: the budget climbs
    entropy[2, 1:] = 1e-7  # rigid everywhere
    entropy[3, 1:] = 1e-7
    entropy[3, nseg // 2 :] = 1e-3  # rigid so far, then dynamic
    entropy[4, 1:] = 1e-7
    if nseg > 1:
        entropy[4, 1] = 2e-5  # above e_t at segment 1 only: never rigid so far, however low later
    return entropy


CAUSAL_CASES = [
    (1000, 64, 8, 256),  # ragged last segment, 16 segments
    (1024, 128, 8, 512),  # N a multiple of S
    (64, 64, 8, 0),  # one segment: nothing to profile, never rigid
    (130, 64, 8, 64),  # two full segments and a 2-token one
    (4100, 256, 16, 0),  # threshold 0
    (70000, 512, 8, 4096),  # 137 segments
]


@pytest.mark.parametrize(("seq_len", "seg", "b", "threshold"), CAUSAL_CASES)
def test_causal_counts_kernel_matches_reference(seq_len: int, seg: int, b: int, threshold: int) -> None:
    nseg = num_segments(seq_len, seg)
    entropy = _causal_entropy(nseg, seed=seq_len)
    kw = dict(
        seq_len=seq_len, segment_size=seg, block_size=b, threshold_len=threshold,
        entropy_threshold=1e-5, base_budget=256.0, alpha=0.5, delta=0.4, causal=True,
    )  # fmt: skip
    got = block_counts(entropy.to(DEVICE), **kw, backend="triton")  # type: ignore[arg-type]
    ref = block_counts_ref(entropy.to(DEVICE), **kw)  # type: ignore[arg-type]
    for name in ("rigid", "budgets", "counts", "kernel_counts", "dense_segments"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=0, msg=name)
    # rigid (reported) = the whole-prompt test; per segment: B0 while rigid so far, then the recurrence
    assert got.rigid.tolist() == rigid_heads(entropy, 1e-5).tolist()
    assert got.rigid.tolist()[1:] == [False, nseg >= 2, False, False]
    per_head = block_counts_ref(entropy, **{**kw, "causal": False})  # type: ignore[arg-type]
    so_far = rigid_so_far_ref(entropy, 1e-5)
    assert torch.equal(ref.budgets.cpu()[so_far], torch.full_like(ref.budgets.cpu()[so_far], 256.0))
    assert torch.equal(ref.budgets.cpu()[~so_far], per_head.budgets[~so_far])
    if nseg > 3:
        assert bool(so_far[3, 1]) and not bool(so_far[3, -1])
        assert bool(so_far[4, 1:].sum() == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("seq_len", "seg", "b", "threshold"), CAUSAL_CASES)
def test_causal_counts_do_not_change_when_segments_are_appended(
    backend: str, seq_len: int, seg: int, b: int, threshold: int
) -> None:
    """Counts of segments < s of a prompt are those of the prompt cut after s segments (the cut prompt's
    last segment is dense and capped differently: compare the segments before it)."""
    nseg = num_segments(seq_len, seg)
    entropy = _causal_entropy(nseg, seed=seq_len + 1).to(DEVICE)
    kw = dict(
        segment_size=seg, block_size=b, threshold_len=threshold, entropy_threshold=1e-5, base_budget=256.0,
        alpha=0.5, delta=0.4, causal=True, backend=backend,
    )  # fmt: skip
    full = block_counts(entropy, seq_len=seq_len, **kw)  # type: ignore[arg-type]
    for cut in sorted({1, 2, nseg // 2, nseg - 1} - {0}):
        part = block_counts(entropy[:, :cut].contiguous(), seq_len=cut * seg, **kw)  # type: ignore[arg-type]
        m = cut - 1
        assert torch.equal(part.counts[:, :m], full.counts[:, :m]), cut
        assert torch.equal(part.budgets[:, :m], full.budgets[:, :m]), cut


@pytest.mark.parametrize(
    ("hkv", "nseg", "seg", "b", "max_count", "off"), [(3, 5, 128, 8, 96, 11), (2, 1, 64, 8, 40, 3)]
)
def test_select_with_segment_offset_matches_reference(
    hkv: int, nseg: int, seg: int, b: int, max_count: int, off: int
) -> None:
    """A chunk's rows (segments off .. off + nseg - 1) against the whole prompt's width of logits."""
    nblk = (off + nseg + 2) * seg // b
    gen = torch.Generator().manual_seed(off)
    logits = (torch.randn(hkv, nseg, nblk, generator=gen) * 30).to(DEVICE)
    vis = visible_blocks(nseg, seg, b, "cpu", off).clamp(max=max_count)
    counts = (torch.rand(hkv, nseg, generator=gen) * (vis + 1)).floor().to(torch.int32).to(DEVICE)
    counts[0] = vis.to(torch.int32).to(DEVICE)
    got = select_blocks(logits, counts, seg, b, max_count, backend="triton", segment_offset=off)
    ref = select_blocks_ref(logits, counts, seg, b, max_count, segment_offset=off)
    assert torch.equal(got, ref)
    ids = ref.long()
    seen = visible_blocks(nseg, seg, b, DEVICE, off)
    assert bool(((ids < 0) | (ids < seen[None, :, None])).all())  # only blocks the segment sees
    assert bool(((ids >= 0).sum(-1) == counts).all())
