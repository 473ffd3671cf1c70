"""The per-shard hot path: layer-by-layer prefill into a preallocated KV cache, and the decode step.

Prefill runs one layer at a time over the whole prompt: the token-wise work (norms, q/k/v projections,
rope, o projection, MLP) in chunks of `prefill_chunk_size` tokens, attention over the whole prompt in
one call to the layer's `PrefillAttention` (dense fused SDPA, or a sparse policy's kernel). Only the last
position's logits are computed. Decode is one static-shape step, CUDA-graph captured on GPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from entropyinfer.errors import RequestCancelled
from entropyinfer.shard.attention import PrefillAttention, cached_decode_attention
from entropyinfer.shard.config import EngineConfig
from entropyinfer.shard.kv_cache import KVCache
from entropyinfer.shard.model import CausalLM

ProgressFn = Callable[[int, int], None]


class Engine:
    def __init__(self, model: CausalLM, config: EngineConfig | None = None):
        self.model = model
        self.arch = model.arch
        self.config = config or EngineConfig()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

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
    ) -> torch.Tensor:
        """Run a prompt [N] into cache slot `slot`; return fp32 logits of the last position [vocab]
        (or of every position [N, vocab] with `all_logits`, for tests)."""
        n = tokens.shape[0]
        hq, d = self.arch.num_heads, self.arch.head_dim
        chunk = self.config.prefill_chunk_size
        spans = [(c0, min(n, c0 + chunk)) for c0 in range(0, n, chunk)]
        h = self.model.model.embed_tokens(tokens.to(self.device))  # [N, hidden]
        cos, sin = self.model.rotary(torch.arange(n, device=self.device), self.dtype)
        q_all = torch.empty(hq, n, d, device=self.device, dtype=self.dtype)
        for li, layer in enumerate(self.model.layers):
            k_cache, v_cache = cache.k(li)[slot], cache.v(li)[slot]
            for c0, c1 in spans:
                q, k, v = layer.attention_inputs(h[None, c0:c1], cos[c0:c1], sin[c0:c1])
                q_all[:, c0:c1] = q[0]
                k_cache[:, c0:c1] = k[0]
                v_cache[:, c0:c1] = v[0]
            attn = attention(li, q_all, k_cache[:, :n], v_cache[:, :n])  # [Hq, N, d]
            for c0, c1 in spans:
                a = attn[:, c0:c1].transpose(0, 1).reshape(1, c1 - c0, hq * d)
                h[c0:c1] = layer.finish(h[None, c0:c1], a)[0]
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
    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per cache slot: tokens [B], positions [B] (int64) -> fp32 logits [B, vocab].

        Static shapes and no host syncs, so the step can be captured in a CUDA graph.
        """
        b = tokens.shape[0]
        hq, d = self.arch.num_heads, self.arch.head_dim
        h = self.model.model.embed_tokens(tokens)[:, None]  # [B, 1, hidden]
        cos, sin = self.model.rotary(positions[:, None], self.dtype)  # [B, 1, d]
        rows = torch.arange(b, device=tokens.device)
        cache.lengths.copy_((positions + 1).to(torch.int32)[:, None].expand_as(cache.lengths))
        for li, layer in enumerate(self.model.layers):
            q, k, v = layer.attention_inputs(h, cos, sin)  # [B, H, 1, d]
            k_cache, v_cache = cache.k(li), cache.v(li)
            k_cache[rows, :, positions] = k[:, :, 0]
            v_cache[rows, :, positions] = v[:, :, 0]
            o = cached_decode_attention(q[:, :, 0], k_cache, v_cache, cache.lengths)  # [B, Hq, d]
            h = layer.finish(h, o.reshape(b, 1, hq * d))
        return self.model.logits(h[:, 0])


class GraphedDecode:
    """The decode step captured in a CUDA graph for one cache (static buffers, replayed per token)."""

    def __init__(self, engine: Engine, cache: KVCache):
        self.engine, self.cache = engine, cache
        b = cache.batch
        self.tokens = torch.zeros(b, dtype=torch.long, device=engine.device)
        # Warm-up and capture write K/V at the last cache position, which no sequence has reached yet.
        self.positions = torch.full((b,), cache.capacity - 1, dtype=torch.long, device=engine.device)
        saved = cache.lengths.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton compiles and allocates outside the capture
            for _ in range(2):
                engine.decode_step(self.tokens, self.positions, cache)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = engine.decode_step(self.tokens, self.positions, cache)
        cache.lengths.copy_(saved)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits
