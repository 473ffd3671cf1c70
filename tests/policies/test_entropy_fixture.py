"""Entropy / fixed sparse prefill policies against the reference fixture, and policy / config behaviour.

The fixture (shared/fixtures/entropyinfer_reference, beside the clone; README there) holds SmolLM2 query/key
states of four layers and a synthetic case with the reference's entropies, probabilities, rigid heads, counts
and captured masses for the `entropy_short` preset. Both paths are checked: the torch reference and the Triton
kernels (under TRITON_INTERPRET=1 on CPU, float32).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from entropyinfer.errors import ConfigError
from entropyinfer.kernels.backend import interpreter_ready
from entropyinfer.kernels.block_layout import BlockScores, num_blocks
from entropyinfer.kernels.block_scoring import block_scores
from entropyinfer.kernels.block_selection_ref import count_caps, rigid_so_far_ref
from entropyinfer.policies.config import SparsePrefillConfig, load_sparse_config
from entropyinfer.policies.entropy import plan_from_scores, plan_layer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = ["L1", "L13", "L16", "L25", "synth"]
BACKENDS = ["torch", "triton"]


def fixture_dir() -> Path:
    here = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "entropyinfer_reference"
    if (here / "expected.safetensors").is_file():
        return here
    env = os.environ.get("ENTROPYINFER_FIXTURES")
    if env:
        for cand in (Path(env), Path(env) / "entropyinfer_reference"):
            if (cand / "expected.safetensors").is_file():
                return cand
    pytest.fail(
        f"reference fixture not found: expected {here}/{{inputs,expected}}.safetensors (the shared/ folder "
        "beside the clone), or set ENTROPYINFER_FIXTURES to the folder holding them"
    )


@cache
def tensors() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    d = fixture_dir()
    return load_file(d / "inputs.safetensors"), load_file(d / "expected.safetensors")


def inputs(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    inp, _ = tensors()
    # real cases are stored as float16; every expected tensor was computed from the float32 cast
    return inp[f"q_{case}"].float().to(DEVICE), inp[f"k_{case}"].float().to(DEVICE)


def expected(name: str, case: str) -> torch.Tensor:
    return tensors()[1][f"{name}_{case}"].to(DEVICE)


SHORT = load_sparse_config("entropy_short")


@cache
def scores(case: str, backend: str) -> BlockScores:
    if backend == "triton" and DEVICE == "cpu" and not interpreter_ready():
        pytest.fail(
            "triton was imported before TRITON_INTERPRET=1 was set: the Triton path cannot run on CPU"
        )
    q, k = inputs(case)
    return block_scores(q, k, SHORT.segment_size, SHORT.block_size, backend=backend)  # type: ignore[arg-type]


def test_fixture_preset_is_entropy_short() -> None:
    with safe_open(str(fixture_dir() / "expected.safetensors"), "pt") as f:
        meta = f.metadata()
    assert int(meta["S"]) == SHORT.segment_size and int(meta["b"]) == SHORT.block_size
    assert int(meta["B0"]) == SHORT.base_budget and int(meta["thr"]) == SHORT.threshold_len
    assert float(meta["e_t"]) == SHORT.entropy_threshold
    assert float(meta["alpha"]) == SHORT.alpha and float(meta["delta"]) == SHORT.delta


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_entropy_and_probs(case: str, backend: str) -> None:
    sc = scores(case, backend)
    assert torch.allclose(sc.entropy, expected("entropy", case), rtol=1e-4, atol=1e-6)
    assert torch.allclose(sc.probs(), expected("p", case), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_causal_mode_is_per_head_with_rigid_so_far(case: str, backend: str) -> None:
    """Mode `causal` on the fixture: the reference's per-head counts, except that a head keeps B0's blocks
    in the segments where it is still rigid so far (entropy below e_t in every segment up to there)."""
    cfg = load_sparse_config("entropy_short", mode="causal")
    q, _ = inputs(case)
    plan = plan_from_scores(scores(case, backend), cfg, q.shape[1], backend=backend)  # type: ignore[arg-type]
    assert torch.equal(plan.rigid, expected("rigid", case))  # the whole-prompt test, as reported
    so_far = rigid_so_far_ref(expected("entropy", case).to(DEVICE), cfg.entropy_threshold)
    caps = count_caps(q.shape[1], cfg.segment_size, cfg.block_size, DEVICE)
    b0 = torch.minimum(torch.full_like(caps, cfg.base_budget // cfg.block_size), caps)[None].expand_as(so_far)
    want = torch.where(so_far, b0, expected("counts_perhead", case).to(DEVICE).long())
    want[:, 0] = 0
    assert torch.equal(plan.counts.long(), want)


@pytest.mark.parametrize("mode", ["per_head", "reference"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_rigid_counts_and_selection(case: str, backend: str, mode: str) -> None:
    cfg = load_sparse_config("entropy_short", mode=mode)
    q, _ = inputs(case)
    n = q.shape[1]
    plan = plan_from_scores(scores(case, backend), cfg, n, backend=backend)  # type: ignore[arg-type]
    assert torch.equal(plan.rigid, expected("rigid", case))
    if mode == "per_head":
        want, mass = expected("counts_perhead", case), expected("mass_perhead", case)
    else:
        want, mass = expected("counts_ref", case)[None].expand_as(plan.counts), expected("mass_ref", case)
    assert plan.counts.dtype == torch.int32
    assert torch.equal(plan.counts.long(), want)
    # selections by captured mass: underflowed probabilities tie at 0, so indices are not unique
    p = expected("p", case).double()
    blocks_per_seg = cfg.segment_size // cfg.block_size
    for h in range(plan.num_kv_heads):
        for s in range(plan.num_segments):
            c = int(plan.counts[h, s])
            ids = plan.block_idx[h, s, :c].long()
            assert ids.tolist() == sorted(set(ids.tolist())), (h, s)  # distinct, ascending
            assert bool((ids >= 0).all()) and bool((ids < s * blocks_per_seg).all()), (h, s)
            assert bool((plan.block_idx[h, s, c:] == -1).all()), (h, s)
            assert float(p[h, s, ids].sum()) >= float(mass[h, s]) - 1e-6, (h, s)


# ---------------------------------------------------------------------------------------------------- policy


def test_dynamic_budgets_stay_in_range_and_rigid_heads_get_base() -> None:
    for case in CASES:
        q, _ = inputs(case)
        plan = plan_from_scores(scores(case, "torch"), SHORT, q.shape[1], backend="torch")
        b0 = SHORT.base_budget
        assert bool((plan.budgets >= b0).all()) and bool((plan.budgets <= 3 * b0).all()), case
        assert bool((plan.budgets[:, 0] == b0).all())
        assert bool((plan.budgets[plan.rigid] == b0).all())
        caps = count_caps(q.shape[1], SHORT.segment_size, SHORT.block_size, DEVICE)
        rigid_counts = torch.minimum(torch.full_like(caps, b0 // SHORT.block_size), caps)
        rigid_counts[0] = 0
        for h in plan.rigid.nonzero().flatten().tolist():
            assert torch.equal(plan.counts[h].long(), rigid_counts), (case, h)
    # L16 has two rigid heads and one dynamic head whose budget grows past B0 somewhere
    plan = plan_from_scores(scores("L16", "torch"), SHORT, 2048, backend="torch")
    assert plan.rigid.tolist() == [True, True, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_policy_gives_fixed_counts(backend: str) -> None:
    cfg = load_sparse_config("entropy_short", fixed_budget=200, ranking="box")  # the fixture's ranking
    q, k = inputs("synth")
    plan = plan_layer(q, k, cfg, policy="fixed", backend=backend)  # type: ignore[arg-type]
    caps = count_caps(q.shape[1], cfg.segment_size, cfg.block_size, DEVICE)
    want = torch.minimum(torch.full_like(caps, 200 // cfg.block_size), caps)
    want[0] = 0
    assert torch.equal(plan.counts.long(), want[None].expand_as(plan.counts))
    assert bool((plan.budgets == 200).all())
    assert plan.block_idx.shape[-1] == 200 // cfg.block_size
    # the fixed baseline selects by the same scores: its top blocks are the entropy policy's at equal counts
    p = plan_from_scores(scores("synth", "torch"), cfg, q.shape[1], policy="fixed", backend="torch")
    assert torch.equal(p.block_idx, plan.block_idx)


def test_unknown_selection_rule() -> None:
    with pytest.raises(ValueError, match="block-selection rule 'snapkv'; choose one of: entropy, fixed"):
        plan_from_scores(scores("synth", "torch"), SHORT, 1000, policy="snapkv")  # type: ignore[arg-type]


def test_dense_segments_density_and_kernel_counts() -> None:
    q, k = inputs("synth")  # 1000 tokens, 8 segments of 128
    plan = plan_layer(q, k, SHORT, backend="torch")
    # threshold 512: segments 0..3 start before it; segment 7 is the last
    assert plan.dense_segments.tolist() == [True] * 4 + [False] * 3 + [True]
    kc = plan.kernel_counts
    assert bool((kc[:, plan.dense_segments] == -1).all())
    assert torch.equal(kc[:, ~plan.dense_segments], plan.counts[:, ~plan.dense_segments])
    # density by hand: dense segments count their full causal work
    n, seg, b = 1000, 128, 8
    work = 0.0
    for s in range(8):
        lo, hi = s * seg, min((s + 1) * seg, n)
        if plan.dense_segments[s]:
            work += plan.num_kv_heads * sum(i + 1 for i in range(lo, hi))
        else:
            work += float(plan.counts[:, s].sum()) * b * seg + plan.num_kv_heads * seg * (seg + 1) / 2
    assert plan.density == pytest.approx(work / (plan.num_kv_heads * n * (n + 1) / 2), rel=1e-12)
    assert 0 < plan.density < 1
    all_dense = plan_layer(q, k, load_sparse_config("entropy_short", threshold_len=4096), backend="torch")
    assert all_dense.density == pytest.approx(1.0)


def test_one_segment_prompt() -> None:
    q, k = inputs("synth")
    plan = plan_layer(q[:, :100], k[:, :100], SHORT, backend="torch")
    assert plan.counts.shape == (2, 1) and int(plan.counts.abs().sum()) == 0
    assert plan.block_idx.shape == (2, 1, 1) and plan.dense_segments.tolist() == [True]
    assert plan.rigid.tolist() == [False, False]
    assert num_blocks(100, 128, 8) == 0 and plan.density == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------- config


def test_presets() -> None:
    long = load_sparse_config("entropy_long")
    assert long == SparsePrefillConfig()
    assert (long.segment_size, long.block_size, long.base_budget, long.threshold_len) == (512, 8, 2048, 4096)
    assert (SHORT.segment_size, SHORT.block_size, SHORT.base_budget, SHORT.threshold_len) == (
        128,
        8,
        256,
        512,
    )
    assert (SHORT.entropy_threshold, SHORT.alpha, SHORT.delta) == (
        long.entropy_threshold,
        long.alpha,
        long.delta,
    )
    assert load_sparse_config("entropy_short", mode="reference").mode == "reference"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"segmant_size": 128}, "segmant_size"),
        ({"segment_size": 100}, "segment_size"),
        ({"block_size": 0}, "block_size"),
        ({"base_budget": 4}, "base_budget"),
        ({"fixed_budget": -8}, "fixed_budget"),
        ({"threshold_len": -1}, "threshold_len"),
        ({"alpha": -0.5}, "alpha"),
        ({"delta": "big"}, "delta"),
        ({"entropy_threshold": float("nan")}, "entropy_threshold"),
        ({"mode": "max"}, "mode"),
        ({"block_size": 8.0}, "block_size"),
    ],
)
def test_config_errors_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_sparse_config("entropy_short", **overrides)


def test_config_from_yaml_file(tmp_path: Path) -> None:
    good = tmp_path / "mine.yaml"
    good.write_text("segment_size: 64\nblock_size: 16\nbase_budget: 128\nfixed_budget: 64\n")
    cfg = load_sparse_config(good)
    assert (cfg.segment_size, cfg.block_size, cfg.base_budget, cfg.alpha) == (64, 16, 128, 0.5)
    bad = tmp_path / "bad.yaml"
    bad.write_text("segment_size: 64\nbudget: 128\n")
    with pytest.raises(ConfigError, match="budget"):
        load_sparse_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_sparse_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="block_size"):
        SparsePrefillConfig(segment_size=64, block_size=24)
