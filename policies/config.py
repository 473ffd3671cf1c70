"""Settings of the policies, torch-free: segment-wise sparse prefill (entropy, fixed) and decode-time KV
compression (latent, SnapKV; `policies/kv_compression.py` runs it).

Presets live in `configs/entropy_long.yaml` (the reference defaults, for 32k-128k prompts) and
`configs/entropy_short.yaml` (scaled down for 8k-context models and tests). Load them with
`load_sparse_config`; YAML goes through `entropyinfer.configs.loader`, so unknown keys and wrong types fail
with a `ConfigError` naming the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from entropyinfer.configs.loader import check_int, from_dict, load_yaml, merge
from entropyinfer.errors import ConfigError

__all__ = [
    "ADAPTIVE_CAPACITIES",
    "CAUSAL_MODES",
    "KVCompressionConfig",
    "SparsePrefillConfig",
    "load_kv_compression_config",
    "load_sparse_config",
]

BudgetMode = Literal["causal", "coverage", "per_head", "reference", "spread"]
Ranking = Literal["box", "queries"]
_RANKINGS = ("box", "queries")
_MODES = ("causal", "coverage", "per_head", "reference", "spread")
# modes whose decision for a segment uses only the segments up to it: chunked prefill and prefix caching
# reproduce a one-shot prefill's blocks (`shard.sparse_attention.SparsePrefill.chunkable`)
CAUSAL_MODES = ("causal", "coverage", "spread")


@dataclass(frozen=True)
class SparsePrefillConfig:
    """Segment-wise sparse prefill of one layer (see ALGORITHM.md, "Prefill").

    Lengths and budgets are in tokens; block counts are budgets // block_size.
    """

    segment_size: int = 512  # S: queries per segment (one block list per KV head and segment)
    block_size: int = 8  # b: keys per scored block
    base_budget: int = 2048  # B0: tokens kept per segment by a rigid head; dynamic heads range B0 .. 3*B0
    threshold_len: int = 4096  # segments starting before this position run dense (and the last one)
    entropy_threshold: float = 1e-5  # e_t: a head is rigid if every segment >= 1 has entropy below this
    # (mode causal: every segment 1..s, for segment s)
    alpha: float = 0.5  # budget step: B += alpha * B0 * (r - delta)
    delta: float = 0.4  # neutral entropy growth ratio (r == delta keeps the budget)
    # causal (default): own count per KV head, a head rigid at segment s while its entropy stayed below e_t in
    # segments 1..s (chunked prefill and prefix caching give one-shot's blocks); per_head: the same with the
    # paper's whole-prompt rigid test; reference: per_head's max over KV heads (both one-shot only);
    # spread: causal budgets from the entropy level (`policies/budgets.py`, fields spread_* below)
    mode: BudgetMode = "causal"
    fixed_budget: int = 2048  # tokens kept per segment and head by the `fixed` (CritiPrefill) policy
    # `fixed` policy: when set, the fixed budget is solved per prompt so that the prefill's mean density
    # (`shard.sparse_attention.SparsePrefill` stats: all layers, layer 0 and dense segments included) is this
    target_density: float | None = None
    # spread mode (`policies/budgets.py`): B = clip(spread_factor * b * V^(1 - spread_power) *
    # exp(Hs)^spread_power, min_budget, 3 * B0) tokens, Hs the entropy of the block distribution at logit
    # scale spread_scale / sqrt(d), V the visible blocks; rigid-so-far heads (Hs / log V < rigid_entropy in
    # every segment so far) keep rigid_budget tokens
    spread_scale: float = 0.5
    spread_factor: float = 0.25
    spread_power: float = 0.5
    min_budget: int = 512  # floor of the spread rule (entropy_short: 64)
    rigid_entropy: float = 0.5
    rigid_budget: int = 256  # below the floor (entropy_short: 32)
    # coverage mode (`policies/budgets.py`): per (KV head, segment) the fewest top blocks whose share of
    # softmax(coverage_scale / sqrt(d) * logits) over the visible blocks reaches `coverage`, clipped to
    # [min_budget, 3 * B0] tokens; causal (a segment's own logits only)
    coverage: float = 0.9
    coverage_scale: float = 1.0
    # which blocks a (KV head, segment) takes, its count given: box (the paper's: top block logits of the
    # segment's query max/min against the blocks' key max/min) or queries (`kernels/query_ranking.py`: the
    # largest softmax probability any sampled query of the segment gives the block, its logit the exact max
    # of q.k / sqrt(d) over the block's keys; every ranking_stride-th query is sampled). Budgets, entropy and
    # the rigid test come from the box profiling either way.
    ranking: Ranking = "box"
    ranking_stride: int = 8

    def __post_init__(self) -> None:
        for name in (
            "segment_size",
            "block_size",
            "base_budget",
            "fixed_budget",
            "min_budget",
            "rigid_budget",
            "ranking_stride",
        ):
            check_int(name, getattr(self, name), minimum=1)
        check_int("threshold_len", self.threshold_len, minimum=0)
        if self.segment_size % self.block_size:
            raise ConfigError(
                f"segment_size: must be a multiple of block_size ({self.block_size}), got {self.segment_size}"
            )
        for name in ("base_budget", "fixed_budget"):
            if getattr(self, name) < self.block_size:
                raise ConfigError(
                    f"{name}: must be at least block_size ({self.block_size}), got {getattr(self, name)}"
                )
        for name in (
            "entropy_threshold", "alpha", "delta", "spread_scale", "spread_factor", "rigid_entropy",
            "coverage", "coverage_scale",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
            if value < 0:
                raise ConfigError(f"{name}: must be >= 0, got {value}")
        if self.mode not in _MODES:
            raise ConfigError(f"mode: {self.mode!r} is not one of {list(_MODES)}")
        if self.ranking not in _RANKINGS:
            raise ConfigError(f"ranking: {self.ranking!r} is not one of {list(_RANKINGS)}")
        if self.ranking == "queries" and self.segment_size % self.ranking_stride:
            raise ConfigError(
                f"ranking_stride: must divide segment_size ({self.segment_size}), got {self.ranking_stride}"
            )
        p = self.spread_power
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p):
            raise ConfigError(f"spread_power: expected a finite number, got {p!r}")
        t = self.target_density
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 < t <= 1
        ):
            raise ConfigError(f"target_density: expected a number in (0, 1] or null, got {t!r}")
        if self.coverage > 1:
            raise ConfigError(f"coverage: a share of the attention mass, at most 1, got {self.coverage}")
        for name in ("min_budget", "rigid_budget"):
            if self.mode in ("spread", "coverage") and getattr(self, name) > self.max_budget:
                raise ConfigError(
                    f"{name}: must be at most 3 * base_budget ({self.max_budget}), got {getattr(self, name)}"
                )

    @property
    def causal(self) -> bool:
        """The entropy policy's decision for a segment uses only the segments up to it (`CAUSAL_MODES`)."""
        return self.mode in CAUSAL_MODES

    @property
    def max_budget(self) -> int:
        """Largest budget (tokens) the entropy policy can give, in every mode: 3 * B0."""
        return 3 * self.base_budget


