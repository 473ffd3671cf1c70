"""The spread budget rule's kernels against their torch references (fresh random inputs, ragged shapes):
the spread entropy of `_entropy_kernel` (`block_scoring`) and the spread mode of `_counts_kernel`
(`block_selection`). ``backend="triton"`` runs the kernels (interpreted on CPU, float32)."""

from __future__ import annotations

import math

import pytest
import torch

from entropyinfer.kernels.block_layout import num_segments, visible_blocks
from entropyinfer.kernels.block_scoring import block_scores
from entropyinfer.kernels.block_scoring_ref import block_scores_ref, spread_entropy_ref
from entropyinfer.kernels.block_selection import block_counts
from entropyinfer.kernels.block_selection_ref import SpreadRule, spread_counts_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (Hq, Hkv, N, d, S, b): GQA 1 / 4 / 3, ragged N, one segment, a partial second segment, N a multiple of S
SHAPES = [
    (4, 4, 301, 16, 32, 8),
    (8, 2, 1000, 32, 64, 8),
    (6, 2, 517, 64, 64, 16),
    (4, 1, 37, 16, 64, 8),
    (4, 2, 130, 16, 64, 8),
    (6, 3, 256, 24, 32, 4),
]


def rand_qk(hq: int, hkv: int, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, n, d, generator=gen) * 2
    k = torch.randn(hkv, n, d, generator=gen) * 2
    return q.to(DEVICE), k.to(DEVICE)


@pytest.mark.parametrize(("hq", "hkv", "n", "d", "seg", "b"), SHAPES)
@pytest.mark.parametrize("scale", [0.0, 0.0625, 1.0])
def test_spread_entropy_kernel_matches_reference(
    hq: int, hkv: int, n: int, d: int, seg: int, b: int, scale: float
) -> None:
    q, k = rand_qk(hq, hkv, n, d, seed=n + d)
    got = block_scores(q, k, seg, b, backend="triton", spread_logit_scale=scale)
    ref = block_scores_ref(q, k, seg, b, spread_logit_scale=scale)
    assert got.spread is not None and ref.spread is not None
    torch.testing.assert_close(got.spread, ref.spread, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.entropy, ref.entropy, rtol=1e-4, atol=1e-5)  # unchanged by the option
    nseg = num_segments(n, seg)
    vis = visible_blocks(nseg, seg, b, DEVICE).clamp(min=1).float()
    assert bool((ref.spread[:, 0] == 0).all())
    assert bool((ref.spread >= -1e-5).all()) and bool((ref.spread <= torch.log(vis) + 1e-4).all())
    if scale == 0.0:  # uniform over the visible blocks: log V
        torch.testing.assert_close(
            ref.spread[:, 1:], torch.log(vis[1:]).expand(hkv, -1), rtol=1e-5, atol=1e-5
        )
    assert block_scores(q, k, seg, b, backend="triton").spread is None


def test_spread_entropy_is_the_softmax_entropy_float64() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 40, generator=gen, dtype=torch.float64) * 50
    got = spread_entropy_ref(logits.float(), 64, 8, 0.125)
    for s in range(1, 6):
        p = torch.softmax(logits[:, s, : 8 * s] * 0.125, dim=-1)
        want = -(p * torch.log(p)).sum(-1)
        torch.testing.assert_close(got[:, s].double(), want, rtol=1e-5, atol=1e-5)


def _rule(**kw: float) -> SpreadRule:
    base = dict(tokens_per_block=2.0, power=1.0, min_budget=16.0, max_budget=768.0, rigid_entropy=0.5,
                rigid_budget=8.0)  # fmt: skip
    base.update(kw)
    return SpreadRule(**base)


def _boundary(budgets: torch.Tensor, b: int) -> torch.Tensor:
    """Budgets within float32 noise of a multiple of b (where floor(B / b) may round either way)."""
    x = budgets.double() / b
    return (x - x.round()).abs() < 1e-4 * x.clamp(min=1)


