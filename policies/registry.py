"""Every attention policy in one table: its name, its prefill attention, its default KV compression, and
the config class of its hyperparameters.

A request names a policy (`LLM(policy=...)`, `generate(..., policy=...)`, the HTTP `policy` field); this table
is the only list of names. `shard/attention.py` builds the prefill attention from `Policy.prefill` and
`Policy.selection`; `shard/config.py` resolves `Policy.kv_compression` (a preset in `configs/`) when
`kv_compression="auto"`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from entropyinfer.errors import UnknownPolicyError
from entropyinfer.policies.config import SparsePrefillConfig

__all__ = ["POLICIES", "POLICY_NAMES", "SELECTIONS", "Policy", "get_policy"]

Prefill = Literal["dense", "sparse"]
Selection = Literal["entropy", "fixed"]
SELECTIONS: tuple[Selection, ...] = get_args(Selection)  # the block-selection rules of sparse prefill


@dataclass(frozen=True)
class Policy:
    """One attention policy.

    prefill: "dense" (exact causal attention) or "sparse" (segment-wise block-sparse attention).
    selection: for sparse prefill, how each (KV head, segment) gets its block count: "entropy" (EntropyInfer
        budgets from the block-attention entropy) or "fixed" (CritiPrefill: one budget for every head).
    kv_compression: the decode-time KV compression preset it runs with by default ("none", "latent",
        "snapkv": `configs/<name>.yaml`, fields `policies.kv_compression.KVCompressionConfig`).
    config: the dataclass of its prefill hyperparameters (None: it has none).
    """

    name: str
    prefill: Prefill
    selection: Selection | None
    kv_compression: str
    config: type[SparsePrefillConfig] | None
    summary: str

    def __post_init__(self) -> None:
        if (self.prefill == "sparse") != (self.selection is not None):
            raise ValueError(f"policy {self.name!r}: sparse prefill needs a selection rule, dense none")
        if (self.config is not None) != (self.prefill == "sparse"):
            raise ValueError(f"policy {self.name!r}: sparse prefill has a config class, dense none")

    @property
    def sparse(self) -> bool:
        return self.prefill == "sparse"


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("dense", "dense", None, "none", None, "dense prefill, full KV cache"),
        Policy(
            "entropy",
            "sparse",
            "entropy",
            "latent",
            SparsePrefillConfig,
            "EntropyInfer: entropy-budgeted sparse prefill, then latent KV compression in decode",
        ),
        Policy(
            "fixed",
            "sparse",
            "fixed",
            "none",
            SparsePrefillConfig,
            "CritiPrefill: the same block scoring with one fixed budget, full KV cache",
        ),
        Policy("snapkv", "dense", None, "snapkv", None, "dense prefill, SnapKV compression right after it"),
    )
}

POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)


def get_policy(name: str) -> Policy:
    """The policy called `name`; `UnknownPolicyError` listing the known names otherwise."""
    policy = POLICIES.get(name) if isinstance(name, str) else None
    if policy is None:
        raise UnknownPolicyError(f"unknown policy {name!r}; choose one of: {', '.join(POLICY_NAMES)}")
    return policy
