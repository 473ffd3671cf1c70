"""`policy="fixed"` with `target_density`: the fixed budget solved per prompt hits the requested mean density
(as `SparsePrefill` reports it: all layers, layer 0 and dense segments included) on real text, SmolLM2."""

from __future__ import annotations

import pytest

from entropyinfer import SamplingParams
from entropyinfer.evaluation.corpus import prose_text


@pytest.fixture(scope="module")
def real_text_prompt(smollm2):
    ids = smollm2.tokenizer.encode(prose_text(), add_special_tokens=False)[:2900]
    return smollm2.tokenizer.decode(ids)


@pytest.mark.parametrize("target", [0.3, 0.45])
def test_fixed_target_density_hits_the_target_on_real_text(smollm2, real_text_prompt, target):
    out = smollm2.generate(
        real_text_prompt,
        SamplingParams(max_tokens=1),
        policy="fixed",
        policy_options={"target_density": target},
    )[0]
    stats = out.stats
    assert abs(stats["density"] - target) <= 0.01, stats["density"]
    # the solved budget is what every sparse (KV head, segment) kept, capped by the keys a segment sees
    assert stats["budget_tokens"]["max"] == stats["fixed_budget"]
    assert stats["fixed_budget"] % smollm2.sparse_config.block_size == 0
