"""`LLMConfig`: flat `LLM(...)` keywords into one frozen, nested config, with errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from entropyinfer import LLM, ConfigError, SamplingParams, UnknownPolicyError
from entropyinfer.configs.loader import KeywordSection, split_keywords
from entropyinfer.policies.registry import POLICY_NAMES
from entropyinfer.shard.config import (
    DENSE_PAIRS_PER_BATCHED_TOKEN,
    EngineConfig,
    LLMConfig,
    default_sparse_preset,
)


@pytest.fixture(scope="module")
def folder(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


def test_keywords_land_in_their_sections() -> None:
    cfg = LLMConfig.from_keywords(
        {
            "model": "smollm2-135m",
            "policy": "entropy",
            "dtype": "bf16",
            "max_model_len": 4096,
            "prefill_chunk_size": 512,
            "max_num_seqs": 4,
            "base_budget": 512,
            "kv_capacity": 2048,
            "kv_compression": "latent",
        }
    )
    assert cfg.model.dtype == "bf16" and cfg.model.max_model_len == 4096
    assert cfg.engine == EngineConfig(prefill_chunk_size=512, max_num_seqs=4)
    assert cfg.sparse.base_budget == 512 and cfg.sparse_preset == "entropy_short"  # SmolLM2: 8k context
    # kv_compression names one preset: every policy runs it, with the kv_ field on top
    assert all(cfg.kv.for_policy(p) is not None for p in POLICY_NAMES)
    assert {cfg.kv.for_policy(p).capacity for p in POLICY_NAMES} == {2048}  # type: ignore[union-attr]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.policy = "dense"  # type: ignore[misc]


def test_auto_kv_compression_follows_the_registry() -> None:
    cfg = LLMConfig.from_keywords({"kv_capacity": 256})
    latent, snapkv = cfg.kv.for_policy("entropy"), cfg.kv.for_policy("snapkv")
    assert latent is not None and latent.method == "latent" and latent.capacity == 256
    assert snapkv is not None and snapkv.method == "snapkv" and snapkv.capacity == 256
    assert cfg.kv.for_policy("dense") is None and cfg.kv.for_policy("fixed") is None
    assert all(v is None for v in LLMConfig.from_keywords({"kv_compression": "none"}).kv.by_policy.values())


@pytest.mark.parametrize(
    ("keywords", "error", "message"),
    [
        ({"base_budgett": 1}, ConfigError, "unknown config key.*base_budgett.*valid keys: .*base_budget"),
        ({"kv_capacty": 1}, ConfigError, "kv_capacty.*kv_capacity"),
        ({"prefill_chunk_size": 0}, ConfigError, "prefill_chunk_size: must be >= 1"),
        ({"max_num_seqs": True}, ConfigError, "max_num_seqs: expected an integer"),
        ({"max_batch_size": 8}, ConfigError, "renamed to max_num_seqs"),
        ({"dtype": "fp8"}, ConfigError, "dtype: 'fp8'"),
        ({"kv_capacity": 8}, ConfigError, "kv_capacity"),
        ({"kv_compression": "nope"}, ConfigError, "nope"),
        ({"policy_config": "nope"}, ConfigError, "nope"),
        ({"sequence_parallel_size": 0}, ConfigError, "sequence_parallel_size: must be >= 1"),
        ({"max_dense_prefill_pairs": "max"}, ConfigError, "max_dense_prefill_pairs: 'max' matches none"),
        ({"max_dense_prefill_pairs": 0}, ConfigError, "max_dense_prefill_pairs: must be >= 1"),
        ({"policy": "magic"}, UnknownPolicyError, "dense, entropy, fixed, snapkv"),
        ({"ranking": "best"}, ConfigError, "ranking: 'best' is not one of"),
        (
            {"ranking": "queries", "ranking_stride": 3},
            ConfigError,
            "ranking_stride: must divide segment_size",
        ),
    ],
)
def test_bad_keywords_name_the_key(keywords: dict[str, object], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        LLMConfig.from_keywords(keywords)


def test_the_dense_prefill_cut_follows_the_token_budget_unless_set() -> None:
    def pairs(**kw: object) -> int | None:
        return LLMConfig.from_keywords(kw).engine.dense_prefill_pairs()

    assert pairs(max_num_batched_tokens=1024) == 1 << 24  # the latency setting measured on the H200
    assert pairs(max_num_batched_tokens=256) == 1 << 24  # never finer
    assert pairs(max_num_batched_tokens=4096) == 1 << 26
    assert pairs() == 8192 * DENSE_PAIRS_PER_BATCHED_TOKEN == 1 << 27
    assert pairs(max_num_batched_tokens=512, max_dense_prefill_pairs=1 << 20) == 1 << 20
    assert pairs(max_dense_prefill_pairs=None) is None


def test_split_keywords_prefixes_and_unknown_keys() -> None:
    sections = (KeywordSection("a", ("x", "y")), KeywordSection("b", ("x", "z"), prefix="b_"))
    assert split_keywords({"x": 1, "b_x": 2, "b_z": 3}, sections) == {"a": {"x": 1}, "b": {"x": 2, "z": 3}}
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): top\.w; valid keys: b_x, b_z, x, y"):
        split_keywords({"w": 1}, sections, "top")


def test_the_default_preset_follows_the_context(folder: Path) -> None:
    assert default_sparse_preset(8192) == "entropy_short" and default_sparse_preset(131072) == "entropy_long"
    assert default_sparse_preset(None) == "entropy_long"
    assert LLMConfig.from_keywords({"model": str(folder)}).sparse_preset == "entropy_short"  # 1024 tokens


def test_llm_uses_the_config_max_model_len_and_max_num_seqs(folder: Path) -> None:
    llm = LLM(str(folder), load_format="dummy", device="cpu", max_model_len=64, max_num_seqs=2)
    assert llm.max_context == 64 and llm.config.engine.max_num_seqs == 2
    outs = llm.generate(["a", "b", "c"], SamplingParams(max_tokens=2))  # the third waits for a free slot
    assert [len(o.token_ids) for o in outs] == [2, 2, 2] or all(o.finish_reason == "stop" for o in outs)
    with pytest.raises(ConfigError, match="max_model_len=2048 exceeds the model's context of 1024"):
        LLM(str(folder), load_format="dummy", device="cpu", max_model_len=2048)
    again = LLM.from_config(llm.config)
    assert again.config is llm.config and again.max_context == 64


def test_per_call_policy_options_are_checked_and_applied(folder: Path) -> None:
    llm = LLM(str(folder), load_format="dummy", device="cpu", policy="fixed", warm_up_kernels=False)
    prompt = "x" * 700  # one byte = one token: long enough for sparse segments under the short preset
    params = SamplingParams(max_tokens=1)
    small = llm.generate(prompt, params, policy_options={"fixed_budget": 8})[0].stats["density"]
    large = llm.generate(prompt, params, policy_options={"fixed_budget": 512})[0].stats["density"]
    assert small < large <= 1.0
    assert llm.config.sparse.fixed_budget == 256  # the instance's config is unchanged
    with pytest.raises(ConfigError, match="fixed_budgt"):
        llm.generate(prompt, params, policy_options={"fixed_budgt": 8})
    # the block order is a per-call option too: same count of blocks, another choice of them
    ranked = llm.generate(prompt, params, policy_options={"fixed_budget": 8, "ranking": "queries"})[0]
    assert ranked.stats["density"] == small


def test_an_automatic_preset_is_settled_where_the_model_loads(folder: Path, tmp_path: Path) -> None:
    # the checkpoint is not readable where the config is built: the guess is the long-context preset ...
    cfg = LLMConfig.from_keywords({"model": str(tmp_path / "elsewhere"), "base_budget": 128})
    assert cfg.sparse_auto and cfg.sparse_preset == "entropy_long"
    # ... and the loaded model's 1024-token context settles it, the sparse keywords applied again
    settled = cfg.for_context(1024)
    assert settled.sparse_preset == "entropy_short" and settled.sparse.base_budget == 128
    assert settled.sparse.segment_size == LLMConfig.from_keywords({"model": str(folder)}).sparse.segment_size
    named = LLMConfig.from_keywords({"model": str(tmp_path / "elsewhere"), "policy_config": "entropy_long"})
    assert not named.sparse_auto and named.for_context(1024) is named
    llm = LLM.from_config(
        dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, model=str(folder), load_format="dummy", device="cpu")
        )
    )
    assert llm.config.sparse_preset == "entropy_short" and llm.sparse_config.base_budget == 128


def test_an_unknown_policy_names_its_key() -> None:
    with pytest.raises(UnknownPolicyError, match=r"engine\.llm\.policy: unknown policy 'snap'"):
        LLMConfig.from_keywords({"policy": "snap"}, "engine.llm")


def test_adaptive_kv_capacities_with_tensor_parallelism_are_refused() -> None:
    """Adaptive capacities split a layer's tokens over all its heads' window scores; a rank sees its own heads
    only, so TP > 1 would run uniform capacities silently: refused, naming the key."""
    with pytest.raises(ConfigError, match=r"kv_head_capacity='adaptive'.*tensor_parallel_size=3"):
        LLMConfig.from_keywords(
            dict(model="smollm2-135m", policy="entropy", kv_head_capacity="adaptive", tensor_parallel_size=3)
        )
    cfg = LLMConfig.from_keywords(dict(model="smollm2-135m", policy="entropy", kv_head_capacity="adaptive"))
    assert cfg.kv.for_policy("entropy").head_capacity == "adaptive"  # type: ignore[union-attr]
