"""Versioned per-head budget tables, the rebalancer that makes them, and head profiles on disk.

Pure numpy, no Ray. The policy actor (`cluster/policy_actor.py`) owns one `Rebalancer` per model: every
request's `HeadStats` goes into its `HeadProfile` (`policies/head_stats.py`), and a new `HeadBudgetTable`
(per-(layer, KV head) factors on the entropy rule's budgets, `policies/head_scaling.py`) is made at most
once per `every_requests` requests and `every_s` seconds (the version is part of the prefix-cache key, so
new versions must be rare).

Rebalancing (`rebalance`) is EXPERIMENTAL and off by default (`move_budget`): at matched density it did
not beat the entropy rule's own per-request budgets (`benchmarks/results/policy_rebalance*.md`: session 5's
rule lost, these defaults tie). Without it (and without a `density_target`) the rebalancer makes no table
versions at all: the actor only aggregates statistics (the heat map, the rigid-set stability). With
`move_budget`, over the heads seen in at least `min_requests` requests:
- donors: heads saturated (captured mass >= `mass_saturated`, or their count was everything the segment
  sees in >= `rigid_reliable` of their segments) and, only with `rigid_donors`, heads reliably rigid (rigid
  in >= `rigid_reliable` of their requests; the causal rule already keeps them at the rigid budget) keep
  `donor_scale` of their budget;
- receivers: the other heads whose captured mass is below `mass_target` share what the donors gave up, in
  proportion to their shortfall ``mass_target - captured`` (scale capped at `max_scale`); the total budget
  (tokens, weighted by each head's mean budget) is unchanged;
- with a `density_target`, every factor is then multiplied by ``g`` so that the profile's mean prefill
  density, ``fixed + g * budget`` (`HeadStats.density_parts`; linear in the budgets, caps aside), hits it.

Persistence: `save_profile` / `load_profile` write JSON with the model's identity (name, layers, KV heads);
a profile of another model raises `ProfileMismatchError` saying which.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from entropyinfer.errors import ConfigError, EntropyInferError
from entropyinfer.policies.head_stats import HeadProfile, HeadStats

__all__ = [
    "PROFILE_FORMAT",
    "HeadBudgetTable",
    "ProfileMismatchError",
    "RebalanceConfig",
    "Rebalancer",
    "load_profile",
    "load_shares",
    "rebalance",
    "save_profile",
]

PROFILE_FORMAT = "entropyinfer-head-profile/1"


class ProfileMismatchError(EntropyInferError, ValueError):
    """A saved head profile belongs to another model (name or shape) than the one served."""


@dataclass(frozen=True)
class HeadBudgetTable:
    """Budget factors per (layer, KV head) of one model; version 0 is the identity (no table)."""

    model: str
    version: int
    scales: np.ndarray  # float32 [L, Hkv]
    requests: int = 0  # requests in the profile it was made from
    created_at: float = 0.0

    @staticmethod
    def identity(model: str, num_layers: int, num_kv_heads: int) -> HeadBudgetTable:
        return HeadBudgetTable(model, 0, np.ones((num_layers, num_kv_heads), dtype=np.float32))

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.scales.shape[0]), int(self.scales.shape[1])

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "scales": self.scales.astype(float).tolist(),
            "requests": self.requests,
            "created_at": self.created_at,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> HeadBudgetTable:
        scales = np.asarray(d["scales"], dtype=np.float32)
        if scales.ndim != 2 or not np.isfinite(scales).all() or (scales <= 0).any():
            raise ValueError("head budget table: scales must be a [layers, kv_heads] array of positives")
        return HeadBudgetTable(
            str(d["model"]),
            int(d["version"]),
            scales,
            int(d.get("requests", 0)),
            float(d.get("created_at", 0.0)),
        )


@dataclass(frozen=True)
class RebalanceConfig:
    """How budget moves between heads, and how often a new table version may appear."""

    density_target: float | None = None  # mean prefill density to aim at (None: keep the budget total)
    move_budget: bool = False  # EXPERIMENTAL: move budget from donor heads to receivers (measured worse)
    rigid_donors: bool = False  # reliably rigid heads are donors too (else only saturated ones)
    every_requests: int = 32  # at most one new version per this many requests ...
    every_s: float = 30.0  # ... and per this many seconds
    warmup_requests: int = 8  # no table before this many requests
    min_requests: int = 4  # a head joins the rebalancing once profiled in this many requests
    rigid_reliable: float = 0.9
    mass_saturated: float = 0.98
    mass_target: float = 0.95
    # `gentle` in benchmarks/policy_rebalance.py (session 5's rule: rigid donors, 0.5, 2.0, lost more)
    donor_scale: float = 0.75
    max_scale: float = 1.5
    min_scale: float = 0.25

    def __post_init__(self) -> None:
        t = self.density_target
        if t is not None and not (isinstance(t, (int, float)) and 0 < t <= 1):
            raise ConfigError(f"density_target: expected a number in (0, 1] or null, got {t!r}")
        if self.every_requests < 1 or self.every_s < 0 or self.warmup_requests < 1 or self.min_requests < 1:
            raise ConfigError("every_requests >= 1, every_s >= 0, warmup_requests >= 1, min_requests >= 1")
        if not 0 < self.min_scale <= self.donor_scale <= 1 <= self.max_scale:
            raise ConfigError("need 0 < min_scale <= donor_scale <= 1 <= max_scale")
        for name in ("rigid_reliable", "mass_saturated", "mass_target"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name}: expected a number in (0, 1], got {getattr(self, name)!r}")

    @property
    def makes_tables(self) -> bool:
        """Whether tables can differ from the identity (else no versions are made)."""
        return self.move_budget or self.density_target is not None


def rebalance(profile: HeadProfile, cfg: RebalanceConfig) -> np.ndarray:
    """float32 ``[L, Hkv]`` budget factors from `profile` (see the module docstring); 1 for heads not seen."""
    scales = np.ones((profile.num_layers, profile.num_kv_heads))
    seen = (profile.requests >= cfg.min_requests) & (profile.n > 0)
    if seen.any() and cfg.move_budget:
        budget = np.nan_to_num(profile.budget_mean)
        captured = np.nan_to_num(profile.captured_mean, nan=1.0)
        rigid = np.nan_to_num(profile.rigid_frequency) >= cfg.rigid_reliable
        donors = seen & (
            (rigid & cfg.rigid_donors)
            | (captured >= cfg.mass_saturated)
            | (np.nan_to_num(profile.saturated_frequency) >= cfg.rigid_reliable)
        )
        receivers = seen & ~donors & (captured < cfg.mass_target)
        if donors.any() and receivers.any():
            scales[donors] = cfg.donor_scale
            freed = float((budget * (1 - scales) * donors).sum())
            weight = np.where(receivers, cfg.mass_target - captured, 0.0)
            den = float((weight * budget).sum())
            if den > 0:
                scales = np.where(receivers, np.minimum(1 + freed * weight / den, cfg.max_scale), scales)
    parts = profile.density
    if cfg.density_target is not None and parts is not None and parts[1] > 0:
        fixed, moved = parts
        # the budget part after the redistribution, per unit of the old (budget-weighted mean factor)
        weights = np.nan_to_num(profile.budget_mean) * seen
        mean_factor = float((scales * weights).sum() / weights.sum()) if weights.sum() > 0 else 1.0
        g = (cfg.density_target - fixed) / (moved * mean_factor)
        scales = scales * max(g, 0.0)
    return np.clip(scales, cfg.min_scale, cfg.max_scale).astype(np.float32)


@dataclass
class Rebalancer:
    """One model's profile and its current table; `observe` adds a request and maybe makes a version."""

    profile: HeadProfile
    config: RebalanceConfig = field(default_factory=RebalanceConfig)
    table: HeadBudgetTable | None = None
    _since: int = 0  # requests since the last version
    _last_at: float = -math.inf

    def __post_init__(self) -> None:
        p = self.profile
        if self.table is None:
            self.table = HeadBudgetTable.identity(p.model, p.num_layers, p.num_kv_heads)

    @property
    def current(self) -> HeadBudgetTable:
        assert self.table is not None
        return self.table

    def observe(self, stats: HeadStats, now: float | None = None) -> HeadBudgetTable | None:
        """Add one request's statistics; the new table if this request made one (rate-limited)."""
        self.profile.add(stats)
        self._since += 1
        return self.maybe_rebalance(now)

    def merge(self, other: HeadProfile, now: float | None = None) -> HeadBudgetTable | None:
        """Add another group's whole profile (counts as its requests for the rate limit)."""
        self.profile.merge(other)
        self._since += other.total_requests
        return self.maybe_rebalance(now)

    def due(self, now: float) -> bool:
        c = self.config
        return (
            c.makes_tables
            and self.profile.total_requests >= c.warmup_requests
            and self._since >= c.every_requests
            and now - self._last_at >= c.every_s
        )

    def maybe_rebalance(self, now: float | None = None) -> HeadBudgetTable | None:
        now = time.time() if now is None else now
        if not self.due(now):
            return None
        old = self.current
        self.table = HeadBudgetTable(
            old.model, old.version + 1, rebalance(self.profile, self.config), self.profile.total_requests, now
        )
        self._since, self._last_at = 0, now
        return self.table


