"""The per-shard hot path: layer-by-layer prefill into a preallocated KV cache, and the decode step.

Prefill runs one layer at a time over the whole prompt: the token-wise work (norms, q/k/v projections,
rope, o projection, MLP) in chunks of `prefill_chunk_size` tokens, attention over the whole prompt in
one call to the layer's `PrefillAttention` (dense fused SDPA, or a sparse policy's kernel). Only the last
position's logits are computed. Decode is one static-shape step, CUDA-graph captured on GPU, over the full
`KVCache` (token p written at position p) or, after decode-time compression (`shard/compression.py`), over a
`CompactKVCache` (each token appended at its head's own length; rope still uses the true position). While an
`ObservationWindow` is given, prefill stores the last prompt queries in it and decode appends its queries.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

import torch

from entropyinfer.errors import RequestCancelled
from entropyinfer.kernels.paged_kv_write import paged_kv_write
from entropyinfer.shard.attention import PrefillAttention, cached_decode_attention
from entropyinfer.shard.compression import DecodeCompressor, ObservationWindow
from entropyinfer.shard.config import EngineConfig
from entropyinfer.shard.devices import synced_now
from entropyinfer.shard.kv_cache import CompactKVCache, KVCache
from entropyinfer.shard.kv_pages import KVPages
from entropyinfer.shard.model import CausalLM
from entropyinfer.shard.paged_prefix import PagedPrefix
from entropyinfer.shard.prefill_graphs import PrefillGraphs

ProgressFn = Callable[[int, int], None]


class PromptQueries(Protocol):
    """Where prefill puts the last prompt queries of every layer (`ObservationWindow`)."""

    def record_prompt(self, layer: int, slot: int, q_all: torch.Tensor, n: int) -> None: ...


class ChunkQueries(Protocol):
    """Where a paged prefill chunk puts its queries among the prompt's last ones (`PromptObserver`)."""

    def record_chunk(self, layer: int, q: torch.Tensor, start: int, seq_len: int) -> None: ...


