"""Latent / SnapKV KV compression decisions (`policies/kv_compression.py`) on hand-made inputs; config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from entropyinfer.errors import ConfigError
from entropyinfer.policies.kv_compression import (
    KVCompressionConfig,
    adaptive_capacities,
    head_capacities,
    load_kv_compression_config,
    plan_keep,
    prefix_scores,
    select_positions,
)


def kept(plan, h=0):
    return plan.indices[h, : int(plan.counts[h])].tolist()


# --------------------------------------------------------------------------------------------- selection
def test_keeps_top_capacity_minus_window_and_the_last_window():
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.05, 0.7, 0.3, float("-inf"), float("-inf"), float("-inf")]])
    plan = select_positions(scores, torch.tensor([10]), torch.tensor([6]), window=3, slots=8)
    assert kept(plan) == [1, 3, 5, 7, 8, 9]  # top 3 prefix positions ascending, then the last 3
    assert plan.indices[0, 6:].tolist() == [0, 0]  # padding past the count
    assert plan.counts.tolist() == [6]


def test_capacity_at_least_length_keeps_everything_in_order():
    scores = torch.rand(2, 12)
    lengths = torch.tensor([12, 7])
    scores[1, 4:] = float("-inf")  # head 1: prefix 0..3 (length 7, window 3)
    scores[0, 9:] = float("-inf")
    plan = select_positions(scores, lengths, torch.tensor([12, 64]), window=3, slots=12)
    assert kept(plan, 0) == list(range(12)) and kept(plan, 1) == list(range(7))


def test_sequence_shorter_than_the_window_keeps_all():
    scores = torch.full((1, 4), float("-inf"))
    plan = select_positions(scores, torch.tensor([2]), torch.tensor([8]), window=4, slots=8)
    assert kept(plan) == [0, 1]


def test_per_head_capacities_and_lengths_in_one_call():
    torch.manual_seed(1)
    s, w = 40, 4
    lengths = torch.tensor([40, 25, 9])
    caps = torch.tensor([10, 20, 8])
    scores = torch.rand(3, s)
    scores[torch.arange(s)[None, :] >= (lengths - w)[:, None]] = float("-inf")
    plan = select_positions(scores, lengths, caps, window=w, slots=24)
    for h in range(3):
        n, c = int(lengths[h]), int(caps[h])
        prefix = scores[h, : n - w]
        top = sorted(prefix.topk(min(c - w, n - w)).indices.tolist())
        assert kept(plan, h) == top + list(range(n - w, n)), h
    assert plan.counts.tolist() == [10, 20, 8]


# ----------------------------------------------------------------------------------------------- scoring
def test_pooling_avg_and_max_over_the_prefix_only():
    probs = torch.zeros(1, 1, 10)
    probs[0, 0, 3] = 1.0
    probs[0, 0, 8] = 5.0  # inside the window (length 10, W 2 -> prefix 0..7): ignored
    avg = prefix_scores(probs, torch.tensor([10]), 2, pooling="avg", kernel_size=3)
    assert torch.allclose(avg[0, :8], torch.tensor([0, 0, 1 / 3, 1 / 3, 1 / 3, 0, 0, 0]))
    assert torch.isinf(avg[0, 8:]).all()
    mx = prefix_scores(probs, torch.tensor([10]), 2, pooling="max", kernel_size=5)
    assert mx[0, :8].tolist() == [0, 1, 1, 1, 1, 1, 0, 0]
    raw = prefix_scores(probs, torch.tensor([10]), 2, pooling="none")
    assert raw[0, :8].tolist() == probs[0, 0, :8].tolist()
    # SnapKV's pooling: zero padding, padded slots counted
    x = torch.rand(1, 1, 20)
    pooled = prefix_scores(x, torch.tensor([22]), 2, kernel_size=5)
    torch.testing.assert_close(pooled[0], F.avg_pool1d(x[0], 5, stride=1, padding=2)[0])


def test_gqa_group_reduction_max_or_mean():
    probs = torch.tensor([[[0.1, 0.6, 0.1, 0.0], [0.3, 0.0, 0.35, 0.0]]])  # one KV head, G = 2
    lengths = torch.tensor([5])  # W = 1: prefix 0..3
    mx = prefix_scores(probs, lengths, 1, pooling="none", group_reduce="max")
    mean = prefix_scores(probs, lengths, 1, pooling="none", group_reduce="mean")
    assert mx[0].tolist() == pytest.approx([0.3, 0.6, 0.35, 0.0])
    assert mean[0].tolist() == pytest.approx([0.2, 0.3, 0.225, 0.0])
    caps = torch.tensor([3])  # keep 2 of the prefix + the last one
    assert kept(select_positions(mx, lengths, caps, 1, 3)) == [1, 2, 4]
    assert kept(select_positions(mean, lengths, caps, 1, 3)) == [1, 2, 4]
    caps = torch.tensor([2])
    assert kept(select_positions(mx, lengths, caps, 1, 3)) == [1, 4]


def test_plan_keep_finds_the_key_the_window_attends_to():
    torch.manual_seed(0)
    d, n, w = 16, 64, 4
    k = torch.randn(1, n, d)
    q = torch.randn(1, 2, w, d) * 0.1
    q[0, 1] += 6 * k[0, 17] / k[0, 17].norm()  # one query head of the group looks at position 17
    cfg = KVCompressionConfig(window=w, gap=-1, capacity=8, pooling="none")
    plan = plan_keep(q, k, torch.tensor([n]), torch.tensor([8]), cfg, slots=8)
    assert 17 in kept(plan) and kept(plan)[-w:] == list(range(n - w, n))


# --------------------------------------------------------------------------------- per-head capacities
def test_entropy_capacities_keep_the_total_and_favour_dynamic_heads():
    cfg = KVCompressionConfig(capacity=256, window=32, head_capacity="entropy", min_head_fraction=0.25)
    ent = torch.tensor([[float("nan")] * 4, [0.0, 1.0, 3.0, 0.5], [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    caps = head_capacities(ent, cfg, (4, 4))
    assert caps.sum(dim=1).tolist() == [4 * 256] * 4
    assert caps[0].tolist() == [256] * 4  # dense layer: uniform
    assert caps[2].tolist() == [256] * 4  # no entropy anywhere: uniform
    assert caps[3].tolist() == [256] * 4
    row = caps[1].tolist()
    assert row[0] == cfg.min_head_capacity == 64  # rigid head: the floor
    assert row[2] > row[1] > row[3] > row[0]
    uniform = head_capacities(ent, KVCompressionConfig(capacity=256), (4, 4))
    assert (uniform == 256).all()
    assert (head_capacities(None, cfg, (2, 3)) == 256).all()


def test_entropy_capacities_round_to_the_exact_total():
    cfg = KVCompressionConfig(capacity=100, window=8, gap=4, head_capacity="entropy", min_head_fraction=0.3)
    ent = torch.rand(6, 7)
    caps = head_capacities(ent, cfg, (6, 7))
    assert (caps.sum(dim=1) == 700).all() and (caps >= 30).all()


def adaptive_capacities_ref(scores, lengths, cfg, across_layers):
    """Greedy AdaKV: heads start at the floor; one token at a time goes to the head (of the layer, or of
    every layer) whose next-best prefix score is highest, while it is below its cap and has prefix left."""
    nl, h, _ = scores.shape
    floor, cap, w = cfg.min_head_capacity, cfg.max_head_capacity(h), cfg.window
    caps = [[floor] * h for _ in range(nl)]
    ranked = [[sorted(scores[li, j, : max(int(lengths[li, j]) - w, 0)].tolist(), reverse=True)
               for j in range(h)] for li in range(nl)]  # fmt: skip
    pools = (
        [[(li, j) for li in range(nl) for j in range(h)]]
        if across_layers
        else [[(li, j) for j in range(h)] for li in range(nl)]
    )
    for pool in pools:
        for _ in range(len(pool) * (cfg.capacity - floor)):
            best, at = float("-inf"), None
            for li, j in pool:
                r = caps[li][j] - w
                if caps[li][j] < cap and r < len(ranked[li][j]) and ranked[li][j][r] > best:
                    best, at = ranked[li][j][r], (li, j)
            if at is None:
                break
            caps[at[0]][at[1]] += 1
    return torch.tensor(caps)


@pytest.mark.parametrize("across_layers", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adaptive_capacities_equal_the_greedy_reference(across_layers, seed):
    """Fresh random scores over ragged lengths (some heads shorter than their share): the top-k split equals
    one-token-at-a-time greedy allocation, keeps each pool's total where the heads are long enough, and
    every head at least the floor and at most the cap."""
    gen = torch.Generator().manual_seed(seed)
    nl, h, s, w = 3, 4, 90, 4
    cfg = KVCompressionConfig(window=w, gap=-1, capacity=20, min_head_fraction=0.3,
                              head_capacity="adaptive_layers" if across_layers else "adaptive")  # fmt: skip
    lengths = torch.randint(w + 1, s + 1, (nl, h), generator=gen)
    lengths[0, 0] = 12  # shorter than the floor plus its share
    probs = torch.rand(nl, h, s, generator=gen) ** 4  # peaked, different per head
    lengths[1] = s
    probs[1, 2] = 0.5 + 0.5 * probs[1, 2]  # one head with its mass spread: needs more positions
    scores = probs.masked_fill(torch.arange(s) >= (lengths - w)[..., None], float("-inf"))
    got = adaptive_capacities(scores, lengths, cfg, across_layers=across_layers)
    want = adaptive_capacities_ref(scores, lengths, cfg, across_layers)
    assert torch.equal(got, want)
    assert (got >= cfg.min_head_capacity).all() and (got <= cfg.max_head_capacity(h)).all()
    if not across_layers:
        assert (got[1:].sum(dim=1) == h * cfg.capacity).all()  # long heads: the layer's exact total
        assert got[1, 2] == got[1].max() > cfg.capacity  # the spread head keeps more
    else:
        assert got.sum() == nl * h * cfg.capacity

    # the split keeps at least the score mass of the uniform one (same total), strictly more here
    def mass(caps):
        top = scores.sort(dim=-1, descending=True).values.clamp(min=0)
        return sum(float(top[li, j, : int(caps[li, j]) - w].sum()) for li in range(nl) for j in range(h))

    assert mass(got) > mass(torch.full_like(got, cfg.capacity))


def test_adaptive_capacity_config():
    cfg = load_kv_compression_config("latent", head_capacity="adaptive", capacity=128, min_head_fraction=0.25)
    assert cfg.adaptive and cfg.min_head_capacity == 32 and cfg.max_head_capacity(3) == 32 + 3 * 96
    assert not load_kv_compression_config("latent").adaptive
    assert load_kv_compression_config("latent").max_head_capacity(3) == 1024


# ------------------------------------------------------------------------------------------------ config
def test_presets_and_snapkv_is_the_gap_minus_one_case():
    latent, snap = load_kv_compression_config("latent"), load_kv_compression_config("snapkv")
    assert (latent.window, latent.gap, latent.capacity, latent.pooling, latent.kernel_size) == (
        32,
        16,
        1024,
        "avg",
        5,
    )
    assert latent.method == "latent" and latent.compress_after == 16 and latent.prompt_queries == 16
    assert snap.method == "snapkv" and snap.compress_after == 0 and snap.prompt_queries == 32
    # the same config but for when it compresses
    assert {f: v for f, v in vars(latent).items() if f != "gap"} == {
        f: v for f, v in vars(snap).items() if f != "gap"
    }
    assert load_kv_compression_config("latent", capacity=2048, recompress_every=128).capacity == 2048


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"capacity": 16}, "capacity"),  # below the window
        ({"capacity": "big"}, "capacity"),
        ({"window": 0}, "window"),
        ({"gap": 0}, "gap"),
        ({"gap": 40}, "gap"),
        ({"gap": -2}, "gap"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"pooling": "median"}, "pooling"),
        ({"group_reduce": "sum"}, "group_reduce"),
        ({"head_capacity": "random"}, "head_capacity"),
        ({"min_head_fraction": 0.0}, "min_head_fraction"),
        ({"recompress_every": -1}, "recompress_every"),
        ({"no_such_knob": 1}, "no_such_knob"),
    ],
)
def test_bad_config_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_kv_compression_config("latent", **overrides)
