"""The Serve app's typed config: what fails at load time (naming the key) instead of in every replica."""

from __future__ import annotations

from typing import Any

import pytest

from entropyinfer.cluster.config import EngineConfig, IngressConfig, LimitsConfig, app_config
from entropyinfer.errors import ConfigError


@pytest.mark.parametrize(
    ("engine", "names"),
    [
        ({"overrides": {"base_budgett": 512}}, "engine.overrides.base_budgett"),
        ({"overrides": {"prefill_chunk_size": 1024, "segmnt_size": 64}}, "engine.overrides.segmnt_size"),
        ({"overrides": {"base_budget": "lots"}}, "base_budget"),
        ({"overrides": {"prefill_chunk_size": 0}}, "prefill_chunk_size"),
        ({"overrides": {"policy_config": "entropy_long"}}, "engine.policy_config"),
        ({"overrides": {"trust_remote_code": "yes"}}, "trust_remote_code"),
        ({"policy_config": "no_such_preset"}, "engine.policy_config"),
        ({"policy_config": "entropy_long", "overrides": {"alpha": "x"}}, "alpha"),
    ],
)
def test_bad_llm_options_fail_at_load_naming_the_key(engine: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        app_config({"engine": engine})


def test_good_llm_options_load() -> None:
    cfg = app_config(
        {
            "engine": {
                "policy_config": "entropy_long",
                "overrides": {"base_budget": 512, "prefill_chunk_size": 1024, "trust_remote_code": False},
            }
        }
    )
    assert cfg.engine.policy_config == "entropy_long" and cfg.engine.overrides["base_budget"] == 512
    assert EngineConfig(overrides={"segment_size": 64}).policy_config is None


def test_limits_and_ingress() -> None:
    assert LimitsConfig().max_body_bytes == 32 * 1024 * 1024
    assert LimitsConfig(max_batch_documents=10_000).max_wire_items == 10_000
    with pytest.raises(ConfigError):
        LimitsConfig(max_body_bytes=0)
    assert IngressConfig(num_replicas=2).num_replicas == 2  # replicas share the store on the head node
    with pytest.raises(ConfigError):
        IngressConfig(num_replicas=0)


def test_the_ingress_runs_on_the_head_node() -> None:
    pytest.importorskip("ray")
    from entropyinfer.cluster.app import build_app

    deployment = build_app({"ingress": {"num_replicas": 2}})._bound_deployment
    assert deployment.name == "Ingress" and deployment.num_replicas == 2
    assert deployment.ray_actor_options["resources"] == {"node:__internal_head__": 0.001}
