"""Executing decode-time KV compression (latent / SnapKV, `policies/kv_compression.py`) on a batch's cache.

- `ObservationWindow`: the queries compression scores with, ``[layers, batch, Hq, W, d]``, a ring indexed by
  decode step, so no K/V is copied to observe: prefill stores the last ``W - N_D`` prompt queries of every
  layer (slots ``N_D .. W-1``), decode step ``i`` (from 1) writes its queries to slot ``(i - 1) mod W``. After
  ``s`` steps, window query ``i`` (position ``len - W + i``) is in slot ``(s + i) mod W``. The slot index is a
  device tensor, so the append is captured in the decode CUDA graph.
- `compress`: per layer, score the window against every (sequence, KV head)'s keys, pick the kept positions,
  gather them into a `CompactKVCache` (or, re-compressing, back into the same compact buffer, so a captured
  graph stays valid). The caller then releases the full cache.
- `DecodeCompressor`: when to compress (after ``N_D`` decode steps, or right after prefill for SnapKV; then
  every ``R`` steps if asked), the per-head capacities, and the statistics.

The engine core compresses each sequence on its own schedule (`compression_due`, `compress_sequence`): its
observation window is a row of the shared `ObservationPool`, its KV lives in pages (`shard/kv_pages.py`),
and what it keeps is written into fresh pages of its own while the rest goes back to the pool. Its scores
are computed for several layers a launch, the keys read through its page table (`sequence_scores`), and
the kept entries read from the pool in one indexed read (`gather_positions`): no contiguous copy of a
128k-token cache per layer.
The batch classes above remain for the model-level benchmarks (`DecodeRunner`).
"""

from __future__ import annotations

import torch

from entropyinfer.kernels.paged_window_scores import paged_window_scores
from entropyinfer.policies.kv_compression import (
    KVCompressionConfig,
    adaptive_capacities,
    head_capacities,
    plan_keep,
    prefix_scores,
    score_keys,
    select_positions,
)
from entropyinfer.policies.segment_split import kept_histogram
from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.devices import synced_now
from entropyinfer.shard.kv_cache import CompactKVCache, KVCache
from entropyinfer.shard.kv_pages import KVPages
from entropyinfer.shard.sequence import Sequence

AnyCache = KVCache | CompactKVCache


