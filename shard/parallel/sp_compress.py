"""Where a sequence-parallel sequence's K/V lives (`Spans`), and its latent / SnapKV compression over the
SP ranks: the positions one rank would keep, each SP rank keeping those of its own span.

Index space: each (layer, KV head) of a sequence has the indices ``0 .. length`` of one rank's cache (the
prompt positions and decode tokens; after compression the kept slots, in order). SP rank j holds the
contiguous span ``[starts[j], starts[j] + counts[j])`` of it at local indices ``0 .. counts[j]`` of its
pages; the last rank's span also takes every later decode token, so its count is ``length - starts[last]``.
After an SP prefill the spans are the segments (``starts[j] = j S``).

Compression (`compress_spans`), per layer: each rank scores its span's keys with the observation window
(every rank holds the same window: decode queries are replicated, and the SP prefill all-reduces the last
prompt queries): window logits of its keys with the causal corner in global indices, a log-sum-exp per
window query, all-gathered so each rank normalises by the softmax over *every* key; the window-averaged
probabilities of all spans are all-gathered into the whole ``[Hkv, G, length]`` row, so pooling crosses the
span edges, and every rank runs one rank's `prefix_scores` + `select_positions` on it: the same global top
``C - W`` and last ``W`` on every rank. Each rank keeps the selected indices inside its span (its share of
the global top), in order; the new spans follow from the counts. The all-gathered row is ``G x length``
floats per head and layer. The learned split (`_learned`: a first compression with a pinned segment-shares
table, ``sp_split: learned``) exchanges only the pooled edges: each rank keeps its own top ``b_j``, its
`split_budget` share of the prefix budget (`policies/segment_shares.py`); re-compressions always run
exact. Adaptive capacities are not supported here (such requests run without SP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from entropyinfer.kernels.window_scores import window_lse, window_probs
from entropyinfer.policies.kv_compression import (
    KeepPlan,
    KVCompressionConfig,
    prefix_scores,
    select_positions,
)
from entropyinfer.policies.segment_split import kept_histogram, span_shares, split_budget
from entropyinfer.shard.compression import ObservationPool
from entropyinfer.shard.kv_pages import KVPages
from entropyinfer.shard.parallel.all_to_all import SequenceParallelGroup


@dataclass
class Spans:
    starts: torch.Tensor  # int64 [sp, L, Hkv]
    counts: torch.Tensor  # int64 [sp, L, Hkv]; the last rank's as of the last change (it grows in decode)

    @classmethod
    def segments(cls, seq_len: int, sp: int, layers: int, hkv: int) -> Spans:
        s = -(-seq_len // sp)
        starts = (torch.arange(sp, dtype=torch.long) * s)[:, None, None].expand(sp, layers, hkv)
        counts = torch.full((sp, layers, hkv), s, dtype=torch.long)
        counts[-1] = seq_len - (sp - 1) * s
        return cls(starts.contiguous(), counts)

    def current(self, lengths: torch.Tensor) -> torch.Tensor:
        """Every rank's count ``[sp, L, Hkv]`` for the sequence's global `lengths` ``[L, Hkv]`` now."""
        counts = self.counts.clone()
        counts[-1] = lengths.long() - self.starts[-1]
        return counts


def _window_probs(
    sp: SequenceParallelGroup,
    q_obs: torch.Tensor,
    keys: torch.Tensor,
    start: torch.Tensor,
    count: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """`window_scores` of this rank's span: ``q_obs [H, G, W, d]``, ``keys [H, S, d]`` (the first ``count``
    valid, at global indices ``start + i``), global ``lengths [H]`` -> float32 ``[H, G, S]``, softmax over
    every rank's keys."""
    lse = sp.all_gather(window_lse(q_obs, keys, lengths, starts=start, counts=count)).logsumexp(dim=0)
    return window_probs(q_obs, keys, lengths, lse, starts=start, counts=count)


def segment_shares(spans: Spans, lengths: torch.Tensor, window: int, bins: torch.Tensor) -> torch.Tensor:
    """float64 ``[sp, L, Hkv]``: each span's share of its (layer, head)'s prefix from the pinned table's
    `bins` ``[L, Hkv, B]`` (`policies/segment_shares.span_shares`); `lengths` ``[L, Hkv]`` global."""
    counts = spans.current(lengths)
    prefix = lengths.long() - lengths.long().clamp(max=window)
    return span_shares(bins.double(), spans.starts, spans.starts + counts, prefix)


Kept = tuple[
    torch.Tensor, torch.Tensor
]  # `kept_histogram` per layer: fractions [L, Hkv, B], weights [L, Hkv]


