"""The causal `spread` budget rule at the policy level and the `fixed` baseline's target density solve.

Kernel-vs-reference checks of the rule live in tests/kernels/test_spread_rule.py; the target density on real
text in tests/shard/test_target_density.py; the causal property on the real model at the bottom here."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from entropyinfer.kernels.block_selection_ref import block_counts_ref
from entropyinfer.policies.budgets import fixed_budget_for_density, fixed_layer_density, spread_rule
from entropyinfer.policies.config import load_sparse_config
from entropyinfer.policies.entropy import plan_layer

SHORT = load_sparse_config("entropy_short")
SPREAD = load_sparse_config("entropy_short", mode="spread", rigid_entropy=0.5, rigid_budget=16, min_budget=32)


def rand_qk(hq: int, hkv: int, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(hq, n, d, generator=gen) * 2, torch.randn(hkv, n, d, generator=gen) * 2


@pytest.mark.parametrize("n", [700, 1000, 2048, 3001])
@pytest.mark.parametrize("budget", [8, 64, 256, 520])
def test_fixed_layer_density_is_the_plan_density(n: int, budget: int) -> None:
    q, k = rand_qk(3, 3, n, 8, seed=n)
    plan = plan_layer(q, k, dataclasses.replace(SHORT, fixed_budget=budget), policy="fixed", backend="torch")
    kw = dict(seq_len=n, segment_size=128, block_size=8, threshold_len=512)
    assert fixed_layer_density(budget // 8, **kw) == pytest.approx(plan.density, rel=1e-12)


@pytest.mark.parametrize("n", [2048, 4095, 8176, 70000])
@pytest.mark.parametrize("target", [0.26, 0.3, 0.5])
def test_fixed_budget_for_density_is_the_closest(n: int, target: float) -> None:
    kw = dict(seq_len=n, segment_size=128, block_size=8, threshold_len=512)

    def mean(tokens: int) -> float:
        return (1 + 29 * fixed_layer_density(tokens // 8, **kw)) / 30

    budget = fixed_budget_for_density(target, **kw, num_layers=30)
    assert budget % 8 == 0 and budget >= 8
    got = mean(budget)
    for other in (budget - 8, budget + 8):
        if other >= 8:
            assert abs(got - target) <= abs(mean(other) - target) + 1e-15
    if mean(8) <= target:  # reachable: within one block's step
        assert abs(got - target) < 0.01
    # too short to be sparse: dense whatever the budget
    assert fixed_budget_for_density(0.3, seq_len=600, segment_size=128, block_size=8, threshold_len=512,
                                    num_layers=30) == 8  # fmt: skip


def test_spread_config_and_rule() -> None:
    rule = spread_rule(SPREAD)
    assert rule.tokens_per_block == SPREAD.spread_factor * 8 and rule.max_budget == 3 * SPREAD.base_budget
    assert (rule.min_budget, rule.rigid_budget, rule.rigid_entropy) == (32, 16, 0.5)
    from entropyinfer.errors import ConfigError

    with pytest.raises(ConfigError, match="min_budget"):
        load_sparse_config("entropy_short", mode="spread", min_budget=1024)
    with pytest.raises(ConfigError, match="target_density"):
        load_sparse_config("entropy_short", target_density=1.5)
    with pytest.raises(ConfigError, match="spread_power"):
        load_sparse_config("entropy_short", spread_power=float("inf"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_spread_plan(backend: str) -> None:
    q, k = rand_qk(6, 2, 1500, 16, seed=1)
    plan = plan_layer(q, k, SPREAD, backend=backend)  # type: ignore[arg-type]
    assert plan.spread is not None and plan.spread.shape == plan.entropy.shape
    sparse = ~plan.dense_segments
    b = plan.budgets[:, sparse]
    assert bool((b >= SPREAD.rigid_budget).all()) and bool((b <= SPREAD.max_budget).all())
    ref = plan_layer(q, k, SPREAD, backend="torch")
    torch.testing.assert_close(plan.spread, ref.spread, rtol=1e-4, atol=1e-5)
    assert (plan.counts - ref.counts).abs().max() <= 1  # floor boundaries may differ by float noise
    # the selection takes each row's top blocks by logit
    assert bool(((plan.block_idx >= 0).sum(-1) == plan.counts).all())


def test_spread_counts_are_causal_reference_rigid_test_is_not() -> None:
    """Counts of a prompt's first segments do not change when text is appended (spread), while the
    reference's whole-prompt rigid test can change them."""
    q, k = rand_qk(6, 2, 2300, 16, seed=2)
    n1 = 13 * 128  # a whole number of segments: the prefix's last one (dense there) is segment 12
    short = plan_layer(q[:, :n1], k[:, :n1], SPREAD, backend="torch")
    full = plan_layer(q, k, SPREAD, backend="torch")
    m = short.num_segments - 1
    assert torch.equal(short.counts[:, :m], full.counts[:, :m])
    assert torch.equal(short.block_idx[:, :m, :8], full.block_idx[:, :m, :8])
    # the reference: a head rigid over the prefix stops being rigid when a later segment's entropy rises
    entropy = 1e-8 * 1.6 ** torch.arange(20.0)[None, :]  # growing, below e_t over the first 12 segments
    kw = dict(segment_size=128, block_size=8, threshold_len=0, entropy_threshold=1e-5, base_budget=256,
              alpha=0.5, delta=0.4)  # fmt: skip
    before = block_counts_ref(entropy[:, :12], seq_len=12 * 128, **kw)  # type: ignore[arg-type]
    entropy[0, 15] = 1.0  # only after the prefix
    after = block_counts_ref(entropy, seq_len=20 * 128, **kw)  # type: ignore[arg-type]
    assert bool(before.rigid[0]) and not bool(after.rigid[0])
    assert not torch.equal(before.counts[:, 1:11], after.counts[:, 1:11])


