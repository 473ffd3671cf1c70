"""Learned shares of KV-compression capacity over a prompt's positions, and the split of a sequence-parallel
sequence's capacity across its segments with them (the learned alternative to the exact global top-k split).

The exact split (`shard/parallel/sp_compress.py`, ``kv_compression.sp_split: exact``, the default) keeps,
per (layer, KV head), what one rank would keep: it all-gathers the whole ``[G, length]`` row of window
probabilities to every SP rank, per layer. The learned split (``sp_split: learned``) needs only the
per-query log-sum-exp and the pooling edge columns of every rank: each segment keeps its own top ``b_j``
positions, ``b_j`` its share of the head's prefix budget ``C - W``, learned across requests:

1. `kept_histogram`: after each sequence's first compression by an exact plan (one rank, a TP group, or SP
   with the exact split; never a learned one, which would teach the table itself) the
   fraction of the positions kept from the prefix in each of `POSITION_BINS` equal bins of relative
   position (``position / prefix length``), per (layer, KV head), weight 1 where a selection happened
   (the prefix longer than what it keeps). The shard pushes them as `KeepStats` (msgpack) to the policy
   actor, fire and forget.
2. `ShareLearner` (in the actor): the running mean of those fractions per (layer, KV head) and, rate-limited
   like head budget tables (at most one version per ``every_requests`` compressions and ``every_s``
   seconds, none before ``warmup_requests``), a versioned `SegmentShares` table. Not part of the
   prefix-cache key: compression never touches shared prompt pages.
3. The shard pins the table per request; at compression `span_shares` turns its bins into each segment's
   share of the prefix (the bins' mass over the segment's range of positions, uniform inside a bin) and
   `split_budget` into integer budgets (largest remainder, capped by the prefix positions each segment
   holds, overflow to the others): computed alike on every rank, with no communication.

Numpy only (the policy actor and the HTTP edge import it without torch); the torch side, `kept_histogram`,
`span_shares` and `split_budget`, is `policies/segment_split.py`.

Segments with more of the kept mass keep more; a head whose kept positions sit at the sink and the recent
end gives the first and the last segment most of its capacity. Shares are of *kept positions*, not of raw
attention mass: a sink with half of a head's mass needs a few slots, not half of them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

__all__ = [
    "POSITION_BINS",
    "KeepStats",
    "SegmentShares",
    "ShareLearner",
    "decode_keep_stats",
    "encode_keep_stats",
]

POSITION_BINS = 16
WIRE_VERSION = 1


@dataclass
class KeepStats:
    """One request's `kept_histogram` for every (layer, KV head) of the model (what a shard pushes)."""

    model: str
    fractions: np.ndarray  # float32 [L, Hkv, bins]
    weights: np.ndarray  # float32 [L, Hkv]

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.fractions.shape[0]), int(self.fractions.shape[1])


def _pack(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return {"shape": list(a.shape), "data": a.tobytes()}


def _unpack(d: Any, ndim: int) -> np.ndarray:
    shape: list[int] = d.get("shape") if isinstance(d, dict) else None  # type: ignore[assignment]
    ok = isinstance(shape, list) and len(shape) == ndim and all(type(n) is int and n >= 0 for n in shape)
    if not ok or not isinstance(d.get("data"), bytes) or len(d["data"]) != 4 * math.prod(shape):
        raise ValueError("keep stats: malformed array")
    return np.frombuffer(d["data"], dtype=np.float32).reshape(shape).copy()


def encode_keep_stats(stats: KeepStats) -> bytes:
    body = {"v": WIRE_VERSION, "model": stats.model, "fractions": _pack(stats.fractions)}
    body["weights"] = _pack(stats.weights)
    return bytes(msgpack.packb(body, use_bin_type=True))


def decode_keep_stats(blob: bytes) -> KeepStats:
    """ValueError for another wire version or a malformed body."""
    body = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    if not isinstance(body, dict) or body.get("v") != WIRE_VERSION or not isinstance(body.get("model"), str):
        raise ValueError(f"keep stats: expected wire version {WIRE_VERSION}")
    stats = KeepStats(body["model"], _unpack(body.get("fractions"), 3), _unpack(body.get("weights"), 2))
    if stats.weights.shape != stats.fractions.shape[:2]:
        raise ValueError("keep stats: fractions and weights disagree on the shape")
    return stats


# ------------------------------------------------------------------------------ the table and its learner
@dataclass(frozen=True)
class SegmentShares:
    """A versioned table of where compression keeps positions: float32 ``[L, Hkv, bins]``, each row sums to
    1 (uniform for a head never observed). Version 0: no table yet (the exact split runs)."""

    model: str
    version: int
    bins: np.ndarray
    requests: int = 0
    made_at: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.bins.shape[0]), int(self.bins.shape[1])

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "bins": self.bins.astype(np.float32).tolist(),
            "requests": self.requests,
            "made_at": self.made_at,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentShares:
        bins = np.asarray(d["bins"], dtype=np.float32)
        if bins.ndim != 3 or not np.isfinite(bins).all() or (bins < 0).any():
            raise ValueError("segment shares: bins must be finite, >= 0, [layers, kv heads, bins]")
        return cls(str(d["model"]), int(d["version"]), bins, int(d.get("requests", 0)), float(d["made_at"]))