@dataclass
class _Layer:
    """One layer's keys of this rank's span and what every rank holds of it (``[sp, Hkv]`` on the device)."""

    keys: torch.Tensor  # [Hkv, widest, d], the first count[rank] valid
    start: torch.Tensor
    count: torch.Tensor
    length: torch.Tensor  # [Hkv] global
    probs: torch.Tensor  # [Hkv, G, widest]: window probabilities of this rank's keys, softmax over all


def _exact(
    sp: SequenceParallelGroup, x: _Layer, cap: torch.Tensor, slots: int, kv: KVCompressionConfig
) -> tuple[torch.Tensor, torch.Tensor, KeepPlan]:
    """One rank's plan on the all-gathered row -> (this rank's local indices ``[H, slots]``, mine first;
    every rank's kept counts ``[sp, H]``; the global plan)."""
    start, count, length = x.start, x.count, x.length
    hkv, g, _ = x.probs.shape
    every = sp.all_gather(x.probs)  # [sp, H, G, widest]
    whole = torch.zeros(hkv, g, int(length.max()), dtype=torch.float32, device=x.probs.device)
    for j in range(sp.size):
        for h in range(hkv):
            a, n = int(start[j, h]), int(count[j, h])
            whole[h, :, a : a + n] = every[j, h, :, :n]
    scores = prefix_scores(
        whole, length, kv.window, pooling=kv.pooling, kernel_size=kv.kernel_size, group_reduce=kv.group_reduce
    )
    plan = select_positions(scores, length, cap, kv.window, slots)
    chosen = torch.arange(slots, device=whole.device)[None, :] < plan.counts[:, None]
    lo, hi = start[:, :, None], (start + count)[:, :, None]  # [sp, H, 1]
    inside = chosen[None] & (plan.indices[None] >= lo) & (plan.indices[None] < hi)  # [sp, H, slots]
    mine = inside[sp.rank]
    order = torch.sort((~mine).to(torch.int8), dim=1, stable=True).indices  # mine first, in order
    local = (plan.indices - lo[sp.rank]).gather(1, order).masked_fill(~mine.gather(1, order), 0)
    return local, inside.sum(dim=2), plan