class ObservationWindow:
    def __init__(
        self,
        arch: ModelArch,
        batch: int,
        window: int,
        prompt_queries: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.window, self.prompt_queries = window, prompt_queries
        self.group = arch.group_size
        self.q = torch.zeros(
            arch.num_layers, batch, arch.num_heads, window, arch.head_dim, device=device, dtype=dtype
        )
        self.counter = torch.zeros(1, dtype=torch.long, device=device)  # decode steps recorded
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # where this step's queries go

    def record_prompt(self, layer: int, slot: int, q_all: torch.Tensor, n: int) -> None:
        """Prefill: keep the last ``W - N_D`` prompt queries of one layer (q_all ``[Hq, >=n, d]``)."""
        p = min(self.prompt_queries, n)
        self.q[layer, slot, :, self.window - p :] = q_all[:, n - p : n]

    def begin_step(self) -> None:
        """Decode, once per step before the layers (device ops only: graph-capturable)."""
        torch.remainder(self.counter, self.window, out=self.slot)
        self.counter.add_(1)

    def append(self, layer: int, q: torch.Tensor) -> None:
        """Decode: this step's queries of one layer, q ``[B, Hq, 1, d]``."""
        self.q[layer].index_copy_(2, self.slot, q)

    def ordered(self, layer: int, steps: int) -> torch.Tensor:
        """``[B, Hq, W, d]`` after ``steps`` decode steps: index ``i`` holds the query of position
        ``len - W + i``."""
        order = (torch.arange(self.window, device=self.q.device) + steps) % self.window
        return self.q[layer].index_select(2, order)

    def state(self) -> list[torch.Tensor]:
        return [self.counter, self.slot]


def compact_slots(
    lengths: torch.Tensor, capacities: torch.Tensor, steps_left: int, recompress_every: int
) -> int:
    """Slots of a compact buffer: the most any head keeps plus room for the tokens still to generate.

    lengths: tokens per head now, ``[L, B, Hkv]`` (or broadcastable); capacities ``[L, B, Hkv]``. Without
    re-compression a head holds ``min(capacity, length)`` + ``steps_left``. With it (every R steps), a head
    holds at most ``min(capacity, length at the last compression) + R``, and that length is at most
    ``length + steps_left`` (short sequences keep growing below their capacity).
    """
    caps, lens = capacities.cpu().long(), lengths.cpu().long()
    if recompress_every <= 0:
        return int(torch.minimum(caps, lens).max().item()) + steps_left
    return int(torch.minimum(caps, lens + steps_left).max().item()) + min(recompress_every, steps_left)


def _span(cache: AnyCache) -> int:
    return cache.capacity if isinstance(cache, CompactKVCache) else int(cache.lengths.max().item())


@torch.inference_mode()
def score_cache(
    cache: AnyCache, obs: ObservationWindow, cfg: KVCompressionConfig, steps: int, arch: ModelArch
) -> torch.Tensor:
    """float32 ``[L, B, Hkv, span]``: every layer's prefix scores (`score_keys`), for adaptive capacities."""
    b, hkv, d, g = cache.batch, arch.num_kv_heads, arch.head_dim, arch.group_size
    span = _span(cache)
    out = []
    for li in range(arch.num_layers):
        lens = cache.layer_lengths(li).long().reshape(b * hkv)
        keys = cache.k(li)[:, :, :span].reshape(b * hkv, span, d)
        q_obs = obs.ordered(li, steps).reshape(b * hkv, g, obs.window, d)
        out.append(score_keys(q_obs, keys, lens, cfg).view(b, hkv, span))
    return torch.stack(out)


def adaptive_batch_capacities(
    scores: torch.Tensor, cache: AnyCache, cfg: KVCompressionConfig, arch: ModelArch
) -> torch.Tensor:
    """int64 ``[L, B, Hkv]``: `adaptive_capacities` of each sequence of the batch from `score_cache`."""
    lens = torch.stack([cache.layer_lengths(li) for li in range(arch.num_layers)]).view(
        arch.num_layers, cache.batch, arch.num_kv_heads
    )
    across = cfg.head_capacity == "adaptive_layers"
    rows = [
        adaptive_capacities(scores[:, i], lens[:, i], cfg, across_layers=across) for i in range(cache.batch)
    ]
    return torch.stack(rows, dim=1)


@torch.inference_mode()
def compress(
    cache: AnyCache,
    obs: ObservationWindow,
    cfg: KVCompressionConfig,
    capacities: torch.Tensor,
    steps: int,
    slots: int,
    arch: ModelArch,
    scores: torch.Tensor | None = None,
) -> CompactKVCache:
    """Keep, per (layer, sequence, KV head), the top ``capacity - W`` positions and the last ``W``.

    cache: the full `KVCache` (first compression; left untouched, the caller releases it) or a
    `CompactKVCache` (re-compression, done in place). capacities: int64 ``[L, B, Hkv]``. steps: decode steps
    run so far (orders the observation ring). slots: size of the new compact buffer (`compact_slots`; must
    hold every head's ``min(capacity, length)``), ignored in place. scores: `score_cache` when already
    computed (adaptive capacities). Returns the compact cache.
    """
    nl, b, hkv, d, g = arch.num_layers, cache.batch, arch.num_kv_heads, arch.head_dim, arch.group_size
    device = cache.data.device
    span = _span(cache)
    if isinstance(cache, CompactKVCache):
        out = cache
        slots = cache.capacity
    else:
        out = CompactKVCache(arch, b, slots, device, cache.data.dtype)
    caps = capacities.to(device)
    for li in range(nl):
        lens = cache.layer_lengths(li).long().reshape(b * hkv)
        keys = cache.k(li)[:, :, :span].reshape(b * hkv, span, d)
        values = cache.v(li)[:, :, :span].reshape(b * hkv, span, d)
        q_obs = obs.ordered(li, steps).reshape(b * hkv, g, obs.window, d)
        sc = None if scores is None else scores[li].reshape(b * hkv, span)
        plan = plan_keep(q_obs, keys, lens, caps[li].reshape(b * hkv), cfg, slots, scores=sc)
        idx = plan.indices[..., None].expand(-1, -1, d)
        new_k, new_v = keys.gather(1, idx), values.gather(1, idx)
        if isinstance(cache, CompactKVCache):
            src = cache.positions[li].reshape(b * hkv, span).gather(1, plan.indices)
        else:
            src = plan.indices.to(torch.int32)
        out.k(li).copy_(new_k.view(b, hkv, slots, d))
        out.v(li).copy_(new_v.view(b, hkv, slots, d))
        out.positions[li].copy_(src.view(b, hkv, slots))
        out.lengths[li].copy_(plan.counts.view(b, hkv))
    return out


class DecodeCompressor:
    """Compression schedule and state of one decoding batch; max_steps: the most decode steps it runs."""

    def __init__(
        self,
        arch: ModelArch,
        cfg: KVCompressionConfig,
        batch: int,
        max_steps: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.arch, self.cfg, self.max_steps = arch, cfg, max_steps
        self.obs = ObservationWindow(arch, batch, cfg.window, cfg.prompt_queries, device, dtype)
        self.capacities = torch.full(
            (arch.num_layers, batch, arch.num_kv_heads), cfg.capacity, dtype=torch.long
        )  # [L, B, Hkv]
        self.compressions = 0
        self.last_step = 0
        self.compression_ms = 0.0
        self.bytes_before: list[int] = []
        self.cuda_memory: tuple[int, int] | None = None  # torch.cuda.memory_allocated around the first

    def set_head_entropy(self, slot: int, entropy: torch.Tensor | None) -> None:
        """Per-head capacities of one sequence from its prefill entropy (float ``[L, Hkv]``, NaN rows for
        dense layers); only with ``head_capacity: entropy``."""
        shape = (self.arch.num_layers, self.arch.num_kv_heads)
        self.capacities[:, slot] = head_capacities(entropy, self.cfg, shape)

    @property
    def records_queries(self) -> bool:
        """Whether decode steps must append their queries to the observation window."""
        return self.compressions == 0 or self.cfg.recompress_every > 0

    def due(self, steps: int) -> bool:
        """Compress before decode step ``steps + 1``?"""
        if self.compressions == 0:
            return steps == self.cfg.compress_after
        r = self.cfg.recompress_every
        return r > 0 and steps - self.last_step >= r

    def run(self, cache: AnyCache, steps: int) -> CompactKVCache:
        """Compress (the first time: into a new compact buffer, and release ``cache``; later: in place)."""
        device = cache.data.device
        t0 = synced_now(device)
        first = self.compressions == 0
        if first:
            self.bytes_before = [cache.bytes_used(i) for i in range(cache.batch)]
            mem_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        remaining = max(self.max_steps - steps, 0)
        lengths = cache.lengths if isinstance(cache, CompactKVCache) else cache.lengths[None]
        scores = None
        if first and self.cfg.adaptive:  # capacities from this window's scores (kept for re-compression)
            scores = score_cache(cache, self.obs, self.cfg, steps, self.arch)
            self.capacities = adaptive_batch_capacities(scores, cache, self.cfg, self.arch)
        slots = compact_slots(lengths, self.capacities, remaining, self.cfg.recompress_every)
        out = compress(cache, self.obs, self.cfg, self.capacities, steps, slots, self.arch, scores)
        if out is not cache and isinstance(cache, KVCache):
            cache.release()
        if first and device.type == "cuda":
            self.cuda_memory = (mem_before, torch.cuda.memory_allocated(device))
        self.compressions += 1
        self.last_step = steps
        self.compression_ms += (synced_now(device) - t0) * 1e3
        return out

    def stats(self, slot: int) -> dict:
        out: dict = {
            "kv_compression": self.cfg.method,
            "kv_capacity": self.cfg.capacity,
            "kv_compressions": self.compressions,
            "compression_ms": self.compression_ms,
        }
        if self.bytes_before:
            out["kv_bytes_before"] = self.bytes_before[slot]
        if self.cuda_memory is not None:  # the whole device, not this sequence alone
            out["cuda_memory_before_compression"], out["cuda_memory_after_compression"] = self.cuda_memory
        if self.cfg.head_capacity != "uniform":
            out["kv_head_capacities"] = self.capacities[:, slot].tolist()
        return out


# ------------------------------------------------------------------------------- per sequence, paged KV
class ObservationPool:
    """Observation windows of the engine core's sequences: ``q [layers, rows, Hq, width, d]``.

    A sequence that compresses holds a row while it still needs queries (`acquire` / `release`); row 0 is a
    sink that decode steps of other sequences write into, so one batched write serves every batch. A
    sequence with window ``W`` uses slots ``0 .. W-1`` of its row as `ObservationWindow` does: prefill puts
    the last ``W - N_D`` prompt queries in slots ``N_D .. W-1``, decode step ``i`` (from 1) writes slot
    ``(i - 1) mod W``. Rows and width grow on demand (the tensor is reallocated, contents kept: a CUDA graph
    that writes ``q`` must be captured again then, see `shard/paged_decode.py`). `scratch_row` (row 0) is
    never handed out: padded rows of a graphed decode batch, and sequences without a window, write there."""

    scratch_row = 0

    def __init__(self, arch: ModelArch, device: torch.device, dtype: torch.dtype) -> None:
        self.arch, self.device, self.dtype = arch, device, dtype
        self.q = torch.zeros(arch.num_layers, 1, arch.num_heads, 1, arch.head_dim, device=device, dtype=dtype)
        self._free: list[int] = []
        self._rows = 1

    def acquire(self, window: int) -> int:
        if window > self.q.shape[3] or not self._free:
            rows = self._rows + (0 if self._free else max(1, self._rows))
            bigger = self.q.new_zeros(
                self.q.shape[0], rows, self.q.shape[2], max(window, self.q.shape[3]), self.q.shape[4]
            )
            bigger[:, : self.q.shape[1], :, : self.q.shape[3]] = self.q
            self._free += list(range(rows - 1, self._rows - 1, -1))
            self.q, self._rows = bigger, rows
        return self._free.pop()

    def release(self, row: int) -> None:
        self._free.append(row)

    def append(self, layer: int, rows: torch.Tensor, slots: torch.Tensor, q: torch.Tensor) -> None:
        """Decode: q ``[B, Hq, 1, d]`` of one layer into ``(rows[b], slots[b])`` (int64 device tensors)."""
        self.q[layer][rows, :, slots] = q[:, :, 0]

    def ordered(self, row: int, layer: int, steps: int, window: int) -> torch.Tensor:
        """``[Hq, W, d]`` after `steps` decode steps, index ``i`` the query of position ``len - W + i``."""
        order = (torch.arange(window, device=self.device) + steps) % window
        return self.q[layer, row].index_select(1, order)


class PromptObserver:
    """`Engine.prefill`'s `observe` for one sequence of the core: its prompt queries into its pool row."""

    def __init__(self, pool: ObservationPool, row: int, cfg: KVCompressionConfig) -> None:
        self.pool, self.row, self.cfg = pool, row, cfg

    def record_chunk(self, layer: int, q: torch.Tensor, start: int, seq_len: int) -> None:
        """A prefill chunk's queries q ``[Hq, C, d]`` (positions ``start ..``) that are among the prompt's
        last ``prompt_queries``: into their slots of the row (the chunks of a prompt fill it together)."""
        w, p = self.cfg.window, min(self.cfg.prompt_queries, seq_len)
        lo, hi = max(start, seq_len - p), min(start + q.shape[1], seq_len)
        if lo < hi:
            first = w - p + lo - (seq_len - p)
            self.pool.q[layer, self.row, :, first : first + hi - lo] = q[:, lo - start : hi - start]


def compression_due(seq: Sequence, cfg: KVCompressionConfig) -> bool:
    """Compress `seq` before its next decode step? (after ``N_D`` steps; SnapKV at 0; then every R)."""
    if seq.compressions == 0:
        return seq.decode_steps == cfg.compress_after
    r = cfg.recompress_every
    return r > 0 and seq.decode_steps - seq.last_compression >= r


_SCORE_BYTES = 1 << 28  # float32 window probabilities scored at once (layers chunked to stay under it)


def sequence_scores(
    pages: KVPages,
    pool: ObservationPool,
    seq: Sequence,
    cfg: KVCompressionConfig,
    arch: ModelArch,
    index: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """float32 ``[L, Hkv, S]``: every layer's pooled, group-reduced prefix scores of `seq` (`score_keys`),
    its keys read through its page table `index` ``[Hkv, P]`` (``S = P * page_size``), several layers a
    launch (`paged_window_scores`); `lengths` ``[L, Hkv]`` on the device."""
    assert seq.obs_row is not None
    hkv, g, d, w = index.shape[0], arch.group_size, arch.head_dim, cfg.window
    width = index.shape[1] * pages.page_size
    order = (torch.arange(w, device=pages.device) + seq.decode_steps) % w  # the window ring, oldest first
    step = max(1, _SCORE_BYTES // (hkv * g * width * 4))
    out = []
    for l0 in range(0, arch.num_layers, step):
        l1 = min(arch.num_layers, l0 + step)
        q = pool.q[l0:l1, seq.obs_row].index_select(2, order).view(l1 - l0, hkv, g, w, d)
        probs = paged_window_scores(q, pages.data[l0:l1, 0], index, lengths[l0:l1])
        flat = prefix_scores(
            probs.flatten(0, 1), lengths[l0:l1].flatten(), w, pooling=cfg.pooling,
            kernel_size=cfg.kernel_size, group_reduce=cfg.group_reduce,
        )  # fmt: skip
        out.append(flat.view(l1 - l0, hkv, width))
    return torch.cat(out)


def gather_positions(
    pages: KVPages, index: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[L, Hkv, n, d]`` at ``positions [L, Hkv, n]`` of a sequence whose heads' pages are
    `index` ``[Hkv, P]``: one indexed read of the pool per K and V."""
    nl, hkv, _ = positions.shape
    ps = pages.page_size
    page = index[None].expand(nl, -1, -1).gather(2, positions // ps)
    layer = torch.arange(nl, device=pages.device)[:, None, None]
    head = torch.arange(hkv, device=pages.device)[None, :, None]
    off = positions % ps
    return pages.data[:, 0][layer, page, head, off], pages.data[:, 1][layer, page, head, off]


@torch.inference_mode()
def compress_sequence(
    pages: KVPages, pool: ObservationPool, seq: Sequence, cfg: KVCompressionConfig, arch: ModelArch
) -> None:
    """Keep, per (layer, KV head) of `seq`, the top ``capacity - W`` positions and the last ``W`` (the
    same plan as `compress`), write them into fresh pages of the sequence and return the rest to the pool."""
    lengths, caps = seq.kv_lengths, seq.capacities
    assert lengths is not None and caps is not None and seq.obs_row is not None
    t0 = synced_now(pages.device)
    if seq.compressions == 0:
        seq.kv_bytes_before = int(lengths.long().sum()) * 2 * arch.head_dim * pages.data.element_size()
    used = pages.used_pages
    index = pages.page_index(seq.block_table[pages.local])  # [Hkv, P], shared by the layers
    lengths_on = lengths.to(pages.device).long()  # one copy, not per layer
    scores = sequence_scores(pages, pool, seq, cfg, arch, index, lengths_on)  # [L, Hkv, S]
    if cfg.adaptive and seq.compressions == 0:  # capacities from this window's scores (kept afterwards)
        caps = adaptive_capacities(scores, lengths, cfg, across_layers=cfg.head_capacity == "adaptive_layers")
        seq.capacities = caps
    slots = int(torch.minimum(caps, lengths.long()).max())
    nl, hkv = arch.num_layers, index.shape[0]
    plan = select_positions(
        scores.flatten(0, 1), lengths_on.flatten(), caps.to(pages.device).flatten(), cfg.window, slots
    )
    kept_k, kept_v = gather_positions(pages, index, plan.indices.view(nl, hkv, slots))  # [L, Hkv, slots, d]
    new_lengths = plan.counts.view(nl, hkv).cpu().to(torch.int32)  # [L, Hkv]: the one sync
    if seq.compressions == 0:  # where the prompt's kept positions lie (the policy actor learns shares)
        fractions, weights = kept_histogram(plan.indices, plan.counts, lengths_on.flatten(), cfg.window)
        seq.kept_bins = (fractions.view(nl, hkv, -1).cpu(), weights.view(nl, hkv).cpu())
    kept = list(zip(kept_k, kept_v, strict=True))
    pages.free(seq)
    pages.allocate_heads(seq, [pages.pages(int(n)) for n in new_lengths.max(dim=0).values])
    windex = pages.write_index(seq.block_table[pages.local])  # once, not per layer
    for li, (k, v) in enumerate(kept):
        pages.write_heads(seq, li, k, v, windex)
    seq.kv_lengths = new_lengths
    seq.compressions += 1
    seq.last_compression = seq.decode_steps
    seq.stats["kv_pages_freed"] = seq.stats.get("kv_pages_freed", 0) + used - pages.used_pages
    seq.compression_ms += (synced_now(pages.device) - t0) * 1e3
