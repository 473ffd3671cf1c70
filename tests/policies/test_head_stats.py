"""Head statistics, their aggregation across shard groups, the rebalancer's tables (versions, rate limit),
profiles on disk, and the per-head budget factors in the entropy rule."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from entropyinfer.policies.config import load_sparse_config
from entropyinfer.policies.entropy import plan_chunk, plan_layer
from entropyinfer.policies.head_budgets import (
    HeadBudgetTable,
    ProfileMismatchError,
    RebalanceConfig,
    Rebalancer,
    load_profile,
    rebalance,
    save_profile,
)
from entropyinfer.policies.head_stats import HeadProfile, HeadStats, decode_stats, encode_stats, jaccard

L, H, NSEG, S, B = 3, 4, 8, 128, 8


def _stats(rng: np.random.Generator, rigid_heads: tuple[int, ...] = (0,), version: int = 0) -> HeadStats:
    """A synthetic request: layer 0 dense, segments 0-3 and the last dense (threshold 512, S=128)."""
    dense = np.zeros(NSEG, dtype=bool)
    dense[:4] = dense[-1] = True
    profiled = np.array([False, True, True])
    entropy = rng.uniform(0.5, 3.0, (L, H, NSEG)).astype(np.float32)
    counts = rng.integers(4, 40, (L, H, NSEG)).astype(np.int32)
    captured = rng.uniform(0.3, 1.0, (L, H, NSEG)).astype(np.float32)
    rigid = np.zeros((L, H), dtype=bool)
    rigid[1:, list(rigid_heads)] = True
    entropy[~profiled] = np.nan
    counts[~profiled] = 0
    counts[:, :, dense] = 0
    captured[:, :, dense] = 1.0
    return HeadStats("m", NSEG * S - 5, S, B, profiled, entropy, counts, captured, rigid, dense, version)


def _observations(stats: list[HeadStats]) -> list[list[list[float]]]:
    """Every normalised-entropy observation per (layer, head), computed directly."""
    obs: list[list[list[float]]] = [[[] for _ in range(H)] for _ in range(L)]
    for st in stats:
        for li in range(L):
            for h in range(H):
                for s in range(1, NSEG):
                    if st.profiled[li] and not st.dense[s]:
                        obs[li][h].append(float(st.entropy[li, h, s]) / np.log(s * S // B))
    return obs


def test_stats_survive_the_msgpack_codec() -> None:
    st = _stats(np.random.default_rng(0), version=3)
    back = decode_stats(encode_stats(st))
    for name in ("profiled", "entropy", "counts", "captured", "rigid", "dense"):
        a, b = getattr(st, name), getattr(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    assert (back.model, back.seq_len, back.table_version) == ("m", st.seq_len, 3)
    with pytest.raises(ValueError, match="wire version"):
        decode_stats(b"\x80")  # an empty map


def test_two_shard_groups_aggregate_exactly_to_one_profile() -> None:
    rng = np.random.default_rng(1)
    requests = [_stats(rng, rigid_heads=(0,) if i % 3 else (0, 2)) for i in range(9)]
    one, a, b = HeadProfile("m", L, H), HeadProfile("m", L, H), HeadProfile("m", L, H)
    for i, st in enumerate(requests):
        one.add(st)
        (a if i < 4 else b).add(st)
    a.merge(b)
    for name in ("n", "requests", "rigid", "captured_sum", "budget_sum", "saturated"):
        assert np.array_equal(getattr(a, name), getattr(one, name)), name
    np.testing.assert_allclose(a.entropy_mean, one.entropy_mean, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(a.variance, one.variance, rtol=1e-10, equal_nan=True)
    assert a.density == pytest.approx(one.density)
    # against the observations themselves
    obs = _observations(requests)
    for li in (1, 2):
        for h in range(H):
            assert one.entropy_mean[li, h] == pytest.approx(np.mean(obs[li][h]), rel=1e-12)
            assert one.variance[li, h] == pytest.approx(np.var(obs[li][h], ddof=1), rel=1e-10)
    assert np.isnan(one.entropy_mean[0]).all()  # layer 0 ran dense
    np.testing.assert_allclose(one.rigid_frequency[1:, 0], 1.0)
    np.testing.assert_allclose(one.rigid_frequency[1:, 2], 3 / 9)
    assert one.rigid_frequency[1:, 1].max() == 0
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(HeadProfile("other", L, H))


def test_rigid_set_jaccard_across_documents() -> None:
    assert jaccard(np.array([1, 1, 0], bool), np.array([1, 0, 0], bool)) == 0.5
    assert jaccard(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    rng = np.random.default_rng(2)
    p = HeadProfile("m", L, H)
    for heads in ((0,), (0,), (0, 1)):
        p.add(_stats(rng, rigid_heads=heads))
    # {0} vs {0}: 1; {0} vs {0, 1}: 1/2 (over layers 1-2 both)
    assert p.rigid_jaccard == pytest.approx((1.0 + 0.5) / 2)


def test_table_versions_are_monotonic_and_rate_limited() -> None:
    cfg = RebalanceConfig(move_budget=True, every_requests=5, every_s=10.0, warmup_requests=3)
    rb = Rebalancer(HeadProfile("m", L, H), cfg)
    rng = np.random.default_rng(3)
    versions, made_at = [rb.current.version], []
    for i in range(40):
        now = 100.0 + i  # one request per second
        table = rb.observe(_stats(rng), now)
        if table is not None:
            made_at.append((i + 1, now))
            versions.append(table.version)
        assert rb.current.version == versions[-1]
    assert versions == list(range(len(versions))) and len(versions) > 2
    gaps = [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(made_at)]
    assert all(dn >= 5 and dt >= 10.0 for dn, dt in gaps), gaps  # both limits hold
    assert made_at[0][0] >= 5  # none before the first every_requests (warm-up 3 is below it)
    # seconds alone: many requests in one second make one version
    cfg2 = RebalanceConfig(move_budget=True, every_requests=1, every_s=60.0, warmup_requests=1)
    rb2 = Rebalancer(HeadProfile("m", L, H), cfg2)
    made = [rb2.observe(_stats(rng), 5.0) for _ in range(20)]
    assert sum(t is not None for t in made) == 1
    # rebalancing off (the default) and no density target: statistics only, never a version
    rb3 = Rebalancer(HeadProfile("m", L, H), RebalanceConfig(every_requests=1, every_s=0, warmup_requests=1))
    assert all(rb3.observe(_stats(rng), 5.0 + i) is None for i in range(5)) and rb3.current.version == 0
    assert rb3.profile.total_requests == 5


def test_rebalance_moves_budget_from_rigid_heads_to_low_mass_heads() -> None:
    rng = np.random.default_rng(4)
    p = HeadProfile("m", L, H)
    for _ in range(10):
        st = _stats(rng, rigid_heads=(0,))
        st.captured[:, 3] = np.where(st.dense[None, :], 1.0, 0.4)  # head 3: low captured mass
        st.captured[:, 1] = np.where(st.dense[None, :], 1.0, 0.99)  # head 1: saturated
        p.add(st)
    assert np.all(rebalance(p, RebalanceConfig(min_requests=4)) == 1.0)  # off by default (experimental)
    cfg = RebalanceConfig(min_requests=4, move_budget=True, rigid_donors=True, donor_scale=0.5, max_scale=2.0)
    scales = rebalance(p, cfg)
    assert np.all(scales[0] == 1.0)  # layer 0: never profiled
    assert np.all(scales[1:, 0] == cfg.donor_scale) and np.all(scales[1:, 1] == cfg.donor_scale)
    assert np.all(scales[1:, 3] > 1.0) and np.all(scales[1:, 3] <= cfg.max_scale)
    budget = np.nan_to_num(p.budget_mean)
    # budget-neutral unless the receivers hit max_scale
    if np.all(scales[1:, 2:] < cfg.max_scale):
        assert (scales * budget).sum() == pytest.approx(budget.sum(), rel=1e-5)
    # the defaults: rigid heads kept out of the donors, only the saturated head gives (a quarter)
    gentle = RebalanceConfig(min_requests=4, move_budget=True)
    s1 = rebalance(p, gentle)
    assert np.all(s1[1:, 0] >= 1.0) and np.all(s1[1:, 1] == gentle.donor_scale) and np.all(s1[1:, 3] > 1.0)
    assert np.all(s1 <= gentle.max_scale)
    # with a density target: the linear density model lands on it
    fixed, moved = p.density or (0.0, 0.0)
    target = fixed + 0.5 * moved
    s2 = rebalance(p, dataclasses.replace(cfg, density_target=target))
    w = budget * (p.requests >= 4)
    assert fixed + moved * float((s2 * w).sum() / w.sum()) == pytest.approx(target, rel=1e-4)


def test_a_profile_round_trips_on_disk_and_another_models_is_rejected(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    cfg = RebalanceConfig(move_budget=True, every_requests=2, every_s=0, warmup_requests=2)
    rb = Rebalancer(HeadProfile("m", L, H), cfg)
    for _ in range(4):
        rb.observe(_stats(rng), 1.0)
    path = save_profile(tmp_path / "p" / "heads.json", rb.profile, rb.current)
    profile, table = load_profile(path, "m", L, H)
    assert table is not None and table.version == rb.current.version
    assert np.array_equal(table.scales, rb.current.scales)
    np.testing.assert_allclose(profile.variance, rb.profile.variance, equal_nan=True)
    assert profile.total_requests == 4 and profile.rigid_jaccard == rb.profile.rigid_jaccard
    with pytest.raises(ProfileMismatchError, match=r"'m' \(3 layers, 4 KV heads\).*'other'"):
        load_profile(path, "other", L, H)
    with pytest.raises(ProfileMismatchError, match="5 KV heads"):
        load_profile(path, "m", L, 5)
    (tmp_path / "x.json").write_text(json.dumps({"format": "nope"}))
    with pytest.raises(ValueError, match="not an entropyinfer head profile"):
        load_profile(tmp_path / "x.json", "m", L, H)
    assert HeadBudgetTable.from_dict(table.to_dict()).version == table.version


def test_head_factors_scale_the_entropy_rules_counts_and_none_is_bit_exact() -> None:
    cfg = load_sparse_config("entropy_short")
    n = 1500
    q, k = torch.randn(4, n, 16), torch.randn(2, n, 16)
    e0 = torch.zeros(2, 0)
    base = plan_chunk(q, k, cfg, seq_len=n, segment_offset=0, entropy_before=e0)
    ones = plan_chunk(q, k, cfg, seq_len=n, segment_offset=0, entropy_before=e0, head_scale=torch.ones(2))
    for name in ("counts", "kernel_counts", "block_idx"):
        assert torch.equal(getattr(base, name), getattr(ones, name))
    scaled = plan_chunk(
        q, k, cfg, seq_len=n, segment_offset=0, entropy_before=e0,
        head_scale=torch.tensor([0.5, 2.0]), with_mass=True,
    )  # fmt: skip
    sparse = ~base.dense_segments
    sparse[0] = False
    assert (scaled.counts[0, sparse] <= base.counts[0, sparse]).all()
    assert (scaled.counts[0, sparse] < base.counts[0, sparse]).any()
    assert (scaled.counts[1, sparse] > base.counts[1, sparse]).any()
    caps = torch.arange(base.counts.shape[1]) * (cfg.segment_size // cfg.block_size)
    assert (scaled.counts <= caps).all()
    # captured mass: in [0, 1], 1 on dense segments, larger for the head with more blocks
    assert scaled.captured is not None
    assert ((scaled.captured >= 0) & (scaled.captured <= 1 + 1e-6)).all()
    assert (scaled.captured[:, base.dense_segments] == 1).all()
    ones_mass = plan_chunk(q, k, cfg, seq_len=n, segment_offset=0, entropy_before=e0, with_mass=True).captured
    assert ones_mass is not None
    assert (scaled.captured[1, sparse] >= ones_mass[1, sparse] - 1e-6).all()
    assert (scaled.captured[0, sparse] <= ones_mass[0, sparse] + 1e-6).all()
    # one-shot (per_head mode) takes the factors too
    ph = load_sparse_config("entropy_short", mode="per_head")
    a, b = plan_layer(q, k, ph), plan_layer(q, k, ph, head_scale=torch.ones(2))
    assert torch.equal(a.counts, b.counts) and torch.equal(a.block_idx, b.block_idx)