def _learned(
    sp: SequenceParallelGroup, x: _Layer, cap: torch.Tensor, shares: torch.Tensor, slots: int,
    kv: KVCompressionConfig,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each rank its own top ``b_j`` (`split_budget` of the prefix budget by `shares` ``[sp, H]``) by the
    scores of its span, pooled across the span edges with the neighbours' edge columns (all-gathered: the
    only exchange besides the log-sum-exp) -> (local indices ``[H, slots]``; every rank's counts
    ``[sp, H]``)."""
    start, count, length, probs = x.start, x.count, x.length, x.probs
    hkv, g, widest = probs.shape
    dev, w, me = probs.device, kv.window, sp.rank
    k = kv.kernel_size // 2 if kv.pooling != "none" else 0
    cols = torch.arange(widest, device=dev)
    probs = probs.masked_fill((cols[None, :] >= count[me][:, None])[:, None, :], 0.0)
    ext = torch.zeros(hkv, g, widest + 2 * k + 1, dtype=torch.float32, device=dev)  # the last: a dump column
    ext[:, :, k : k + widest] = probs
    if k > 0 and sp.size > 1:
        off = torch.arange(k, device=dev)
        loc = torch.cat([off.expand(sp.size, hkv, k), count[:, :, None] - k + off], dim=2)  # [sp, H, 2k]
        ok = (loc >= 0) & (loc < count[:, :, None])
        mine_loc = loc[me].clamp(0, widest - 1)
        edges = sp.all_gather(probs.gather(2, mine_loc[:, None, :].expand(hkv, g, 2 * k)))  # [sp, H, G, 2k]
        q = start[:, :, None] + loc - (start[me][None, :, None] - k)  # their columns in ext
        c = count[me][None, :, None]
        outside = (q < k) | (q >= k + c)  # not this rank's own keys
        fill = ok & outside & (q >= 0) & (q < widest + 2 * k)
        fill[me] = False
        q = torch.where(fill, q, torch.full_like(q, widest + 2 * k))
        src = edges.permute(1, 2, 0, 3).reshape(hkv, g, sp.size * 2 * k)
        ext.scatter_(2, q.permute(1, 0, 2).reshape(hkv, 1, -1).expand(hkv, g, -1), src)
    ext = ext[:, :, :-1]
    pos = start[me][:, None] - k + torch.arange(widest + 2 * k, device=dev)[None, :]  # global positions
    prefix = length - length.clamp(max=w)
    in_prefix = (pos >= 0) & (pos < prefix[:, None])
    ext = ext * in_prefix[:, None, :]
    if k > 0:
        flat = ext.reshape(hkv * g, 1, -1)
        if kv.pooling == "avg":
            flat = F.avg_pool1d(flat, kv.kernel_size, stride=1, padding=0)
        else:
            flat = F.max_pool1d(flat, kv.kernel_size, stride=1, padding=0)
        ext = flat.view(hkv, g, widest)
    scores = ext.amax(dim=1) if kv.group_reduce == "max" else ext.mean(dim=1)  # [H, widest]
    room = (torch.minimum(start + count, prefix[None, :]) - start).clamp(min=0)  # prefix positions held
    room = torch.minimum(room, count)
    valid = cols[None, :] < room[me][:, None]
    scores = scores.masked_fill(~valid, float("-inf"))
    total = torch.minimum((cap - w).clamp(min=0), prefix)
    budget = split_budget(total.cpu(), shares.cpu(), room.cpu()).to(dev)  # [sp, H]
    # rank 0's, on every rank: float rounding may differ between hosts' CPUs, the spans must not (sp x H ints)
    budget = sp.all_gather(budget)[0]
    counts = budget + (count - room)  # plus the recent positions each span holds
    b = budget[me]
    kmax = min(slots, widest)
    top = scores.topk(kmax, dim=1).indices
    top = torch.where(torch.arange(kmax, device=dev)[None, :] < b[:, None], top, widest).sort(dim=1).values
    top = F.pad(top, (0, slots - kmax), value=widest)
    slot = torch.arange(slots, device=dev)[None, :]
    local = torch.where(slot < b[:, None], top, room[me][:, None] + slot - b[:, None])
    local = torch.where(slot < counts[me][:, None], local, torch.zeros_like(local))
    return local, counts


@torch.inference_mode()
def compress_spans(
    sp: SequenceParallelGroup,
    pages: KVPages,
    obs: ObservationPool,
    spans: Spans,
    table: list[list[int]],
    lengths: torch.Tensor,
    capacities: torch.Tensor,
    slots: int,
    obs_row: int,
    decode_steps: int,
    kv: KVCompressionConfig,
    group_size: int,
    shares: torch.Tensor | None = None,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, Spans, Kept | None]:
    """Plan and gather what this SP rank keeps of one sequence (see the module docstring): `table` its
    pages per local KV head, `lengths` / `capacities` ``[L, Hkv]`` global; `shares` ``[sp, L, Hkv]``: the
    learned split by these span shares (`segment_shares`), else the exact one. -> (per layer (keys,
    values) ``[Hkv, slots, d]`` kept here, in order; the global kept counts int64 ``[L, Hkv]``; the new
    spans; the exact plan's `kept_histogram` per layer ``([L, Hkv, B], [L, Hkv])``, None when learned)."""
    layers, hkv = lengths.shape
    dev, d, w = pages.device, pages.head_dim, kv.window
    counts_now = spans.current(lengths)  # [sp, L, Hkv]
    widest = int(counts_now.max())
    new_counts = torch.zeros_like(counts_now)
    kept, hists = [], []
    index = pages.page_index(table)  # once, not per layer
    for li in range(layers):
        keys, values = pages.gather_table(index, li)
        if keys.shape[1] < widest:
            pad = widest - keys.shape[1]
            keys = torch.nn.functional.pad(keys, (0, 0, 0, pad))
            values = torch.nn.functional.pad(values, (0, 0, 0, pad))
        keys, values = keys[:, :widest], values[:, :widest]
        q_obs = obs.ordered(obs_row, li, decode_steps, w).view(hkv, group_size, w, d)
        start, count = spans.starts[:, li].to(dev), counts_now[:, li].to(dev)  # [sp, Hkv]
        length = lengths[li].to(dev).long()
        probs = _window_probs(sp, q_obs, keys, start[sp.rank], count[sp.rank], length)  # [H, G, widest]
        layer = _Layer(keys, start, count, length, probs)
        cap = capacities[li].to(dev)
        if shares is None:
            local, counts, plan = _exact(sp, layer, cap, slots, kv)
            hists.append(kept_histogram(plan.indices, plan.counts, length, w))
        else:
            local, counts = _learned(sp, layer, cap, shares[:, li].to(dev), slots, kv)
        new_counts[:, li] = counts.cpu()
        idx = local[..., None].expand(-1, -1, d)
        kept.append((keys.gather(1, idx), values.gather(1, idx)))
    starts = torch.cumsum(new_counts, dim=0) - new_counts
    hist = None
    if hists:
        hist = (torch.stack([h for h, _ in hists]).cpu(), torch.stack([wt for _, wt in hists]).cpu())
    return kept, new_counts.sum(dim=0), Spans(starts, new_counts), hist
