"""Per-request head statistics of a sparse prefill and their aggregate across requests and shard groups.

Pure numpy, no Ray, no torch: what a shard pushes to the policy actor after each prefill (`HeadStats`, one
per request, compact arrays, a msgpack codec) and what the actor accumulates per model (`HeadProfile`).

`HeadStats` holds per (layer, global KV head, query segment): the entropy the budget rule read (the spread
entropy in mode `spread`, else the block entropy, nats), the blocks kept, and the captured-mass proxy
(`policies/head_scaling.py`); per (layer, KV head): rigid or dynamic; per segment: dense or sparse.

`HeadProfile` keeps per (layer, KV head) a running mean and variance of the normalised entropy (Welford;
one observation per sparse segment: ``H / ln(V)``, V the blocks the segment sees, so segments of
different lengths compare), how often the head was rigid, the mean captured mass and the mean budget used
(tokens per sparse segment), and how often its count hit what the segment sees (saturated). `merge` is
exact (Chan et al.'s parallel update): the profile of two shard groups' requests equals the profile of all
of them in one. It also tracks how stable the rigid set is across documents (mean Jaccard of consecutive
requests' rigid sets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

__all__ = ["HeadProfile", "HeadStats", "decode_stats", "encode_stats", "jaccard"]

WIRE_VERSION = 1


def _pack(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def _unpack(d: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(d["dtype"])
    if dtype.kind not in "biuf":
        raise ValueError(f"unexpected array dtype {dtype}")
    return np.frombuffer(d["data"], dtype=dtype).reshape(d["shape"]).copy()


@dataclass
class HeadStats:
    """One request's prefill statistics (arrays over the whole model's layers and KV heads).

    profiled: bool ``[L]`` layers that ran sparse (the others are all-NaN / 0 below);
    entropy: float32 ``[L, Hkv, nseg]`` the budget rule's entropy (nats);
    counts: int32 ``[L, Hkv, nseg]`` blocks kept (0 on dense segments);
    captured: float32 ``[L, Hkv, nseg]`` captured-mass proxy (1 on dense segments), NaN if not measured;
    rigid: bool ``[L, Hkv]``; dense: bool ``[nseg]``; table_version: the head budget table the request ran
    with (0: none)."""

    model: str
    seq_len: int
    segment_size: int
    block_size: int
    profiled: np.ndarray
    entropy: np.ndarray
    counts: np.ndarray
    captured: np.ndarray
    rigid: np.ndarray
    dense: np.ndarray
    table_version: int = 0
    mode: str = "causal"

    @property
    def shape(self) -> tuple[int, int]:
        """(layers, KV heads)."""
        return int(self.rigid.shape[0]), int(self.rigid.shape[1])

    def sparse_mask(self) -> np.ndarray:
        """bool ``[L, nseg]``: the (layer, segment) cells that ran sparse (profiled layer, segment >= 1, not
        dense)."""
        seg = ~self.dense.copy()
        if seg.size:
            seg[0] = False
        return self.profiled[:, None] & seg[None, :]

    def visible_blocks(self) -> np.ndarray:
        """int ``[nseg]``: blocks each segment sees (``s * S / b``)."""
        return np.arange(self.dense.shape[0]) * (self.segment_size // self.block_size)

    def normalised_entropy(self) -> np.ndarray:
        """float64 ``[L, Hkv, nseg]``: entropy over ln(visible blocks) (NaN where nothing is visible)."""
        v = self.visible_blocks().astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.entropy.astype(np.float64) / np.where(v > 1, np.log(np.maximum(v, 2)), np.nan)

    def density_parts(self) -> tuple[float, float]:
        """``(fixed, budget)``: the prefill density (causal QK work over dense, mean over layers and KV heads,
        as `policies.entropy.plan_density`) split into the part no budget changes (dense layers and
        segments, each segment's own keys) and the part of the selected blocks, which scales with them."""
        n, s_len, b = self.seq_len, self.segment_size, self.block_size
        nseg = self.dense.shape[0]
        total = n * (n + 1) / 2
        start = np.arange(nseg) * s_len
        end = np.minimum(start + s_len, n)
        dense_work = (end * (end + 1) - start * (start + 1)) / 2
        sparse = self.sparse_mask()  # [L, nseg]
        fixed = np.where(sparse, s_len * (s_len + 1) / 2, dense_work[None, :]).sum(-1)  # [L] per head
        budget = np.where(sparse[:, None, :], self.counts * float(s_len * b), 0.0).sum(-1).mean(-1)  # [L]
        return float(fixed.mean() / total), float(budget.mean() / total)

    def per_head(self) -> dict[str, np.ndarray]:
        """float64 ``[L, Hkv]`` means over each layer's sparse segments: entropy (normalised), budget
        (tokens), captured mass; NaN for dense layers."""
        mask = self.sparse_mask()[:, None, :]
        n = mask.sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = np.where(mask, self.normalised_entropy(), 0.0).sum(-1) / n
            bud = np.where(mask, self.counts * float(self.block_size), 0.0).sum(-1) / n
            cap = np.where(mask, self.captured.astype(np.float64), 0.0).sum(-1) / n
        nan = n == 0
        return {
            "entropy": np.where(nan, np.nan, ent),
            "budget": np.where(nan, np.nan, bud),
            "captured": np.where(nan, np.nan, cap),
        }


def encode_stats(stats: HeadStats) -> bytes:
    """msgpack bytes of `stats` (arrays as dtype, shape, raw bytes)."""
    body: dict[str, Any] = {"v": WIRE_VERSION}
    for f in dataclasses.fields(stats):
        value = getattr(stats, f.name)
        body[f.name] = _pack(value) if isinstance(value, np.ndarray) else value
    return bytes(msgpack.packb(body, use_bin_type=True))


def decode_stats(blob: bytes) -> HeadStats:
    """The `HeadStats` of `encode_stats` bytes (ValueError for another wire version or a bad body)."""
    body = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    if not isinstance(body, dict) or body.get("v") != WIRE_VERSION:
        raise ValueError(f"head stats: expected wire version {WIRE_VERSION}")
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(HeadStats):
        value = body.get(f.name, f.default)
        kw[f.name] = _unpack(value) if isinstance(value, dict) else value
    return HeadStats(**kw)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / |a | b| of two boolean masks (1.0 when both are empty)."""
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union


@dataclass
class HeadProfile:
    """Aggregated head statistics of one model: float64 ``[L, Hkv]`` sums and Welford moments.

    n: sparse segments observed; mean / m2: Welford mean and sum of squared deviations of the normalised
    entropy; requests: requests in which the head was profiled; rigid: of them, how many found it rigid;
    captured_sum / budget_sum / saturated: sums over the observed segments of the captured mass, the budget
    used (tokens) and whether the count was everything the segment sees. jaccard_sum / jaccard_n: Jaccard
    of consecutive requests' rigid sets (over the heads both profiled); last_rigid: the latest request's."""

    model: str
    num_layers: int
    num_kv_heads: int
    n: np.ndarray = field(init=False)
    mean: np.ndarray = field(init=False)
    m2: np.ndarray = field(init=False)
    requests: np.ndarray = field(init=False)
    rigid: np.ndarray = field(init=False)
    captured_sum: np.ndarray = field(init=False)
    budget_sum: np.ndarray = field(init=False)
    saturated: np.ndarray = field(init=False)
    total_requests: int = 0
    density_fixed_sum: float = 0.0  # `HeadStats.density_parts` summed over requests
    density_budget_sum: float = 0.0
    jaccard_sum: float = 0.0
    jaccard_n: int = 0
    last_rigid: np.ndarray | None = None
    last_profiled: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("n", "mean", "m2", "requests", "rigid", "captured_sum", "budget_sum", "saturated"):
            setattr(self, name, np.zeros((self.num_layers, self.num_kv_heads)))

    # ------------------------------------------------------------------------------------ updates
    def check(self, stats: HeadStats) -> None:
        if stats.model != self.model or stats.shape != (self.num_layers, self.num_kv_heads):
            raise ValueError(
                f"head stats of {stats.model!r} {stats.shape} do not fit the profile of {self.model!r} "
                f"({self.num_layers}, {self.num_kv_heads})"
            )

    def add(self, stats: HeadStats) -> None:
        """One request's statistics (ValueError for another model or shape)."""
        self.check(stats)
        mask = np.broadcast_to(stats.sparse_mask()[:, None, :], stats.entropy.shape)
        x = stats.normalised_entropy()
        k = mask.sum(-1).astype(np.float64)  # observations per head
        with np.errstate(divide="ignore", invalid="ignore"):
            mean_b = np.where(mask, x, 0.0).sum(-1) / k
            m2_b = np.where(mask, (x - mean_b[..., None]) ** 2, 0.0).sum(-1)
        mean_b, m2_b = np.nan_to_num(mean_b), np.nan_to_num(m2_b)
        self._combine(k, mean_b, m2_b)
        profiled = np.broadcast_to(stats.profiled[:, None], self.rigid.shape)
        self.requests += profiled
        self.rigid += profiled & stats.rigid
        cap = np.nan_to_num(stats.captured.astype(np.float64), nan=0.0)
        self.captured_sum += np.where(mask, cap, 0.0).sum(-1)
        self.budget_sum += np.where(mask, stats.counts * float(stats.block_size), 0.0).sum(-1)
        full = stats.counts >= stats.visible_blocks()[None, None, :]
        self.saturated += (mask & full).sum(-1)
        self.total_requests += 1
        fixed, budget = stats.density_parts()
        self.density_fixed_sum += fixed
        self.density_budget_sum += budget
        if stats.profiled.any():
            rigid_set = profiled & stats.rigid
            if self.last_rigid is not None and self.last_profiled is not None:
                both = profiled & self.last_profiled
                self.jaccard_sum += jaccard(rigid_set & both, self.last_rigid & both)
                self.jaccard_n += 1
            self.last_rigid, self.last_profiled = rigid_set.copy(), profiled.copy()

    def _combine(self, n_b: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a, n = self.n, self.n + n_b
        delta = mean_b - self.mean
        with np.errstate(divide="ignore", invalid="ignore"):
            self.mean = np.where(n > 0, self.mean + delta * np.where(n > 0, n_b / n, 0.0), 0.0)
            self.m2 = self.m2 + m2_b + np.where(n > 0, delta**2 * n_a * n_b / n, 0.0)
        self.n = n

    def merge(self, other: HeadProfile) -> None:
        """Add another profile of the same model (another shard group's): exact."""
        if (other.model, other.num_layers, other.num_kv_heads) != (
            self.model,
            self.num_layers,
            self.num_kv_heads,
        ):
            raise ValueError(f"cannot merge a profile of {other.model!r} into one of {self.model!r}")
        self._combine(other.n.copy(), other.mean.copy(), other.m2.copy())
        for name in ("requests", "rigid", "captured_sum", "budget_sum", "saturated"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.total_requests += other.total_requests
        self.density_fixed_sum += other.density_fixed_sum
        self.density_budget_sum += other.density_budget_sum
        self.jaccard_sum += other.jaccard_sum
        self.jaccard_n += other.jaccard_n

    # ------------------------------------------------------------------------------------ readouts
    def _ratio(self, num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)

    @property
    def variance(self) -> np.ndarray:
        """Sample variance of the normalised entropy (NaN below two observations)."""
        return self._ratio(self.m2, self.n - 1)

    @property
    def entropy_mean(self) -> np.ndarray:
        return np.where(self.n > 0, self.mean, np.nan)

    @property
    def rigid_frequency(self) -> np.ndarray:
        return self._ratio(self.rigid, self.requests)

    @property
    def captured_mean(self) -> np.ndarray:
        return self._ratio(self.captured_sum, self.n)

    @property
    def budget_mean(self) -> np.ndarray:
        return self._ratio(self.budget_sum, self.n)

    @property
    def saturated_frequency(self) -> np.ndarray:
        return self._ratio(self.saturated, self.n)

    @property
    def density(self) -> tuple[float, float] | None:
        """Mean ``(fixed, budget)`` density parts per request (None before the first)."""
        if not self.total_requests:
            return None
        return self.density_fixed_sum / self.total_requests, self.density_budget_sum / self.total_requests

    @property
    def rigid_jaccard(self) -> float | None:
        """Mean Jaccard similarity of consecutive requests' rigid sets (None before two requests)."""
        return self.jaccard_sum / self.jaccard_n if self.jaccard_n else None

    # ------------------------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists of floats): JSON and msgpack both carry it."""
        out: dict[str, Any] = {
            "model": self.model,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "total_requests": self.total_requests,
            "density_fixed_sum": self.density_fixed_sum,
            "density_budget_sum": self.density_budget_sum,
            "jaccard_sum": self.jaccard_sum,
            "jaccard_n": self.jaccard_n,
        }
        for name in ("n", "mean", "m2", "requests", "rigid", "captured_sum", "budget_sum", "saturated"):
            out[name] = getattr(self, name).tolist()
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> HeadProfile:
        p = HeadProfile(str(d["model"]), int(d["num_layers"]), int(d["num_kv_heads"]))
        for name in ("n", "mean", "m2", "requests", "rigid", "captured_sum", "budget_sum", "saturated"):
            a = np.asarray(d[name], dtype=np.float64)
            if a.shape != (p.num_layers, p.num_kv_heads):
                raise ValueError(f"profile field {name}: shape {a.shape}, expected {p.n.shape}")
            setattr(p, name, a)
        p.total_requests = int(d.get("total_requests", 0))
        p.density_fixed_sum = float(d.get("density_fixed_sum", 0.0))
        p.density_budget_sum = float(d.get("density_budget_sum", 0.0))
        p.jaccard_sum, p.jaccard_n = float(d.get("jaccard_sum", 0.0)), int(d.get("jaccard_n", 0))
        return p

    def summary(self) -> dict[str, Any]:
        """Per-(layer, head) readouts as nested lists (NaN as None), for the HTTP route and plots."""

        def rows(a: np.ndarray) -> list[list[float | None]]:
            return [[None if not np.isfinite(v) else round(float(v), 6) for v in r] for r in a]

        return {
            "model": self.model,
            "requests": self.total_requests,
            "rigid_jaccard": self.rigid_jaccard,
            "density": None if self.density is None else sum(self.density),
            "entropy_mean": rows(self.entropy_mean),
            "entropy_var": rows(self.variance),
            "rigid_frequency": rows(self.rigid_frequency),
            "captured_mean": rows(self.captured_mean),
            "budget_mean": rows(self.budget_mean),
            "saturated_frequency": rows(self.saturated_frequency),
        }