class Engine:
    def __init__(self, model: CausalLM, config: EngineConfig | None = None):
        self.model = model
        self.arch = model.arch
        self.config = config or EngineConfig()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # piecewise graphs of short prefill chunks: one rank only (a row-parallel projection all-reduces)
        on = self.config.graphs_prefill(self.device.type) and model.group is None
        self.prefill_graphs = PrefillGraphs(self) if on else None

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.arch, batch, capacity, self.device, self.dtype)

    @torch.inference_mode()
    def prefill(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        slot: int,
        attention: PrefillAttention,
        *,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        all_logits: bool = False,
        observe: PromptQueries | None = None,
    ) -> torch.Tensor:
        """Run a prompt [N] into cache slot `slot`; return fp32 logits of the last position [vocab]
        (or of every position [N, vocab] with `all_logits`, for tests). With `observe`, the last prompt
        queries of every layer go to the observation window of decode-time compression."""
        n = tokens.shape[0]
        hq, d = self.arch.num_heads, self.arch.head_dim
        chunk = self.config.prefill_chunk_size
        spans = [(c0, min(n, c0 + chunk)) for c0 in range(0, n, chunk)]
        h = self.model.model.embed_tokens(tokens.to(self.device))  # [N, hidden]
        cos, sin = self.model.rotary(torch.arange(n, device=self.device), self.dtype)
        q_all = torch.empty(hq, n, d, device=self.device, dtype=self.dtype)
        attention.begin(len(self.model.layers), n)  # per-prompt setup (SparsePrefill's budget solve, state)
        for li, layer in enumerate(self.model.layers):
            k_cache, v_cache = cache.k(li)[slot], cache.v(li)[slot]
            # rope writes q and k straight into the query buffer and the cache
            layer.prefill_inputs(h, cos, sin, q_all, k_cache, v_cache, spans)
            if observe is not None:
                observe.record_prompt(li, slot, q_all, n)
            attn = attention(li, q_all, k_cache[:, :n], v_cache[:, :n])  # [Hq, N, d]
            layer.prefill_finish(h, attn, spans)
            del attn
            if cancel is not None and cancel.is_set():
                raise RequestCancelled("request cancelled during prefill")
            if progress is not None:
                progress(n * (li + 1) // len(self.model.layers), n)
        cache.lengths[slot] = n
        if all_logits:
            return torch.cat([self.model.logits(h[c0:c1]) for c0, c1 in spans])
        return self.model.logits(h[n - 1])

    @torch.inference_mode()
    def prefill_pages(
        self,
        tokens: torch.Tensor,
        start: int,
        seq_len: int,
        pages: KVPages,
        table: torch.Tensor,
        attention: PrefillAttention,
        *,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        observe: ChunkQueries | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor | None:
        """Run prompt positions ``[start, start + len(tokens))`` of a `seq_len`-token prompt through every
        layer, straight into paged KV (the engine core's prefill, one chunk at a time or the whole prompt).

        table: int64 ``[Hkv, pages]`` on the device, the sequence's pages, covering the chunk's end; the
        chunk's keys and values are written there, and the chunk attends over the keys ``[0, end)``. A
        chunk at 0 that covers the whole prompt runs the attention's one-shot call on its own keys, any other
        its `chunk_paged` call over a `PagedPrefix` (`shard/paged_prefix.py`), which picks the same blocks as
        one-shot under causal budget rules: a sparse chunk reads the prefix in the pages when
        `EngineConfig.paged_prefix_reads` allows it on this device, otherwise (and for dense chunks) the
        prefix is gathered into one contiguous ``[Hkv, end, d]`` per layer, freed before the next. The
        caller has run the attention's `begin` (if it has one) for this prompt. -> fp32 logits of the
        prompt's last position [vocab] when the chunk ends the prompt, else None; with `all_logits`, fp32
        logits of every position of the chunk [C, vocab] when it ends the prompt (prompt logprobs)."""
        c, end = tokens.shape[0], start + tokens.shape[0]
        hq, hkv, d, ps = self.arch.num_heads, self.arch.num_kv_heads, self.arch.head_dim, pages.page_size
        step = self.config.prefill_chunk_size
        spans = [(c0, min(c, c0 + step)) for c0 in range(0, c, step)]
        # non_blocking: a blocking copy would wait for the decode step queued before this chunk
        h = self.model.model.embed_tokens(tokens.to(self.device, non_blocking=True))  # [C, hidden]
        cos, sin = self.model.rotary(torch.arange(start, end, device=self.device), self.dtype)
        graphs = self.prefill_graphs.get(c) if self.prefill_graphs is not None else None
        if graphs is not None:  # the token-wise parts replayed on static buffers (`shard/prefill_graphs.py`)
            graphs.h[:c].copy_(h)
            graphs.h[c:].zero_()  # rows past the chunk: kept small, never read
            graphs.cos[:c].copy_(cos)
            graphs.sin[:c].copy_(sin)
            h, q, k, v = graphs.h[:c], graphs.q[:, :c], graphs.k[:, :c], graphs.v[:, :c]
        else:
            q = torch.empty(hq, c, d, device=self.device, dtype=self.dtype)
            k = torch.empty(hkv, c, d, device=self.device, dtype=self.dtype)
            v = torch.empty(hkv, c, d, device=self.device, dtype=self.dtype)
        pos = torch.arange(start, end, device=self.device)
        # where each position's key and value go, per KV head: [C, Hkv] (`paged_kv_write`'s layout),
        # contiguous as in decode: strides that do not depend on C, so no kernel variant per chunk length
        write_page = table[:, pos // ps].T.contiguous()
        write_off = (pos % ps)[:, None].expand(c, hkv).contiguous()
        prefix = table[:, : -(-end // ps)]  # [Hkv, P]
        one_shot = start == 0 and end == seq_len
        in_place = self.config.reads_prefix_in_place(self.device.type)
        for li, layer in enumerate(self.model.layers):
            if graphs is not None:
                graphs.run_inputs(li)
            else:  # rope writes q and k straight into the chunk buffers
                layer.prefill_inputs(h, cos, sin, q, k, v, spans)
            k_pages, v_pages = pages.k(li), pages.v(li)
            paged_kv_write(k.transpose(0, 1), v.transpose(0, 1), pages.kv(li), write_page, write_off)
            if observe is not None:
                observe.record_chunk(li, q, start, seq_len)
            if one_shot:
                attn = attention(li, q, k, v)  # [Hq, C, d]
            else:
                paged = PagedPrefix(k_pages, v_pages, prefix, k, v, start, end, in_place)
                attn = attention.chunk_paged(li, q, paged, start, seq_len)
                del paged
            if graphs is not None:
                graphs.attn[:, :c].copy_(attn)
                graphs.run_outputs(li)
            else:
                layer.prefill_finish(h, attn, spans)
            del attn
            if cancel is not None and cancel.is_set():
                raise RequestCancelled("request cancelled during prefill")
            if progress is not None:
                progress(start + c * (li + 1) // len(self.model.layers), seq_len)
        if end != seq_len:
            return None
        if all_logits:
            return torch.cat([self.model.logits(h[c0:c1]) for c0, c1 in spans])
        return self.model.logits(h[c - 1])

    @torch.inference_mode()
    def decode_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | CompactKVCache,
        obs: ObservationWindow | None = None,
    ) -> torch.Tensor:
        """One token per cache slot: tokens [B], positions [B] (int64) -> fp32 logits [B, vocab].

        Static shapes and no host syncs, so the step can be captured in a CUDA graph. On a `KVCache` the
        token is written at its position; on a `CompactKVCache` at ``lengths[layer, b, h]`` of every head
        (which then grows by one). With `obs`, every layer's queries are appended to the window.
        """
        b = tokens.shape[0]
        hq, d = self.arch.num_heads, self.arch.head_dim
        h = self.model.model.embed_tokens(tokens)[:, None]  # [B, 1, hidden]
        cos, sin = self.model.rotary(positions[:, None], self.dtype)  # [B, 1, d]
        rows = torch.arange(b, device=tokens.device)
        compact = isinstance(cache, CompactKVCache)
        if isinstance(cache, CompactKVCache):
            heads = torch.arange(self.arch.num_kv_heads, device=tokens.device)[None, :]
            write = cache.lengths.long()  # [L, B, Hkv]: where this token goes in every head
            cache.lengths.add_(1)
            pos = positions.to(torch.int32)[None, :, None, None].expand(*write.shape, 1)
            cache.positions.scatter_(3, write[..., None], pos)
        else:
            cache.lengths.copy_((positions + 1).to(torch.int32)[:, None].expand_as(cache.lengths))
        if obs is not None:
            obs.begin_step()
        for li, layer in enumerate(self.model.layers):
            q, k, v = layer.attention_inputs(h, cos, sin)  # [B, H, 1, d]
            k_cache, v_cache = cache.k(li), cache.v(li)
            if compact:
                k_cache[rows[:, None], heads, write[li]] = k[:, :, 0]
                v_cache[rows[:, None], heads, write[li]] = v[:, :, 0]
            else:
                k_cache[rows, :, positions] = k[:, :, 0]
                v_cache[rows, :, positions] = v[:, :, 0]
            if obs is not None:
                obs.append(li, q)
            o = cached_decode_attention(q[:, :, 0], k_cache, v_cache, cache.layer_lengths(li))  # [B, Hq, d]
            h = layer.finish(h, o.reshape(b, 1, hq * d))
        return self.model.logits(h[:, 0])


class GraphedDecode:
    """The decode step captured in a CUDA graph for one cache (static buffers, replayed per token).

    Works for a full `KVCache` and a `CompactKVCache` (optionally appending queries to `obs`). Warm-up runs
    outside the capture mutate the cache's lengths (and the window's counter): they are restored after each.
    A full cache is warmed up at its last position, which no sequence has reached yet; a compact cache at
    each head's next free slot, which the next real step overwrites (so it needs one free slot).
    Runs under inference mode, like the step it captures: a compact cache's tensors are inference tensors
    (compression makes them there), and restoring them in place is only allowed in that mode.
    """

    @torch.inference_mode()
    def __init__(self, engine: Engine, cache: KVCache | CompactKVCache, obs: ObservationWindow | None = None):
        self.engine, self.cache, self.obs = engine, cache, obs
        b = cache.batch
        self.tokens = torch.zeros(b, dtype=torch.long, device=engine.device)
        self.positions = torch.full((b,), cache.capacity - 1, dtype=torch.long, device=engine.device)
        state = [cache.lengths] + (obs.state() if obs is not None else [])
        saved = [t.clone() for t in state]

        def restore() -> None:
            for t, s in zip(state, saved, strict=True):
                t.copy_(s)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton compiles and allocates outside the capture
            for _ in range(2):
                engine.decode_step(self.tokens, self.positions, cache, obs)
                restore()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = engine.decode_step(self.tokens, self.positions, cache, obs)
        restore()

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits


class DecodeRunner:
    """Decode steps of one batch: runs compression when it is due, and picks eager steps or a CUDA graph.

    On GPU with `graphs`, the step is captured in a CUDA graph when at least `min_graph_steps` steps will
    run on it (counting the one about to run): until the end, or, before the first compression, until that
    compression (latent compression observes N_D generated tokens over the full cache first; the graph then
    appends their queries to the observation window). Otherwise the steps run eagerly.
    The first compression moves what is kept into a compact buffer and releases the full cache, so
    `cache` is then a new object and the graph is captured again; re-compression works in place.
    `paused_s`: seconds spent compressing and capturing, reported apart from the decode time.
    """

    def __init__(
        self,
        engine: Engine,
        cache: KVCache | CompactKVCache,
        max_steps: int,
        compressor: DecodeCompressor | None = None,
        *,
        graphs: bool = True,
        min_graph_steps: int = 8,
    ):
        self.engine, self.cache, self.max_steps, self.compressor = engine, cache, max_steps, compressor
        self.graphs, self.min_graph_steps = graphs, min_graph_steps
        self.steps = 0
        self.paused_s = 0.0
        self._step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def _build(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        c, cache, engine = self.compressor, self.cache, self.engine
        obs = c.obs if c is not None and c.records_queries else None
        left = self.max_steps - self.steps + 1
        if c is not None and c.compressions == 0:  # the full cache lives until the first compression
            left = min(left, c.cfg.compress_after - self.steps + 1)
        if self.graphs and engine.device.type == "cuda" and left >= self.min_graph_steps:
            return GraphedDecode(engine, cache, obs)
        return lambda t, p: engine.decode_step(t, p, cache, obs)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One step: tokens [B] at positions [B] -> fp32 logits [B, vocab]."""
        if self._step is None or (self.compressor is not None and self.compressor.due(self.steps)):
            t0 = synced_now(self.engine.device)
            if self.compressor is not None and self.compressor.due(self.steps):
                compact = self.compressor.run(self.cache, self.steps)
                if compact is not self.cache:
                    self.cache, self._step = compact, None
            if self._step is None:
                self._step = self._build()
            self.paused_s += synced_now(self.engine.device) - t0
        logits = self._step(tokens, positions)
        self.steps += 1
        return logits
