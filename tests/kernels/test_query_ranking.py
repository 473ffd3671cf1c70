"""Query ranking (`kernels/query_ranking.py`): the torch reference against a loop over queries written from
the definition, the Triton kernel (interpreted on the CPU, compiled on a GPU) against the reference on fresh
random inputs (ragged segments, chunk offsets, GQA groups, paged keys, more sampled rows than one tile), and
the selection it drives finding a block that one query needs and the box ranking misses."""

from __future__ import annotations

import math

import pytest
import torch

from entropyinfer.errors import ConfigError
from entropyinfer.kernels.backend import interpreter_ready
from entropyinfer.kernels.query_ranking import query_block_scores
from entropyinfer.kernels.query_ranking_ref import query_block_scores_ref, sampled_rows
from entropyinfer.policies.config import SparsePrefillConfig
from entropyinfer.policies.entropy import plan_layer, rank_blocks

needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreter_ready()), reason="needs a GPU or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (Hq, Hkv, keys, d, S, b, stride, segment_offset)
SHAPES = [
    (6, 2, 200, 32, 32, 8, 8, 0),  # ragged last segment
    (4, 1, 64, 16, 32, 8, 32, 0),  # one sampled query per segment
    (6, 3, 100, 64, 32, 8, 4, 2),  # a chunk from segment 2
    (8, 1, 300, 48, 128, 8, 4, 0),  # 8 x 32 = 256 sampled rows: two row tiles; d not a power of two
    (2, 2, 40, 16, 16, 16, 1, 1),  # every query sampled, b = S
]