@pytest.mark.parametrize("mode", ["spread", "causal", "coverage"])
def test_causal_modes_counts_on_the_real_model(smollm2, mode: str) -> None:
    """In every layer of SmolLM2 the block counts of a causal mode (spread, causal) for a prompt's first
    segments are those of the same prompt with text appended (sparse prefill of each, CPU reference path)."""
    from entropyinfer.evaluation.corpus import prose_text
    from entropyinfer.shard.sparse_attention import SparsePrefill

    ids = smollm2.tokenizer.encode(prose_text(), add_special_tokens=False)[: 8 * 128 + 200]
    cfg = dataclasses.replace(smollm2.sparse_config, mode=mode)
    runs = []
    for n in (8 * 128, len(ids)):
        attention = SparsePrefill("entropy", cfg)
        cache = smollm2.engine.new_cache(1, n)
        with torch.inference_mode():
            smollm2.engine.prefill(torch.tensor(ids[:n]), cache, 0, attention)
        runs.append(attention.sparse_counts)
    m = 7  # segments 0..6 of the 8-segment prompt (its last one ran dense)
    assert len(runs[0]) == len(runs[1]) == smollm2.arch.num_layers - 1
    for layer, ((c1, _), (c2, _)) in enumerate(zip(*runs, strict=True), start=1):
        assert torch.equal(c1[:, :m], c2[:, :m]), layer


# ------------------------------------------------------------------------------------------ coverage rule
COVER = load_sparse_config("entropy_short", mode="coverage", coverage=0.8, min_budget=16)


def coverage_ref(logits: torch.Tensor, cfg, d: int) -> torch.Tensor:
    """Row by row: the fewest top blocks of softmax(scale / sqrt(d) * visible logits) reaching the share."""
    hkv, nseg, _ = logits.shape
    out = torch.empty(hkv, nseg)
    for h in range(hkv):
        for s in range(nseg):
            v = s * cfg.segment_size // cfg.block_size
            k = 0
            if v:
                p = torch.softmax(logits[h, s, :v].double() * cfg.coverage_scale / d**0.5, 0)
                k = int((p.sort(descending=True).values.cumsum(0) < cfg.coverage - 1e-12).sum()) + 1
            out[h, s] = min(max(k * cfg.block_size, cfg.min_budget), cfg.max_budget)
    return out


@pytest.mark.parametrize(("n", "d", "seed"), [(1100, 16, 3), (1537, 8, 4)])
def test_coverage_budgets_match_a_row_by_row_reference(n: int, d: int, seed: int) -> None:
    """Fresh random ragged prompts: the coverage rule's budgets equal a per-row reference (torch and
    Triton scoring), and its counts are the budgets over b capped by what each segment sees."""
    q, k = rand_qk(6, 3, n, d, seed)
    for backend in ("torch", "triton"):
        plan = plan_layer(q, k, COVER, backend=backend)  # type: ignore[arg-type]
        want = coverage_ref(ref_logits(q, k), COVER, d)
        diff = (plan.budgets - want).abs()
        assert int((diff > 0).sum()) <= 2 and float(diff.max()) <= 8  # fp32 vs fp64 at the cut: one block
        sparse = ~plan.dense_segments
        assert bool((plan.budgets[:, 1:] >= COVER.min_budget).all())
        vis = torch.arange(plan.num_segments) * 16
        assert bool((plan.counts[:, sparse] <= vis[sparse]).all()) and bool((plan.counts[:, 0] == 0).all())


def ref_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    from entropyinfer.kernels.block_scoring import block_scores

    return block_scores(q, k, COVER.segment_size, COVER.block_size, backend="torch").logits


def test_coverage_grows_with_the_share_and_spreads_budgets() -> None:
    q, k = rand_qk(6, 3, 2000, 16, seed=5)
    lo = plan_layer(q, k, dataclasses.replace(COVER, coverage=0.5), backend="torch")
    hi = plan_layer(q, k, dataclasses.replace(COVER, coverage=0.95), backend="torch")
    assert bool((hi.budgets >= lo.budgets).all()) and hi.density > lo.density
    assert len(set(hi.counts[:, 8].tolist())) > 1 or len(set(hi.counts[0, 5:-1].tolist())) > 1


def test_coverage_chunks_equal_one_shot_and_are_causal() -> None:
    from entropyinfer.policies.entropy import plan_chunk

    q, k = rand_qk(6, 3, 1700, 16, seed=6)
    full = plan_layer(q, k, COVER, backend="torch")
    off = 7  # chunk: segments 7 .. end
    chunk = plan_chunk(q[:, off * 128 :], k, COVER, seq_len=1700, segment_offset=off,
                       entropy_before=full.entropy[:, :off], backend="torch")  # fmt: skip
    assert torch.equal(chunk.counts, full.counts[:, off:])
    assert torch.equal(chunk.kernel_counts, full.kernel_counts[:, off:])
    short = plan_layer(q[:, : 10 * 128], k[:, : 10 * 128], COVER, backend="torch")
    assert torch.equal(short.counts[:, :9], full.counts[:, :9])
