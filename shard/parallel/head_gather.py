"""A parallel group's per-request head statistics (`policies.head_stats.HeadStats`) in the whole model's KV
head order, on rank 0: what the policy actor gets once per request under tensor and sequence parallelism.

    stats = gather_head_stats(local, layers, nseg, sp_part, tp_part)   # every rank calls it; rank 0 uses it

Each rank reads its own attention object (`shard/head_report.head_stats` over its local KV heads) and packs
it as one float32 tensor ``[L, Hkv_local, 3 nseg + 2]`` (entropy, blocks kept, captured mass per segment,
then rigid and profiled). A sequence-parallel prefill split a TP rank's heads over its SP ranks
(`all_to_all.HeadSplit`): those are all-gathered first (padded to the widest), then the TP ranks', of which
one replica of each KV head is kept (TP > Hkv replicates KV heads; the replicas decided alike,
`group.mean_over_replicas`). Two all-gathers of a few KB per request, after its last prefill chunk.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch

from entropyinfer.policies.head_stats import HeadStats

Gather = Callable[[torch.Tensor], torch.Tensor]  # [L, H, F] -> every rank's, [ranks, L, H, F]


@dataclasses.dataclass(frozen=True)
class Part:
    """How one level of the group holds heads: `gather` all-gathers over its ranks (stacked in rank order),
    ``heads[i]`` the KV heads rank i holds, ``keep[i]`` whether rank i's heads are reported (False: a
    replica of an earlier rank's)."""

    gather: Gather
    heads: tuple[int, ...]
    keep: tuple[bool, ...]


def pack(stats: HeadStats | None, layers: int, kv_heads: int, nseg: int) -> torch.Tensor:
    """float32 ``[L, kv_heads, 3 nseg + 2]`` of `stats` (NaN everywhere for None)."""
    out = torch.full((layers, kv_heads, 3 * nseg + 2), math.nan)
    if stats is None:
        return out
    out[..., :nseg] = torch.from_numpy(stats.entropy)
    out[..., nseg : 2 * nseg] = torch.from_numpy(stats.counts.astype(np.float32))
    out[..., 2 * nseg : 3 * nseg] = torch.from_numpy(stats.captured)
    out[..., 3 * nseg] = torch.from_numpy(stats.rigid.astype(np.float32))
    out[..., 3 * nseg + 1] = torch.from_numpy(stats.profiled.astype(np.float32))[:, None]
    return out


def unpack(local: HeadStats, packed: torch.Tensor, nseg: int) -> HeadStats:
    """`local`'s fields with the arrays of ``packed [L, Hkv, 3 nseg + 2]`` (every KV head of the model)."""
    x = packed.numpy()
    return dataclasses.replace(
        local,
        entropy=np.ascontiguousarray(x[..., :nseg], dtype=np.float32),
        counts=np.ascontiguousarray(x[..., nseg : 2 * nseg]).astype(np.int32),
        captured=np.ascontiguousarray(x[..., 2 * nseg : 3 * nseg], dtype=np.float32),
        rigid=x[..., 3 * nseg] > 0.5,
        profiled=x[:, 0, 3 * nseg + 1] > 0.5,
    )


def _over(part: Part, x: torch.Tensor) -> torch.Tensor:
    """``x [L, part.heads[me], F]`` -> ``[L, sum of the kept ranks' heads, F]`` (rank order)."""
    widest = max(part.heads)
    if x.shape[1] < widest:
        x = torch.nn.functional.pad(x, (0, 0, 0, widest - x.shape[1]), value=math.nan)
    every = part.gather(x)  # [ranks, L, widest, F]
    cols = [every[i, :, :h] for i, (h, k) in enumerate(zip(part.heads, part.keep, strict=True)) if k]
    return torch.cat(cols, dim=1)


def gather_head_stats(
    local: HeadStats | None, layers: int, kv_heads: int, nseg: int, parts: list[Part]
) -> HeadStats | None:
    """The whole model's `HeadStats` from every rank's `local` one (`kv_heads` local KV heads; None where
    the prompt was not profiled, alike on every rank), gathering over `parts` innermost first (the SP ranks
    of a sequence-parallel prefill, then the TP ranks). Every rank gets the result; rank 0 reports it."""
    x = pack(local, layers, kv_heads, nseg)
    for part in parts:
        x = _over(part, x)
    return None if local is None else unpack(local, x, nseg)
