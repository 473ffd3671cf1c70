"""Piecewise CUDA graphs for short prefill chunks: the token-wise parts of every layer captured, the attention
between them eager (vLLM's piecewise graphs do the same for its mixed batches).

A chunked prefill beside decoding streams runs chunks of a few hundred tokens, and there the host, not the
GPU, set the step's time: on the lent H200 hosts a 512-token chunk of Llama-3-8B's shape over a 128k prefix
took 46-83 ms of host time per step against 25-29 ms of kernels (`benchmarks/stall_trace.py`), a few hundred
torch ops and Triton launches per layer. Per layer, two graphs replace the ops outside attention:

- ``inputs[layer]``: input norm, the q|k|v projection, rope; writes the static ``q, k, v``;
- ``outputs[layer]``: o projection, the residual add and norm, the MLP; reads the static ``attn`` and
  updates the static hidden states ``h`` in place.

A chunk of ``c`` tokens runs in the set of the smallest size ``>= c`` in `PREFILL_GRAPH_SIZES` (the rows
past ``c`` start each chunk as zeros; every op here is token-wise, so they never reach the chunk's rows).
Longer chunks run eagerly: there the GPU work dominates. The sets share one graph memory pool and one
capture stream; `build_engine` captures them all when it warms the kernels up (`capture_all`), otherwise each
is captured on first use (mid-serving: a device sync and 2 x layers captures). One rank only (a row-parallel
projection all-reduces inside).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from entropyinfer.shard.engine import Engine

__all__ = ["PREFILL_GRAPH_SIZES", "PrefillGraphs"]

PREFILL_GRAPH_SIZES = (16, 32, 64, 128, 256, 512)


class GraphSet:
    """Static buffers of chunks of up to `size` tokens and each layer's two graphs: captured on `stream`
    (CUDA), else (None) the same functions run eagerly on the same buffers (how the CPU tests cover the
    static-buffer path)."""

    @torch.inference_mode()
    def __init__(self, engine: Engine, size: int, pool: Any, stream: torch.cuda.Stream | None) -> None:
        arch, dev, dt = engine.arch, engine.device, engine.dtype
        hq, hkv, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.size = size
        self.h = torch.zeros(size, arch.hidden_size, device=dev, dtype=dt)
        self.cos = torch.zeros(size, d, device=dev, dtype=dt)
        self.sin = torch.zeros(size, d, device=dev, dtype=dt)
        self.q = torch.zeros(hq, size, d, device=dev, dtype=dt)
        self.k = torch.zeros(hkv, size, d, device=dev, dtype=dt)
        self.v = torch.zeros(hkv, size, d, device=dev, dtype=dt)
        self.attn = torch.zeros(hq, size, d, device=dev, dtype=dt)
        layers, whole = engine.model.layers, [(0, size)]

        def inputs(li: int) -> None:
            layers[li].prefill_inputs(self.h, self.cos, self.sin, self.q, self.k, self.v, whole)

        def outputs(li: int) -> None:
            layers[li].prefill_finish(self.h, self.attn, whole)

        self._inputs, self._outputs = inputs, outputs
        self.inputs: list[torch.cuda.CUDAGraph] = []
        self.outputs: list[torch.cuda.CUDAGraph] = []
        if stream is not None:
            self._capture(len(layers), pool, stream)

    def run_inputs(self, layer: int) -> None:
        """q, k, v of the chunk in `h` at this layer."""
        if self.inputs:
            self.inputs[layer].replay()
        else:
            self._inputs(layer)

    def run_outputs(self, layer: int) -> None:
        """`h` after this layer, from `attn`."""
        if self.outputs:
            self.outputs[layer].replay()
        else:
            self._outputs(layer)

    def _capture(self, num_layers: int, pool: Any, stream: torch.cuda.Stream) -> None:
        inputs, outputs = self._inputs, self._outputs
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):  # warm-up: Triton compiles and the allocator settles outside capture
            for li in range(num_layers):
                inputs(li)
                outputs(li)
            stream.synchronize()
            # capture_begin / capture_end, not `torch.cuda.graph`: that empties the allocator's cache and
            # syncs the device around each of the 2 x layers captures
            for li in range(num_layers):
                for fn, graphs in ((inputs, self.inputs), (outputs, self.outputs)):
                    g = torch.cuda.CUDAGraph()
                    g.capture_begin(pool=pool)
                    try:
                        fn(li)
                    except BaseException:
                        with contextlib.suppress(Exception):  # keep the capture's own error
                            g.capture_end()
                        raise
                    g.capture_end()
                    graphs.append(g)
        torch.cuda.current_stream(stream.device).wait_stream(stream)
        self.h.zero_()


class PrefillGraphs:
    """The graph sets of one engine, by chunk size (see the module docstring). On CUDA every set is captured
    on one stream of the engine's device, so the shared pool's blocks serve every set (the caching allocator
    reuses a block only on the stream that freed it). A size whose capture failed runs eagerly from then on
    (logged once)."""

    def __init__(self, engine: Engine, sizes: tuple[int, ...] = PREFILL_GRAPH_SIZES) -> None:
        self.engine, self.sizes = engine, tuple(sorted(sizes))
        self.sets: dict[int, GraphSet | None] = {}  # None: the capture failed, eager
        cuda = engine.device.type == "cuda"
        self._stream = torch.cuda.Stream(engine.device) if cuda else None
        self._pool = torch.cuda.graph_pool_handle() if cuda else None
        self.replayed_chunks = 0  # chunks run through a set (how the tests see that sets ran)

    def size_for(self, tokens: int) -> int | None:
        """The set size a chunk of `tokens` runs in, or None (longer than the largest: eager)."""
        return next((s for s in self.sizes if s >= tokens), None)

    def get(self, tokens: int) -> GraphSet | None:
        """The set for a chunk of `tokens` (built on first use unless `capture_all` ran), or None: eager."""
        size = self.size_for(tokens)
        if size is None:
            return None
        if size not in self.sets:
            self._build(size)
        graphs = self.sets[size]
        if graphs is not None:
            self.replayed_chunks += 1
        return graphs

    def capture_all(self) -> None:
        """Build every size now, largest first (`build_engine`, before the KV pool takes the free memory):
        any chunk up to the largest size may come, since a prompt alone in its step runs whole."""
        for size in reversed(self.sizes):
            if size not in self.sets:
                self._build(size)

    def _build(self, size: int) -> None:
        try:
            with (
                torch.cuda.device(self.engine.device)
                if self._stream is not None
                else contextlib.nullcontext()
            ):
                self.sets[size] = GraphSet(self.engine, size, self._pool, self._stream)
        except Exception:  # e.g. out of memory after the KV pool took it: this size stays eager
            logging.getLogger(__name__).exception("prefill graphs of %d tokens failed: eager instead", size)
            self.sets[size] = None