# ------------------------------------------------------------------------------------------ persistence


def save_profile(
    path: str | Path,
    profile: HeadProfile,
    table: HeadBudgetTable | None = None,
    shares: dict[str, Any] | None = None,
) -> Path:
    """Write the profile (and table, and the segment shares' `ShareLearner.to_dict`) as JSON with the
    model's identity; atomic (a temporary file renamed)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "format": PROFILE_FORMAT,
        "model": profile.model,
        "num_layers": profile.num_layers,
        "num_kv_heads": profile.num_kv_heads,
        "profile": profile.to_dict(),
        "table": None if table is None else table.to_dict(),
        "segment_shares": shares,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, allow_nan=False))
    tmp.replace(path)
    return path


def load_profile(
    path: str | Path, model: str, num_layers: int, num_kv_heads: int
) -> tuple[HeadProfile, HeadBudgetTable | None]:
    """The profile and table saved at `path` for this model; `ProfileMismatchError` if they are another
    model's (name, layers or KV heads), ValueError if the file is not a head profile."""
    path = Path(path).expanduser()
    body = json.loads(path.read_text())
    if not isinstance(body, dict) or body.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{path}: not an entropyinfer head profile (format {PROFILE_FORMAT})")
    saved = (body.get("model"), body.get("num_layers"), body.get("num_kv_heads"))
    if saved != (model, num_layers, num_kv_heads):
        raise ProfileMismatchError(
            f"head profile {path} is of model {saved[0]!r} ({saved[1]} layers, {saved[2]} KV heads), "
            f"but this server runs {model!r} ({num_layers} layers, {num_kv_heads} KV heads): point "
            "policy.profile_path at a profile of this model, or delete the file to start a new one"
        )
    table = HeadBudgetTable.from_dict(body["table"]) if body.get("table") else None
    return HeadProfile.from_dict(body["profile"]), table


def load_shares(path: str | Path) -> dict[str, Any] | None:
    """The segment shares saved beside a head profile (`save_profile`), None if it holds none; call after
    `load_profile` has checked the file's model."""
    body = json.loads(Path(path).expanduser().read_text())
    shares = body.get("segment_shares") if isinstance(body, dict) else None
    return shares if isinstance(shares, dict) else None
