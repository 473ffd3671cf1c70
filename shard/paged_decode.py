"""The engine core's decode step over paged KV: one token for every running sequence, eager or replayed
from a CUDA graph.

    decoder = PagedDecoder(engine, pages, obs_pool)            # one per EngineCore
    logits = decoder(tokens, positions, tables, lengths, obs=(rows, slots), steps_left=n)

Inputs are device tensors: ``tokens``, ``positions`` int64 ``[B]`` (positions drive rope); ``tables`` int32
``[B, Hkv, P]`` (`KVPages.batch_tables`); ``lengths`` int32 ``[L, B, Hkv]``, the tokens cached per (layer,
sequence, KV head) before this one, which is written at index ``lengths`` of its head's pages (the caller
made room, and adds one afterwards); ``obs`` optional int64 ``(rows, slots)`` ``[B]``: every layer's
queries go to the `ObservationPool` at ``(rows[b], slots[b])`` (a row without a window passes the pool's
`scratch_row`). Returns fp32 logits ``[B, vocab]`` (from a graph: a view of its output buffer, valid until
the next step).

Eager (CPU, graphs off, or a batch that will not run long enough to pay for a capture): `forward` at the
batch's own shapes. Graphed (CUDA, ``EngineConfig.cuda_graphs``, and ``steps_left >=
cuda_graph_min_tokens`` or a graph already captured for the shape): the batch is padded to the next of
`graph_batch_sizes` (1, 2, 4, 8, then multiples of 8 up to ``max_num_seqs``) and the table width to the
next power of two (`table_width`, at least `MIN_TABLE_WIDTH`), so a growing sequence re-captures only when
its page count doubles. One `_PaddedStep` per (batch, width) holds static input buffers, copied in per
step, and its graph, captured lazily on first use; all graphs share one memory pool, and at most
``max_graphs`` are kept (least recently used dropped first). Padded rows have length 0, a table of
`KVPages.scratch_page` (a page never handed out) and the pool's scratch row, so they write only there; the
graph always writes the queries (rows without a window into the scratch row), so one graph serves batches
with and without observation windows. The pool's tensor is reallocated when it grows: graphs captured on
the old one are dropped then (the reference each keeps holds the old memory until that moment).

`pad_on_cpu=True` runs the padded path eagerly on any device (tests of the padding without CUDA).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from entropyinfer.kernels.paged_decode_attention import paged_decode_attention
from entropyinfer.kernels.paged_kv_write import paged_kv_write
from entropyinfer.shard.compression import ObservationPool
from entropyinfer.shard.engine import Engine
from entropyinfer.shard.kv_pages import KVPages

MIN_TABLE_WIDTH = 16  # pages per head: 256 tokens at the default page size
ObsIndex = tuple[torch.Tensor, torch.Tensor]


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Padded batch sizes of the graphs: 1, 2, 4, 8, 16, 24, 32, ... and `max_num_seqs` itself."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return [*sizes, max_num_seqs]


def table_width(pages: int) -> int:
    """Table width of a graph for a batch whose longest head holds `pages` pages (a power of two)."""
    return max(MIN_TABLE_WIDTH, 1 << max(pages - 1, 0).bit_length())


class PagedDecoder:
    def __init__(
        self,
        engine: Engine,
        pages: KVPages,
        obs_pool: ObservationPool,
        *,
        graphs: bool | None = None,
        pad_on_cpu: bool = False,
        max_graphs: int = 64,
    ) -> None:
        self.engine, self.model, self.pages, self.obs_pool = engine, engine.model, pages, obs_pool
        self.arch, self.device, self.dtype = engine.arch, engine.device, engine.dtype
        cfg = engine.config
        on_cuda = self.device.type == "cuda"
        self.graphs = (cfg.cuda_graphs if graphs is None else graphs) and on_cuda
        self.pad_on_cpu = pad_on_cpu and not self.graphs
        self.min_tokens, self.max_graphs = cfg.cuda_graph_min_tokens, max_graphs
        self.batch_sizes = graph_batch_sizes(cfg.max_num_seqs)
        self._steps: OrderedDict[tuple[int, int], _PaddedStep] = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.captures = 0  # graphs captured so far (tests, benchmarks)

    @torch.inference_mode()
    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        tables: torch.Tensor,
        lengths: torch.Tensor,
        obs: ObsIndex | None = None,
        *,
        steps_left: int = 1 << 30,
    ) -> torch.Tensor:
        """One decode step (see the module docstring); `steps_left`: how many more steps this batch will
        probably run (the most tokens any of its sequences may still generate)."""
        b, width = tokens.shape[0], tables.shape[2]
        key = self._key(b, width)
        step = self._steps.get(key) if key is not None else None
        padded = self.pad_on_cpu or (self.graphs and (step is not None or steps_left >= self.min_tokens))
        if key is None or not padded:
            return self.forward(tokens, positions, tables, lengths, obs)
        if step is None or (step.graph is not None and step.obs_q is not self.obs_pool.q):
            if step is not None:  # the observation pool grew: every graph writes the old tensor
                self._steps.clear()
            step = self._new_step(*key)
        self._steps.move_to_end(key)
        step.load(tokens, positions, tables, lengths, obs)
        if step.graph is None:
            return self.forward(step.tokens, step.positions, step.tables, step.lengths, step.obs)[:b]
        step.graph.replay()
        assert step.logits is not None
        return step.logits[:b]  # the graph's output buffer: valid until the next step

    @property
    def graph_keys(self) -> list[tuple[int, int]]:
        """(padded batch, table width) of the graphs held now."""
        return [k for k, s in self._steps.items() if s.graph is not None]

    def _key(self, batch: int, width: int) -> tuple[int, int] | None:
        sizes = [s for s in self.batch_sizes if s >= batch]
        return (sizes[0], table_width(width)) if sizes else None

    def _new_step(self, batch: int, width: int) -> _PaddedStep:
        while len(self._steps) >= self.max_graphs:
            self._steps.popitem(last=False)
        step = _PaddedStep(self, batch, width)
        if self.graphs:
            self._capture(step)
        self._steps[(batch, width)] = step
        return step

    def _capture(self, step: _PaddedStep) -> None:
        """Warm up (Triton compiles, the kernel's scratch is allocated) and capture, on padding only: no
        real page or observation row is touched before the real inputs are loaded."""
        step.reset()
        args = (step.tokens, step.positions, step.tables, step.lengths, step.obs)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward(*args)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            step.logits = self.forward(*args)
        step.graph, step.obs_q = graph, self.obs_pool.q
        self.captures += 1

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        tables: torch.Tensor,
        lengths: torch.Tensor,
        obs: ObsIndex | None = None,
    ) -> torch.Tensor:
        """The step itself at the given shapes: static shapes, no host sync (capturable)."""
        b = tokens.shape[0]
        hq, d, ps = self.arch.num_heads, self.arch.head_dim, self.pages.page_size
        h = self.model.model.embed_tokens(tokens)[:, None]  # [B, 1, hidden]
        cos, sin = self.model.rotary(positions[:, None], self.dtype)
        lens = lengths.long()
        write_page = tables.long()[None].expand(lens.shape[0], -1, -1, -1).gather(3, (lens // ps)[..., None])
        write_page, write_off = write_page[..., 0], lens % ps  # [L, B, Hkv]
        after = lengths + 1
        for li, layer in enumerate(self.model.layers):
            q, k, v = layer.attention_inputs(h, cos, sin)  # [B, H, 1, d]
            paged_kv_write(k[:, :, 0], v[:, :, 0], self.pages.kv(li), write_page[li], write_off[li])
            if obs is not None:
                self.obs_pool.append(li, obs[0], obs[1], q)
            o = paged_decode_attention(
                q[:, :, 0], self.pages.k(li), self.pages.v(li), tables, after[li]
            )  # [B, Hq, d]
            h = layer.finish(h, o.reshape(b, 1, hq * d))
        return self.model.logits(h[:, 0])


class _PaddedStep:
    """Static inputs of one (padded batch, table width), and on CUDA the graph that reads them."""

    def __init__(self, decoder: PagedDecoder, batch: int, width: int) -> None:
        dev, arch = decoder.device, decoder.arch
        self.scratch_page, self.scratch_row = decoder.pages.scratch_page, decoder.obs_pool.scratch_row
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.long, device=dev)
        self.tables = torch.full(
            (batch, arch.num_kv_heads, width), self.scratch_page, dtype=torch.int32, device=dev
        )
        self.lengths = torch.zeros(arch.num_layers, batch, arch.num_kv_heads, dtype=torch.int32, device=dev)
        self.obs = (
            torch.full((batch,), self.scratch_row, dtype=torch.long, device=dev),
            torch.zeros(batch, dtype=torch.long, device=dev),
        )
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.obs_q: torch.Tensor | None = None  # the pool tensor the graph writes (kept alive with it)
        self.used, self.obs_real = 0, False  # rows [used:] are padding; some row [:used] has a window
        # the tables tensor whose rows [:used] the buffer holds: `KVPages.batch_tables` returns the same
        # object while the batch's tables are unchanged, and then they are not copied again
        self.tables_src: torch.Tensor | None = None
        self.table_loads = 0  # tables copied in (tests)

    def reset(self) -> None:
        """Every row padding."""
        for t in (self.tokens, self.positions, self.lengths, self.obs[1]):
            t.zero_()
        self.tables.fill_(self.scratch_page)
        self.obs[0].fill_(self.scratch_row)
        self.used, self.obs_real, self.tables_src = 0, False, None

    def load(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        tables: torch.Tensor,
        lengths: torch.Tensor,
        obs: ObsIndex | None,
    ) -> None:
        """Copy a batch in; rows past it become padding (they may hold an earlier, larger batch's rows).
        Table entries past the batch's width keep stale ids: no length reaches them. Only what changed is
        written: the tables when they are another tensor than the last ones copied, rows that held real rows
        before, observation rows while some row has a window."""
        b, w = tokens.shape[0], tables.shape[2]
        self.tokens[:b].copy_(tokens)
        self.positions[:b].copy_(positions)
        if tables is not self.tables_src:
            self.tables[:b, :, :w].copy_(tables)
            self.tables_src = tables
            self.table_loads += 1
        self.lengths[:, :b].copy_(lengths)
        if obs is not None:
            self.obs[0][:b].copy_(obs[0])
            self.obs[1][:b].copy_(obs[1])
        elif self.obs_real:
            self.obs[0][:b].fill_(self.scratch_row)
            self.obs[1][:b].zero_()
        if b < self.used:  # rows b .. used held real rows: make them padding again
            for t in (self.tokens[b:], self.positions[b:], self.lengths[:, b:], self.obs[1][b:]):
                t.zero_()
            self.tables[b:].fill_(self.scratch_page)
            self.obs[0][b:].fill_(self.scratch_row)
        self.used, self.obs_real = b, obs is not None
