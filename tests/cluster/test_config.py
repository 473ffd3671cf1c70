"""The Serve app's typed config: what fails at load time (naming the key) instead of in every replica."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from entropyinfer.cluster.config import (
    EngineConfig,
    IngressConfig,
    LimitsConfig,
    app_config,
    load_serve_file,
)
from entropyinfer.cluster.launcher import apply_overrides
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
        ({"load_format": "npz"}, "engine.load_format"),
        ({"overrides": {"load_format": "dummy"}}, "engine.overrides.load_format"),
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


def test_load_format_loads_from_a_serve_file_and_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(
        "applications:\n"
        "  - name: entropyinfer\n"
        "    import_path: entropyinfer.cluster.app:build_app\n"
        "    args: {engine: {model: /ckpt, load_format: dummy, accelerator: gpu}}\n"
    )
    sf = load_serve_file(path)
    assert sf.app.engine.load_format == "dummy" and sf.app.engine.shard_args()["load_format"] == "dummy"
    assert EngineConfig().load_format == "auto"
    assert apply_overrides(sf, load_format="auto").app.engine.load_format == "auto"
    with pytest.raises(ConfigError, match=r"engine\.load_format"):
        apply_overrides(sf, load_format="safetensors")


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
