"""The Serve app's typed config: what fails at load time (naming the key) instead of in every replica."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from entropyinfer.cluster.config import (
    IngressConfig,
    LimitsConfig,
    ReplicaConfig,
    app_config,
    load_serve_file,
)
from entropyinfer.cluster.launcher import apply_overrides
from entropyinfer.errors import ConfigError
from entropyinfer.policies.registry import POLICY_NAMES
from entropyinfer.shard.config import LLMConfig


@pytest.mark.parametrize(
    ("llm", "names"),
    [
        ({"base_budgett": 512}, "engine.llm.base_budgett"),
        ({"prefill_chunk_size": 1024, "segmnt_size": 64}, "engine.llm.segmnt_size"),
        ({"base_budget": "lots"}, "base_budget"),
        ({"prefill_chunk_size": 0}, "prefill_chunk_size"),
        ({"trust_remote_code": "yes"}, "trust_remote_code"),
        ({"policy_config": "no_such_preset"}, "no_such_preset"),
        ({"policy_config": "entropy_long", "alpha": "x"}, "alpha"),
        ({"load_format": "npz"}, "load_format"),
        ({"kv_capacity": 8}, "kv_capacity"),
        ({"max_batch_size": 8}, "max_num_seqs"),
    ],
)
def test_bad_llm_options_fail_at_load_naming_the_key(llm: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        app_config({"engine": {"llm": llm}})


def test_unknown_key_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as e:
        app_config({"engine": {"llm": {"base_budgett": 512}}})
    assert "base_budget" in str(e.value) and "kv_capacity" in str(e.value) and "max_num_seqs" in str(e.value)
    with pytest.raises(ConfigError, match=r"args\.engine\.overrides"):
        app_config({"engine": {"overrides": {"base_budget": 512}}})  # the former untyped bag is gone


def test_good_llm_options_load_into_the_typed_config() -> None:
    cfg = app_config(
        {
            "engine": {
                "llm": {
                    "policy": "entropy",
                    "policy_config": "entropy_long",
                    "base_budget": 512,
                    "prefill_chunk_size": 1024,
                    "kv_capacity": 2048,
                    "max_num_seqs": 8,
                }
            }
        }
    )
    llm = cfg.engine.llm
    assert isinstance(llm, LLMConfig) and llm.sparse_preset == "entropy_long"
    assert llm.sparse.base_budget == 512 and llm.engine.prefill_chunk_size == 1024
    assert llm.engine.max_num_seqs == 8
    kv = llm.kv.for_policy("entropy")
    assert kv is not None and kv.capacity == 2048 and llm.kv.for_policy("dense") is None
    # the same keywords give the same config through LLM(...)'s builder
    again = LLMConfig.from_keywords(
        {"policy": "entropy", "policy_config": "entropy_long", "base_budget": 512, "prefill_chunk_size": 1024,
         "kv_capacity": 2048, "max_num_seqs": 8}
    )  # fmt: skip
    assert again == llm
    # SmolLM2's 8k context picks the short preset when none is named
    assert ReplicaConfig().llm.sparse_preset == "entropy_short" and ReplicaConfig().llm.policy == "dense"
    assert load_serve_file("serve").app.engine.llm.policy == "entropy"  # what the shipped file serves
    assert ReplicaConfig().policies == POLICY_NAMES  # every registered policy unless the file narrows it


def test_default_policy_must_be_accepted() -> None:
    with pytest.raises(ConfigError, match=r"engine\.policies"):
        app_config({"engine": {"llm": {"policy": "snapkv"}, "policies": ["dense", "entropy"]}})
    with pytest.raises(ConfigError, match="unknown policy 'nope'"):
        app_config({"engine": {"policies": ["dense", "nope"]}})


def test_load_format_loads_from_a_serve_file_and_the_command_line(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"max_position_embeddings": 131072}')
    path = tmp_path / "serve.yaml"
    path.write_text(
        "applications:\n"
        "  - name: entropyinfer\n"
        "    import_path: entropyinfer.cluster.app:build_app\n"
        f"    args: {{engine: {{llm: {{model: {ckpt}, load_format: dummy}}, accelerator: gpu}}}}\n"
    )
    sf = load_serve_file(path)
    assert sf.app.engine.llm.model.load_format == "dummy" and sf.app.engine.accelerator == "gpu"
    assert sf.app.engine.llm.sparse_preset == "entropy_long"  # read from the folder's config.json
    assert ReplicaConfig().llm.model.load_format == "auto"
    over = apply_overrides(sf, load_format="auto", policy="fixed")
    assert over.app.engine.llm.model.load_format == "auto" and over.app.engine.llm.policy == "fixed"
    assert over.args["engine"]["llm"]["model"] == str(ckpt)  # what a cluster deploy sends: the file's keys
    with pytest.raises(ConfigError, match="load_format"):
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