@dataclass
class ShareLearner:
    """One model's running mean of `KeepStats` and its current `SegmentShares` (rate-limited versions)."""

    model: str
    num_layers: int
    num_kv_heads: int
    every_requests: int = 32
    every_s: float = 30.0
    warmup_requests: int = 8
    bins: int = POSITION_BINS
    sums: np.ndarray = field(init=False)
    weights: np.ndarray = field(init=False)
    requests: int = 0
    table: SegmentShares | None = None
    _since: int = 0
    _last_at: float = -math.inf

    def __post_init__(self) -> None:
        self.sums = np.zeros((self.num_layers, self.num_kv_heads, self.bins))
        self.weights = np.zeros((self.num_layers, self.num_kv_heads))

    def observe(self, stats: KeepStats, now: float | None = None) -> SegmentShares | None:
        """Add one compression's stats (ValueError for another model or shape); the new table if due."""
        want = (self.num_layers, self.num_kv_heads, self.bins)
        if stats.model != self.model or stats.fractions.shape != want:
            raise ValueError(
                f"keep stats of {stats.model} {stats.fractions.shape}, expected {self.model} {want}"
            )
        self.sums += stats.fractions
        self.weights += stats.weights
        self.requests += 1
        self._since += 1
        now = time.time() if now is None else now
        due = self.requests >= self.warmup_requests and self._since >= self.every_requests
        if not due or now - self._last_at < self.every_s:
            return None
        version = 1 if self.table is None else self.table.version + 1
        self.table = SegmentShares(self.model, version, self.mean(), self.requests, now)
        self._since, self._last_at = 0, now
        return self.table

    def to_dict(self) -> dict[str, Any]:
        """What the policy actor saves beside its head profile (`head_budgets.save_profile`)."""
        table = None if self.table is None else self.table.to_dict()
        return {"sums": self.sums.tolist(), "weights": self.weights.tolist(), "requests": self.requests,
                "table": table}  # fmt: skip

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from `to_dict` (a warm start; ValueError if its shape is not this learner's)."""
        sums, weights = np.asarray(saved["sums"], dtype=np.float64), np.asarray(saved["weights"], np.float64)
        if sums.shape != self.sums.shape or weights.shape != self.weights.shape:
            raise ValueError(f"segment shares of shape {sums.shape}, expected {self.sums.shape}")
        self.sums, self.weights, self.requests = sums, weights, int(saved["requests"])
        self.table = SegmentShares.from_dict(saved["table"]) if saved.get("table") else None

    def mean(self) -> np.ndarray:
        """float32 ``[L, Hkv, bins]``: the mean fractions, uniform where a head was never observed."""
        w = self.weights[..., None]
        uniform = np.full_like(self.sums, 1.0 / self.bins)
        return np.where(w > 0, self.sums / np.maximum(w, 1e-12), uniform).astype(np.float32)

    @property
    def current(self) -> SegmentShares:
        if self.table is not None:
            return self.table
        empty = np.full((self.num_layers, self.num_kv_heads, self.bins), 1.0 / self.bins, dtype=np.float32)
        return SegmentShares(self.model, 0, empty)