@pytest.mark.parametrize(
    ("seq_len", "seg", "b", "threshold", "rule"),
    [
        (1000, 64, 8, 256, _rule()),  # ragged last segment, 16 segments
        (1024, 128, 8, 512, _rule(power=0.5)),  # between exp(Hs) and V-proportional
        (64, 64, 8, 0, _rule()),  # one segment: nothing to profile, never rigid
        (130, 64, 8, 64, _rule(power=0.0)),  # two full segments and a 2-token one; budget ~ V
        (4100, 256, 16, 0, _rule(rigid_entropy=0.0)),  # threshold 0; the rigid test off
        (70000, 512, 8, 4096, _rule(tokens_per_block=4.0, max_budget=6144.0)),  # 137 segments
    ],
)
def test_spread_counts_kernel_matches_reference(
    seq_len: int, seg: int, b: int, threshold: int, rule: SpreadRule
) -> None:
    nseg = num_segments(seq_len, seg)
    gen = torch.Generator().manual_seed(seq_len)
    vis = visible_blocks(nseg, seg, b, "cpu").clamp(min=1).float()
    spread = torch.rand(4, nseg, generator=gen) * torch.log(vis)  # 0 .. log V, as real spread entropies
    spread[:, 0] = 0.0
    spread[1, 1:] = 0.1  # rigid so far everywhere (below 0.5)
    spread[2, 1:] = 0.1
    spread[2, nseg // 2 :] = 0.9 * torch.log(vis[nseg // 2 :])  # rigid, then not (normalised 0.9 > 0.5)
    spread[3, 1:] = float("nan")  # NaN is never below the threshold
    kw = dict(seq_len=seq_len, segment_size=seg, block_size=b, threshold_len=threshold)
    got = block_counts(
        spread.to(DEVICE), **kw, entropy_threshold=0.0, base_budget=256.0, alpha=0.5, delta=0.4,
        spread_rule=rule, backend="triton",
    )  # type: ignore[arg-type]  # fmt: skip
    ref = spread_counts_ref(spread.to(DEVICE), **kw, rule=rule)  # type: ignore[arg-type]
    for name in ("rigid", "dense_segments"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=0, msg=name)
    torch.testing.assert_close(got.budgets, ref.budgets, rtol=2e-6, atol=0)
    assert bool((ref.budgets[3, 1:] == rule.min_budget).all())  # NaN entropy: the floor
    same = (got.counts == ref.counts) | _boundary(ref.budgets, b)
    assert bool(same.all()), (got.counts, ref.counts)
    same_k = (got.kernel_counts == ref.kernel_counts) | _boundary(ref.budgets, b)
    assert bool(same_k.all())
    rigid_now = nseg >= 2 and rule.rigid_entropy > 0.1
    assert got.rigid.tolist() == [False, rigid_now, False, False]
    if rigid_now:  # rigid so far: head 2 keeps rigid_budget while it is, then follows its entropy
        assert bool((ref.budgets[1, 1:] == rule.rigid_budget).all())
        if nseg > 3:
            assert float(ref.budgets[2, 1]) == rule.rigid_budget
            assert float(ref.budgets[2, -1]) != rule.rigid_budget
    assert bool((got.counts[:, 0] == 0).all())
    assert bool((got.kernel_counts[:, got.dense_segments] == -1).all())


def test_spread_budget_formula_and_clip() -> None:
    rule = _rule(power=0.5, min_budget=24.0, max_budget=100.0, rigid_entropy=0.0)
    spread = torch.tensor([[0.0, 1.0, 2.0, 6.0]])
    ref = spread_counts_ref(spread, seq_len=512, segment_size=128, block_size=8, threshold_len=0, rule=rule)
    for s in range(1, 4):
        v = 16 * s
        want = min(max(2.0 * math.exp(0.5 * float(spread[0, s]) + 0.5 * math.log(v)), 24.0), 100.0)
        assert float(ref.budgets[0, s]) == pytest.approx(want, rel=1e-6)