def by_definition(q, k, s_len, b, stride, offset):
    """Loop over segments, sampled queries and heads, straight from the module docstring."""
    hq, nq, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    nseg = -(-nq // s_len)
    width = (offset + nseg - 1) * s_len // b
    out = torch.zeros(hkv, nseg, width, dtype=torch.float64)
    for s in range(nseg):
        vis = (offset + s) * s_len // b
        length = min(nq - s * s_len, s_len)
        for r in range(s_len // stride):
            t = s * s_len + min((r + 1) * stride - 1, length - 1)
            for hh in range(hq):
                if vis == 0:
                    continue
                x = (k[hh // g, : vis * b].double() @ q[hh, t].double()) / math.sqrt(d)
                p = torch.softmax(x.view(vis, b).amax(-1), dim=0)
                out[hh // g, s, :vis] = torch.maximum(out[hh // g, s, :vis], p)
    return out


def inputs(shape, seed, dtype=torch.float32, device="cpu"):
    hq, hkv, n, d, s_len, _, _, offset = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, n - offset * s_len, d, generator=gen) * 2
    k = torch.randn(hkv, n, d, generator=gen)
    return q.to(device, dtype), k.to(device, dtype)


def paged(k, page_size, seed):
    """``k [Hkv, N, d]`` scattered over a shuffled page pool with spare pages: (pool, table)."""
    hkv, n, d = k.shape
    pages = -(-n // page_size)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(hkv * pages + 3, generator=gen)[: hkv * pages].view(hkv, pages)
    pool = torch.full((hkv * pages + 3, hkv, page_size, d), float("nan"), dtype=k.dtype, device=k.device)
    for h in range(hkv):
        for p in range(pages):
            piece = k[h, p * page_size : (p + 1) * page_size]
            pool[ids[h, p], h, : piece.shape[0]] = piece
    return pool, ids.to(k.device, torch.int32)


def test_sampled_rows_take_every_strideth_query_and_a_partial_segment_repeats_its_last() -> None:
    rows = sampled_rows(20, 8, 4)
    assert rows.tolist() == [[3, 7], [11, 15], [19, 19]]


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_equals_the_definition(shape) -> None:
    *_, s_len, b, stride, offset = shape
    q, k = inputs(shape, seed=sum(shape))
    got = query_block_scores_ref(q, k, s_len, b, stride, segment_offset=offset)
    torch.testing.assert_close(
        got.double(), by_definition(q, k, s_len, b, stride, offset), rtol=1e-5, atol=1e-6
    )
    assert torch.all(got[:, 0 if offset else 1 :].amax(-1) > 0)  # every segment that sees blocks scores some


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_equals_the_reference(shape, dtype) -> None:
    *_, s_len, b, stride, offset = shape
    q, k = inputs(shape, seed=7 * sum(shape), dtype=dtype, device=DEVICE)
    ref = query_block_scores_ref(q, k, s_len, b, stride, segment_offset=offset)
    got = query_block_scores(q, k, s_len, b, stride, segment_offset=offset, backend="triton")
    tol = 2e-3 if dtype == torch.float16 or DEVICE == "cuda" else 1e-5
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES[:4])
@pytest.mark.parametrize("page_size", [16, 64])
def test_paged_keys_equal_contiguous_keys(shape, page_size) -> None:
    *_, s_len, b, stride, offset = shape
    q, k = inputs(shape, seed=3 * sum(shape), device=DEVICE)
    pool, table = paged(k, page_size, seed=page_size)
    ref = query_block_scores_ref(q, k, s_len, b, stride, segment_offset=offset)
    for backend in ("triton", "torch"):
        got = query_block_scores(q, pool, s_len, b, stride, segment_offset=offset, block_table=table,
                                 backend=backend)  # fmt: skip
        tol = 2e-3 if DEVICE == "cuda" else 1e-5
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


def test_width_and_bad_arguments() -> None:
    q, k = inputs(SHAPES[0], seed=1)
    wide = query_block_scores(q, k, 32, 8, 8, num_key_blocks=40)
    assert wide.shape == (2, 7, 40) and torch.all(wide[..., 24:] == 0)
    with pytest.raises(ValueError, match="stride"):
        query_block_scores(q, k, 32, 8, 5)
    with pytest.raises(ValueError, match="num_key_blocks"):
        query_block_scores(q, k, 32, 8, 8, num_key_blocks=10)
    with pytest.raises(ValueError, match="keys"):
        query_block_scores(q, k[:, :100], 32, 8, 8)


def test_selection_finds_the_block_one_query_needs() -> None:
    """One sampled query of a late segment matches one key far back; the box ranking (the segment's query
    max/min against the blocks' key max/min) leaves that block out at a small budget, query ranking takes
    it."""
    gen = torch.Generator().manual_seed(0)
    n, d, s_len = 512, 32, 64
    q = torch.randn(2, n, d, generator=gen)
    k = torch.randn(1, n, d, generator=gen)
    needle = torch.randn(d, generator=gen)
    loud = torch.randn(d, generator=gen).abs()
    loud -= (loud @ needle) / (needle @ needle) * needle  # orthogonal to the needle
    k[:, :64] += 6 * loud  # blocks 0-7: what the box (all queries' max/min) ranks first
    k[0, 101] = needle * 2  # in block 12
    q[0, 7 * s_len + 31] = needle * 4  # a sampled query (stride 8) of segment 7
    cfg = SparsePrefillConfig(segment_size=s_len, block_size=8, threshold_len=64, fixed_budget=16)
    picks = {}
    for ranking in ("box", "queries"):
        plan = plan_layer(q, k, cfg.__class__(**{**cfg.__dict__, "ranking": ranking}), policy="fixed")
        picks[ranking] = plan.block_idx[0, 7, : int(plan.counts[0, 7])].tolist()
    assert 12 in picks["queries"]
    assert 12 not in picks["box"]


def test_box_ranking_takes_any_stride_and_a_replica_needs_its_max() -> None:
    """The stride is checked only where it is used; a KV-head replica (block logits reduced over the
    replicas) cannot rank by queries without the max over them; a chunk with no sparse segment ranks
    nothing."""
    assert SparsePrefillConfig(segment_size=36, block_size=4).ranking_stride == 8  # box: not checked
    with pytest.raises(ConfigError, match="ranking_stride"):
        SparsePrefillConfig(segment_size=36, block_size=4, ranking="queries")
    q, k = inputs(SHAPES[0], seed=2)
    cfg = SparsePrefillConfig(
        segment_size=32, block_size=8, threshold_len=32, fixed_budget=16, ranking="queries"
    )
    with pytest.raises(ValueError, match="rank_reduce"):
        plan_layer(q, k, cfg, policy="fixed", logit_reduce=lambda x: x)
    assert rank_blocks(q[:, :64], k, cfg, 4) is None  # two segments: both dense
    assert rank_blocks(q, k, cfg, 24) is not None
