"""Learned segment shares (`policies/segment_shares.py`): where a plan kept positions, the running table
and its rate limit, the wire format, and the split of a prefix budget over segments."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from entropyinfer.policies.kv_compression import select_positions
from entropyinfer.policies.segment_shares import (
    POSITION_BINS,
    KeepStats,
    SegmentShares,
    ShareLearner,
    decode_keep_stats,
    encode_keep_stats,
)
from entropyinfer.policies.segment_split import kept_histogram, span_shares, split_budget

W = 4


def test_kept_histogram_counts_the_kept_prefix_positions_per_bin() -> None:
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([200, 37, 20, 5, 1])  # a head keeping everything, one shorter than the window
    caps = torch.tensor([40, 12, 24, 8, 8])
    scores = torch.rand(5, 200, generator=g)
    scores = scores.masked_fill(
        torch.arange(200)[None, :] >= (lengths - W).clamp(min=0)[:, None], float("-inf")
    )
    slots = int(torch.minimum(caps, lengths).max())
    plan = select_positions(scores, lengths, caps, W, slots)
    fractions, weights = kept_histogram(plan.indices, plan.counts, lengths, W)
    assert fractions.shape == (5, POSITION_BINS)
    for h in range(5):
        prefix = max(int(lengths[h]) - W, 0)
        keep = int(plan.counts[h]) - min(W, int(lengths[h]))
        chose = 0 < keep < prefix
        assert weights[h] == float(chose)
        want = np.zeros(POSITION_BINS)
        for p in plan.indices[h, :keep].tolist() if chose else []:
            want[min(p * POSITION_BINS // prefix, POSITION_BINS - 1)] += 1 / keep
        np.testing.assert_allclose(fractions[h].numpy(), want, atol=1e-6)
    assert weights.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_span_shares_spread_each_bin_over_its_positions() -> None:
    bins = torch.zeros(2, 4, dtype=torch.float64)
    bins[0] = torch.tensor([0.5, 0.0, 0.0, 0.5])  # sink and recent end
    bins[1] = 0.25
    starts, ends = torch.tensor([[0, 0], [50, 50]]), torch.tensor([[50, 50], [130, 130]])
    prefix = torch.tensor([100, 80])  # the second segment holds the window beyond the prefix
    got = span_shares(bins, starts, ends, prefix)
    np.testing.assert_allclose(got[:, 0].numpy(), [0.5, 0.5])
    np.testing.assert_allclose(got[:, 1].numpy(), [50 / 80, 30 / 80])  # uniform bins: by prefix positions
    np.testing.assert_allclose(got.sum(0).numpy(), [1.0, 1.0])
    three = span_shares(
        bins,
        torch.tensor([[0, 0], [10, 10], [90, 90]]),
        torch.tensor([[10, 10], [90, 90], [100, 100]]),
        torch.tensor([100, 100]),
    )
    np.testing.assert_allclose(three[:, 0].numpy(), [0.2, 0.6, 0.2])  # bin 0: 10 + 15 of 25, bin 3: 15 + 10


def test_split_budget_follows_shares_within_each_segments_room() -> None:
    g = torch.Generator().manual_seed(5)
    for _ in range(300):
        sp = int(torch.randint(1, 5, (), generator=g))
        room = torch.randint(0, 40, (sp, 4), generator=g)
        total = torch.randint(0, 120, (4,), generator=g)
        shares = torch.rand(sp, 4, generator=g) * (torch.rand(sp, 4, generator=g) > 0.3)
        b = split_budget(total, shares, room)
        assert (b >= 0).all() and (b <= room).all()
        assert torch.equal(b.sum(0), torch.minimum(total, room.sum(0)))
    # overflow past a segment's room goes to the others by their shares; no shares at all: by room
    b = split_budget(torch.tensor([10, 7]), torch.tensor([[0.5, 0.0], [0.3, 0.0], [0.2, 0.0]]),
                     torch.tensor([[3, 5], [10, 0], [10, 5]]))  # fmt: skip
    assert b.T.tolist() == [[3, 4, 3], [4, 0, 3]]
    # shares of any scale, even non-finite ones, never give a budget outside the room or a wrong total
    for bad in ([float("inf"), 1.0, 1.0], [1e308] * 3, [float("nan"), 2.0, 0.0]):
        b = split_budget(torch.tensor(12), torch.tensor(bad, dtype=torch.float64), torch.tensor([10, 10, 10]))
        assert b.sum() == 12 and (b >= 0).all() and (b <= 10).all(), (bad, b)
    # integer shares (a plan's own counts) come back exactly, float noise or not
    counts = torch.tensor([[7, 0], [2, 9], [11, 1]])
    assert torch.equal(split_budget(counts.sum(0), counts.float() / 3, counts + 5), counts)


def stats(layers: int, heads: int, row: list[float], weight: float = 1.0) -> KeepStats:
    fr = np.zeros((layers, heads, POSITION_BINS), dtype=np.float32)
    fr[..., : len(row)] = row
    return KeepStats("m", fr * weight, np.full((layers, heads), weight, dtype=np.float32))


def test_learner_averages_and_makes_rate_limited_versions() -> None:
    learner = ShareLearner("m", 2, 3, every_requests=2, every_s=10.0, warmup_requests=3)
    assert learner.current.version == 0
    np.testing.assert_allclose(learner.current.bins, 1 / POSITION_BINS)
    made = [learner.observe(stats(2, 3, [1.0]), now=t) for t in (0.0, 1.0)]
    assert made == [None, None]  # before the warm-up
    assert learner.observe(stats(2, 3, [0.0, 1.0]), now=2.0) is not None  # 3 requests, 2 since: v1
    assert learner.current.version == 1
    np.testing.assert_allclose(learner.current.bins[0, 0, :2], [2 / 3, 1 / 3], rtol=1e-6)
    assert learner.observe(stats(2, 3, [1.0], weight=0.0), now=3.0) is None  # 1 since
    assert learner.observe(stats(2, 3, [1.0]), now=4.0) is None  # 2 since, but 2 s after v1
    v2 = learner.observe(stats(2, 3, [1.0]), now=13.0)
    assert v2 is not None and v2.version == 2 and v2.requests == 6
    np.testing.assert_allclose(v2.bins[0, 0, :2], [4 / 5, 1 / 5], rtol=1e-6)  # unweighted rows ignored
    np.testing.assert_allclose(v2.bins.sum(-1), 1.0, rtol=1e-6)
    back = SegmentShares.from_dict(v2.to_dict())
    assert back.version == 2 and np.array_equal(back.bins, v2.bins)
    for bad in (np.nan, -1.0, np.inf):  # a table of bins no split could use is refused, not pinned
        d = v2.to_dict()
        d["bins"][0][0][0] = bad
        with pytest.raises(ValueError, match="finite"):
            SegmentShares.from_dict(d)
    with pytest.raises(ValueError, match="expected"):
        learner.observe(stats(2, 4, [1.0]))  # another shape


def test_keep_stats_round_trip_and_reject_malformed_bytes() -> None:
    s = stats(2, 3, [0.25, 0.75])
    back = decode_keep_stats(encode_keep_stats(s))
    assert back.model == "m" and np.array_equal(back.fractions, s.fractions)
    assert np.array_equal(back.weights, s.weights)
    bad = [
        msgpack.packb({"v": 99, "model": "m"}),
        msgpack.packb({"v": 1, "model": "m", "fractions": {"shape": [2], "data": b"\0" * 8}}),
        msgpack.packb(
            {
                "v": 1,
                "model": "m",
                "fractions": {"shape": [1, 1, 2], "data": b"\0" * 8},
                "weights": {"shape": [1, 2], "data": b"\0" * 8},
            }
        ),
        msgpack.packb([1, 2, 3]),
        msgpack.packb(
            {"v": 1, "model": "m", "fractions": {"shape": 3, "data": b""}, "weights": {"shape": [1]}}
        ),
        msgpack.packb(
            {
                "v": 1,
                "model": "m",
                "fractions": {"shape": [1, 1, "x"], "data": b""},
                "weights": {"shape": [1, 1], "data": b"\0" * 4},
            }
        ),
    ]
    for blob in bad:
        with pytest.raises(ValueError):
            decode_keep_stats(blob)