def load_sparse_config(name_or_path: str | Path = "entropy_long", **overrides: Any) -> SparsePrefillConfig:
    """A preset name (`entropy_long`, `entropy_short`) or a YAML path, with keyword overrides on top.

    Raises `ConfigError` for a missing file, an unknown key or a bad value (the message names the key).
    """
    return from_dict(SparsePrefillConfig, merge(load_yaml(name_or_path), overrides))


# ---------------------------------------------------------------------- decode-time KV compression
Pooling = Literal["avg", "max", "none"]
GroupReduce = Literal["max", "mean"]
HeadCapacity = Literal["uniform", "entropy", "adaptive", "adaptive_layers"]
_POOLINGS = ("avg", "max", "none")
_REDUCES = ("max", "mean")
_HEAD_CAPACITIES = ("uniform", "entropy", "adaptive", "adaptive_layers")
SpSplit = Literal["exact", "learned"]
_SP_SPLITS = ("exact", "learned")
# capacities decided at compression time from the observation window's own scores (AdaKV-style)
ADAPTIVE_CAPACITIES = ("adaptive", "adaptive_layers")


@dataclass(frozen=True)
class KVCompressionConfig:
    """Decode-time KV compression (ALGORITHM.md, "Decode").

    Presets: `configs/latent.yaml`, `configs/snapkv.yaml`."""

    window: int = 32  # W: observation queries; the last W keys are always kept
    gap: int = 16  # N_D: decode steps on the full cache before compressing; -1 = SnapKV (right after prefill)
    capacity: int = 1024  # C: tokens kept per KV head (a layer's mean, with per-head capacities)
    pooling: Pooling = "avg"  # 1-D pooling of the scores over positions
    kernel_size: int = 5  # pooling kernel (odd)
    group_reduce: GroupReduce = "max"  # over the G query heads of a GQA group
    # uniform; entropy: per-head capacities from the prefill entropy; adaptive: from the window's scores at
    # compression time, the layer's Hkv * C shared so that the kept attention mass is largest (AdaKV);
    # adaptive_layers: the same over every head of every layer (the sequence's L * Hkv * C)
    head_capacity: HeadCapacity = "uniform"
    min_head_fraction: float = 0.5  # non-uniform capacities: each head keeps at least this part of C (and W)
    recompress_every: int = 0  # R: compress the compact cache again every R generated tokens; 0 = never
    # a sequence-parallel sequence's capacity over its segments: exact (each keeps its part of the global
    # top C - W, the whole score row all-gathered per layer) or learned (each keeps its share by the policy
    # actor's table of where compression keeps positions, `policies/segment_shares.py`; exact until the
    # actor has a table)
    sp_split: SpSplit = "exact"

    def __post_init__(self) -> None:
        for name, minimum in (("window", 1), ("capacity", 1), ("kernel_size", 1), ("recompress_every", 0)):
            check_int(name, getattr(self, name), minimum=minimum)
        check_int("gap", self.gap, minimum=-1)
        if self.gap == 0 or self.gap > self.window:
            raise ConfigError(
                f"gap: -1 (SnapKV: compress right after prefill) or 1 .. window ({self.window}), "
                f"got {self.gap}"
            )
        if self.capacity < self.window:
            raise ConfigError(f"capacity: must be at least window ({self.window}), got {self.capacity}")
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size: must be odd (same-length pooling), got {self.kernel_size}")
        for name, value, allowed in (
            ("pooling", self.pooling, _POOLINGS),
            ("group_reduce", self.group_reduce, _REDUCES),
            ("head_capacity", self.head_capacity, _HEAD_CAPACITIES),
            ("sp_split", self.sp_split, _SP_SPLITS),
        ):
            if value not in allowed:
                raise ConfigError(f"{name}: {value!r} is not one of {list(allowed)}")
        f = self.min_head_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0 < f <= 1:
            raise ConfigError(f"min_head_fraction: expected a number in (0, 1], got {f!r}")

    @property
    def method(self) -> str:
        return "snapkv" if self.gap < 0 else "latent"

    @property
    def compress_after(self) -> int:
        """Decode steps that run on the full cache before the first compression (0 for SnapKV)."""
        return max(self.gap, 0)

    @property
    def prompt_queries(self) -> int:
        """Prompt queries the observation window keeps after prefill: W (SnapKV) or W - N_D."""
        return self.window - self.compress_after

    @property
    def min_head_capacity(self) -> int:
        return max(self.window, math.ceil(self.min_head_fraction * self.capacity))

    @property
    def adaptive(self) -> bool:
        """Capacities decided at compression time from the observation window's scores."""
        return self.head_capacity in ADAPTIVE_CAPACITIES

    def max_head_capacity(self, num_kv_heads: int) -> int:
        """The most tokens one head keeps: C (uniform), else the floor plus all of a layer's spare
        (``floor + Hkv * (C - floor)``; `adaptive_layers` is capped there too)."""
        if self.head_capacity == "uniform":
            return self.capacity
        floor = self.min_head_capacity
        return floor + num_kv_heads * (self.capacity - floor)


def load_kv_compression_config(name_or_path: str | Path = "latent", **overrides: Any) -> KVCompressionConfig:
    """A preset name (`latent`, `snapkv`) or a YAML path, with keyword overrides on top.

    Raises `ConfigError` for a missing file, an unknown key or a bad value (the message names the key).
    """
    return from_dict(KVCompressionConfig, merge(load_yaml(name_or_path), overrides))
