"""What a sparse prefill has decided so far, per layer: the record a chunked prefill carries from chunk to
chunk (`LayerRecord`, device tensors), and its snapshot for prefix caching (`PrefillState`, device clones).

The causal budget rules (`mode: causal` / `spread`, and `fixed`) decide segment s from the profiling of
segments 0..s of the same layer only, so the record of one layer is its profiling history: the entropy (and
spread entropy) of every segment so far, plus the counts chosen (for the statistics). A request that reuses
another's cached KV pages for the first k segments continues from the writer's `PrefillState` at k segments
and chooses exactly the blocks a one-shot prefill of its own prompt would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from entropyinfer.kernels.block_selection_ref import dense_segment_mask, rigid_heads
from entropyinfer.policies.config import SparsePrefillConfig
from entropyinfer.policies.entropy import plan_density_tensor

__all__ = ["LayerRecord", "LayerState", "PrefillState", "head_entropy", "prefill_stats", "sparse_counts"]


@dataclass(frozen=True)
class LayerState:
    """One profiled layer after the first ``segments`` segments (tensors on the prefill's device).

    entropy: float32 ``[Hkv, segments]`` block entropy per (KV head, segment) (segment 0: the unused value of
        the profiling, ln(nblocks)); spread: float32 ``[Hkv, segments]`` the spread entropy (mode `spread`),
        else None; counts: int32 ``[Hkv, segments]`` the blocks kept (for the statistics)."""

    entropy: torch.Tensor
    spread: torch.Tensor | None
    counts: torch.Tensor


@dataclass(frozen=True)
class PrefillState:
    """Snapshot of a causal prefill after its first ``segments`` segments (``tokens = segments * S``).

    policy: the registry name's selection ("dense", "entropy", "fixed"); key: fingerprint of everything
    that shaped the blocks (policy and the layers' config): prefix caching keys pages with it, and `resume`
    refuses a state of another key. layers: one `LayerState` per layer, None for a layer that ran dense
    (layer 0 of the sparse policies; every layer of dense)."""

    policy: str
    key: str
    segment_size: int
    segments: int
    layers: tuple[LayerState | None, ...] = ()

    @property
    def tokens(self) -> int:
        return self.segments * self.segment_size


@dataclass
class LayerRecord:
    """One sparse layer's decisions so far in a running prefill (device tensors, grown chunk by chunk).

    entropy / spread / counts: ``[Hkv, segments so far]`` as `LayerState`; rigid: bool ``[Hkv]`` the rule's
    rigid test at the last segment profiled (after the last chunk: the heads the statistics count)."""

    entropy: torch.Tensor
    counts: torch.Tensor
    spread: torch.Tensor | None = None
    rigid: torch.Tensor | None = None
    _on_host: bool = field(default=False, repr=False)  # resumed from a PrefillState, not yet on the device

    @property
    def segments(self) -> int:
        return self.entropy.shape[1]

    def to(self, device: torch.device) -> None:
        """Move a resumed record to the device of the chunks (once)."""
        if self._on_host:
            self.entropy = self.entropy.to(device)
            self.counts = self.counts.to(device)
            self.spread = None if self.spread is None else self.spread.to(device)
            self._on_host = False

    def append(
        self, entropy: torch.Tensor, counts: torch.Tensor, spread: torch.Tensor | None, rigid: torch.Tensor
    ) -> None:
        self.entropy = torch.cat([self.entropy, entropy], dim=1)
        self.counts = torch.cat([self.counts, counts], dim=1)
        if spread is not None:
            self.spread = spread if self.spread is None else torch.cat([self.spread, spread], dim=1)
        self.rigid = rigid

    def state_at(self, segments: int) -> LayerState:
        # device clones, no copy to the host: a snapshot per chunk must not wait for the GPU
        spread = None if self.spread is None else self.spread[:, :segments].clone()
        return LayerState(self.entropy[:, :segments].clone(), spread, self.counts[:, :segments].clone())

    @staticmethod
    def empty(num_kv_heads: int, device: torch.device, spread: bool) -> LayerRecord:
        z = torch.zeros(num_kv_heads, 0, device=device)
        return LayerRecord(z, z.to(torch.int32), z.clone() if spread else None)

    @staticmethod
    def resumed(state: LayerState) -> LayerRecord:
        return LayerRecord(state.entropy, state.counts, state.spread, None, _on_host=True)


# ---------------------------------------------------------------------------------------------- statistics
# `records`: the layers reported as sparse (every profiled layer, none for a prompt too short to be sparse);
# `layers`: the layers run (layer 0 and the unreported ones count as dense).


def sparse_counts(
    records: dict[int, LayerRecord], seq_len: int, cfg: SparsePrefillConfig
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sparse layer, in order: ``(counts [Hkv, nseg], dense_segments [nseg])`` of the whole prompt."""
    return [
        (rec.counts, dense_segment_mask(seq_len, cfg.segment_size, cfg.threshold_len, rec.counts.device))
        for _, rec in sorted(records.items())
    ]


def head_entropy(records: dict[int, LayerRecord], layers: int, num_kv_heads: int) -> torch.Tensor | None:
    """float32 ``[layers, Hkv]`` (CPU): each KV head's mean block entropy over segments >= 1, NaN for
    layers that ran dense; None if no layer was profiled."""
    if not records:
        return None
    order = sorted(records)
    means = torch.stack([records[li].entropy[:, 1:].float().mean(dim=1) for li in order]).detach().cpu()
    out = torch.full((max(layers, order[-1] + 1), num_kv_heads), float("nan"))
    out[order] = means  # one read from the device, not one per layer
    return out


def prefill_stats(
    records: dict[int, LayerRecord], layers: int, seq_len: int, cfg: SparsePrefillConfig, policy: str
) -> dict[str, Any]:
    """The statistics of a prefill (syncs with the device): ``density`` (mean over layers of
    `plan_density`, 1 for dense layers), ``rigid_fraction`` (mean over profiled layers) and per layer,
    ``rigid_fraction_reference`` (mode spread: the reference's whole-prompt test), ``budget_tokens``
    (mean / min / max over sparse (layer, KV head, segment), and the base budget)."""
    layers = max(layers, max(records, default=-1) + 1)
    s_len, b = cfg.segment_size, cfg.block_size
    order = sorted(records)
    counts = dict(zip(order, sparse_counts(records, seq_len, cfg), strict=True))
    # every number on the device first, then one read per kind: a sync per layer cost a 128k prompt's last
    # step ~100 of them (benchmarks/stall_trace.py)
    sparse_density = [plan_density_tensor(*counts[li], seq_len, s_len, b) for li in order]
    read = dict(zip(order, torch.stack(sparse_density).tolist() if order else [], strict=True))
    density = [float(read[li]) if li in read else 1.0 for li in range(layers)]
    tests = {li: t for li in order if (t := records[li].rigid) is not None}
    fractions = torch.stack([t.float().mean() for t in tests.values()]).tolist() if tests else []
    read_rigid = dict(zip(tests, fractions, strict=True))
    rigid = [read_rigid.get(li) for li in range(layers)]
    profiled = [r for r in rigid if r is not None]
    out: dict[str, Any] = {
        "density": sum(density) / max(len(density), 1),
        "rigid_fraction": sum(profiled) / len(profiled) if profiled else 0.0,
        "rigid_fraction_per_layer": rigid,
    }
    if policy == "entropy" and cfg.mode == "spread" and records:
        ref = torch.stack(
            [rigid_heads(r.entropy, cfg.entropy_threshold).float().mean() for r in records.values()]
        )
        out["rigid_fraction_reference"] = float(ref.mean())
    tokens = [(c[:, ~d] * b).flatten().float() for c, d in counts.values()]
    budget = torch.cat(tokens).cpu() if tokens else None
    if budget is not None and budget.numel():
        out["budget_tokens"] = {
            "mean": float(budget.mean()),
            "min": int(budget.min()),
            "max": int(budget.max()),
            "base": cfg.base_budget if policy == "entropy" else cfg.fixed_budget,
        }
    return out
