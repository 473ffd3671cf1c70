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
floats per head and layer (fine for tests and moderate prompts; a 1M-token prompt would want only the pooled
edges exchanged). Adaptive capacities are not supported here (such requests run without SP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from entropyinfer.kernels.window_scores import window_lse, window_probs
from entropyinfer.policies.kv_compression import KVCompressionConfig, prefix_scores, select_positions
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
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, Spans]:
    """Plan and gather what this SP rank keeps of one sequence (see the module docstring): `table` its
    pages per local KV head, `lengths` / `capacities` ``[L, Hkv]`` global. -> (per layer (keys, values)
    ``[Hkv, slots, d]`` kept here, in order; the global kept counts int64 ``[L, Hkv]``; the new spans)."""
    layers, hkv = lengths.shape
    dev, d, w = pages.device, pages.head_dim, kv.window
    counts_now = spans.current(lengths)  # [sp, L, Hkv]
    widest = int(counts_now.max())
    new_counts = torch.zeros_like(counts_now)
    kept, totals = [], []
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
        every = sp.all_gather(probs)  # [sp, H, G, widest]
        total = int(length.max())
        whole = torch.zeros(hkv, group_size, total, dtype=torch.float32, device=dev)
        for j in range(sp.size):
            for h in range(hkv):
                a, n = int(start[j, h]), int(count[j, h])
                whole[h, :, a : a + n] = every[j, h, :, :n]
        scores = prefix_scores(
            whole, length, w, pooling=kv.pooling, kernel_size=kv.kernel_size, group_reduce=kv.group_reduce
        )
        plan = select_positions(scores, length, capacities[li].to(dev), w, slots)
        cols = torch.arange(slots, device=dev)[None, :]
        chosen = cols < plan.counts[:, None]
        for j in range(sp.size):  # every rank's share of the plan (the new spans)
            lo, hi = start[j][:, None], (start[j] + count[j])[:, None]
            new_counts[j, li] = (chosen & (plan.indices >= lo) & (plan.indices < hi)).sum(dim=1).cpu()
        lo, hi = start[sp.rank][:, None], (start[sp.rank] + count[sp.rank])[:, None]
        mine = chosen & (plan.indices >= lo) & (plan.indices < hi)
        order = torch.sort((~mine).to(torch.int8), dim=1, stable=True).indices  # mine first, in order
        local = (plan.indices - lo).gather(1, order).masked_fill(~mine.gather(1, order), 0)
        idx = local[..., None].expand(-1, -1, d)
        kept.append((keys.gather(1, idx), values.gather(1, idx)))
        totals.append(plan.counts.cpu())
    starts = torch.cumsum(new_counts, dim=0) - new_counts
    return kept, torch.stack(totals), Spans(starts, new_counts)
