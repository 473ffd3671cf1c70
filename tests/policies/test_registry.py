"""The policy registry: the one table of policy names, prefill kinds, default KV compression and configs."""

from __future__ import annotations

import pytest

from entropyinfer.errors import UnknownPolicyError
from entropyinfer.policies.config import SparsePrefillConfig
from entropyinfer.policies.registry import POLICIES, POLICY_NAMES, SELECTIONS, Policy, get_policy
from entropyinfer.shard.attention import DensePrefill, build_prefill_attention
from entropyinfer.shard.sparse_attention import SparsePrefill


def test_the_table_is_the_one_list_of_names() -> None:
    assert POLICY_NAMES == ("dense", "entropy", "fixed", "snapkv")
    assert {p.selection for p in POLICIES.values() if p.sparse} == set(SELECTIONS)
    assert {p.name: p.kv_compression for p in POLICIES.values()} == {
        "dense": "none", "entropy": "latent", "fixed": "none", "snapkv": "snapkv"
    }  # fmt: skip


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_each_policy_builds_its_prefill_attention(name: str) -> None:
    attention = build_prefill_attention(name, SparsePrefillConfig())
    entry = get_policy(name)
    assert isinstance(attention, SparsePrefill if entry.prefill == "sparse" else DensePrefill)
    if isinstance(attention, SparsePrefill):
        assert attention.policy == entry.selection and entry.config is SparsePrefillConfig


def test_unknown_names_and_inconsistent_rows_fail() -> None:
    with pytest.raises(UnknownPolicyError, match="choose one of: dense, entropy, fixed, snapkv"):
        get_policy("magic")
    with pytest.raises(ValueError, match="selection rule"):
        Policy("bad", "sparse", None, "none", SparsePrefillConfig, "sparse with no rule")
    with pytest.raises(ValueError, match="config class"):
        Policy("bad", "dense", None, "none", SparsePrefillConfig, "dense with a config")
