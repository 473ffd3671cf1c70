"""Settings of segment-wise sparse prefill: the entropy policy (EntropyInfer), fixed baseline (CritiPrefill).

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

__all__ = ["SparsePrefillConfig", "load_sparse_config"]

BudgetMode = Literal["per_head", "reference"]
_MODES = ("per_head", "reference")


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
    alpha: float = 0.5  # budget step: B += alpha * B0 * (r - delta)
    delta: float = 0.4  # neutral entropy growth ratio (r == delta keeps the budget)
    mode: BudgetMode = "per_head"  # per_head: own count per KV head; reference: max over KV heads
    fixed_budget: int = 2048  # tokens kept per segment and head by the `fixed` (CritiPrefill) policy

    def __post_init__(self) -> None:
        for name in ("segment_size", "block_size", "base_budget", "fixed_budget"):
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
        for name in ("entropy_threshold", "alpha", "delta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
            if value < 0:
                raise ConfigError(f"{name}: must be >= 0, got {value}")
        if self.mode not in _MODES:
            raise ConfigError(f"mode: {self.mode!r} is not one of {list(_MODES)}")

    @property
    def max_budget(self) -> int:
        """Largest budget (tokens) the entropy policy can give: 3 * B0."""
        return 3 * self.base_budget


def load_sparse_config(name_or_path: str | Path = "entropy_long", **overrides: Any) -> SparsePrefillConfig:
    """A preset name (`entropy_long`, `entropy_short`) or a YAML path, with keyword overrides on top.

    Raises `ConfigError` for a missing file, an unknown key or a bad value (the message names the key).
    """
    return from_dict(SparsePrefillConfig, merge(load_yaml(name_or_path), overrides))
