"""Plans and policy configurations (evaluation/plans.py): what runs at which length, in which order, with
which sparse config."""

from __future__ import annotations

import pytest

from entropyinfer.errors import ConfigError
from entropyinfer.evaluation.plans import (
    DENSE,
    FULL_PLAN,
    QUICK_PLAN,
    QualityPlan,
    entropy_spec,
    fixed_spec,
)
from entropyinfer.evaluation.tasks import TASKS
from entropyinfer.policies.config import load_sparse_config


def test_specs_run_dense_first_and_sweeps_only_at_sweep_lengths():
    plan = QualityPlan(
        name="t",
        preset="entropy_short",
        tasks=("passkey", "multikey"),
        lengths=(4096, 2048),
        depths=(0.1, 0.5, 0.9),
        main=(entropy_spec(128), DENSE, fixed_spec(256)),
        sweep=(entropy_spec(512), entropy_spec(128)),
        sweep_lengths=(4096,),
    )
    assert [s.name for s in plan.specs_at(2048)] == ["dense", "entropy B0=128", "fixed 256"]
    # The sweep adds only what main does not already run.
    assert [s.name for s in plan.specs_at(4096)] == ["dense", "entropy B0=128", "fixed 256", "entropy B0=512"]
    assert plan.cases_at(2048) == 3 * 2 * 3 and plan.cases_at(4096) == 4 * 2 * 3
    d = plan.to_dict()
    assert d["main"] == ["entropy B0=128", "dense", "fixed 256"]
    assert d["sweep"] == ["entropy B0=512", "entropy B0=128"]
    assert d["lengths"] == (4096, 2048) and d["name"] == "t"


def test_policy_specs_override_the_preset():
    base = load_sparse_config("entropy_short")
    ref = entropy_spec(256, "reference")
    assert ref.name == "entropy B0=256 reference"
    cfg = ref.config(base)
    assert (cfg.base_budget, cfg.mode, cfg.segment_size) == (256, "reference", base.segment_size)
    assert ref.describe(base) == {
        "config": "entropy B0=256 reference",
        "policy": "entropy",
        "budget": 256,
        "mode": "reference",
    }
    assert fixed_spec(512).describe(base) == {
        "config": "fixed 512",
        "policy": "fixed",
        "budget": 512,
        "mode": None,
    }
    assert DENSE.describe(base) == {"config": "dense", "policy": "dense", "budget": None, "mode": None}
    assert DENSE.config(base) == base
    # The sparse config checks the overrides.
    with pytest.raises(ConfigError, match="base_budget"):
        entropy_spec(1).config(base)


@pytest.mark.parametrize("plan", [FULL_PLAN, QUICK_PLAN], ids=lambda p: p.name)
def test_recorded_plans_are_consistent(plan):
    assert all(t in TASKS for t in plan.tasks)
    assert plan.target_length in plan.lengths
    assert set(plan.sweep_lengths) <= set(plan.lengths)
    assert plan.logits_depth in plan.depths
    assert DENSE in plan.main
    base = load_sparse_config(plan.preset)
    for spec in (*plan.main, *plan.sweep):
        spec.config(base)  # every override is a valid config
