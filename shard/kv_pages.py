"""Paged KV memory: one pool of fixed-size pages per layer, and the block tables of the sequences.

Layout: ``data [layers, 2, num_pages, Hkv, page_size, d]``; `k(layer)` / `v(layer)` are the
``[num_pages, Hkv, page_size, d]`` views the paged decode kernel reads. A page id names the same slot in
every layer (a sequence's layers always hold the same number of tokens per head, up to per-layer
compression capacities), but heads are allocated separately: KV head ``h`` of a sequence owns
``(page, h)`` slices, with one free list per head, so once compression leaves heads with different
lengths each head holds only the pages it needs (``Sequence.block_table[h]``). Uncompressed sequences take
one page per head at a time, in step.

Token ``p`` of (sequence, head ``h``) lives in ``k(layer)[block_table[h][p // page_size], h,
p % page_size]``. Pages are zeroed once (never-written slots must not hold NaN garbage: the attention
masks them but ``0 * NaN`` is NaN) and returned to the free lists the moment a sequence finishes, is
cancelled, compressed or preempted.

`pool_pages` sizes the pool: an explicit `num_kv_pages`, or on GPU `gpu_memory_utilization` of the device
memory minus what is in use and a reserve for the largest prefill chunk (a whole prompt: its activations
and one layer's keys and values gathered from the pages), or on CPU 2 x the context.

Prefix caching (`shard/prefix_cache.py`) lives here too: a page of every head can be a shared cache entry,
referenced by several sequences (the first pages of their block tables, `Sequence.cached_names`), kept
resident when nobody references it and evicted least recently used when fresh pages run out.

Tensor parallelism (`shard/parallel/lockstep.py`): rank 0's pages keep the bookkeeping of every rank. Its
block tables have ``table_heads = tp x`` (local KV heads) rows, rank r's local heads at rows ``local =
[r * Hkv_local, (r + 1) * Hkv_local)``, so each rank's heads get their own lengths and pages after
compression while every rank's pool has the same page ids; the data tensor holds only the rank's own heads,
and `gather` / `write_heads` / `swap_out` / `swap_in` move the rows of `local`. `on_evict` / `on_swap` tell
the other ranks what rank 0 did (their prefix-cache policy states, their swapped KV).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.block_tables import BatchTables
from entropyinfer.shard.config import EngineConfig
from entropyinfer.shard.prefix_cache import PrefixCache
from entropyinfer.shard.sequence import Sequence
from entropyinfer.shard.step_inputs import StepInputs


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def pool_pages(
    arch: ModelArch, cfg: EngineConfig, max_context: int, device: torch.device, dtype: torch.dtype
) -> int:
    """How many pages the pool gets (see the module docstring)."""
    if cfg.num_kv_pages is not None:
        return cfg.num_kv_pages
    elem = torch.empty((), dtype=dtype).element_size()
    page_bytes = arch.kv_bytes_per_token(elem) * cfg.kv_page_size
    if device.type != "cuda":
        return pages_for(2 * max_context, cfg.kv_page_size)
    free, total = torch.cuda.mem_get_info(device)
    # a prefill chunk can be a whole prompt (one alone in its step): its keys and values, and one layer's
    # prefix gathered from the pages, its queries and attention output, its hidden states
    layer_kv = arch.kv_bytes_per_token(elem) // arch.num_layers * max_context
    q_all = 2 * arch.num_heads * arch.head_dim * max_context * elem
    hidden = 2 * arch.hidden_size * max_context * elem  # hidden states + one layer's output
    chunk = min(cfg.prefill_chunk_size, max_context)
    mlp = 4 * arch.intermediate_size * chunk * elem  # token-wise activations of one sub-chunk
    reserve = 2 * layer_kv + q_all + hidden + mlp + (1 << 30)  # 1 GiB: sparse profiling, logits, graphs
    budget = int(total * cfg.gpu_memory_utilization) - (total - free) - reserve
    pages = budget // page_bytes
    if pages < 1:
        raise MemoryError(
            f"no GPU memory left for KV pages (budget {budget / 2**30:.1f} GiB after a "
            f"{reserve / 2**30:.1f} GiB prefill reserve): raise gpu_memory_utilization or lower max_model_len"
        )
    return int(pages)


class WriteIndex(NamedTuple):
    """`KVPages.write_index`: rows of a layer's pool viewed ``[pages * H, page_size * d]`` (``dst``) that take
    the rows ``src`` of the heads' data viewed ``[H * pages, page_size * d]``; ``pages``: the most any head
    holds."""

    dst: torch.Tensor
    src: torch.Tensor
    pages: int


def gather_heads(pool: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Contiguous ``[H, P * page_size, d]`` of a layer's pool ``[pages, H, page_size, d]`` read through
    ``table [H, P]`` (head h's pages in order). One `index_select` of whole (page, head) rows: a plain
    row copy, several times faster on GPU than advanced indexing with two index tensors."""
    n, h, ps, d = pool.shape
    rows = table * h + torch.arange(h, device=table.device)[:, None]
    return pool.view(n * h, ps * d).index_select(0, rows.reshape(-1)).view(h, -1, d)


class KVPages:
    def __init__(
        self,
        arch: ModelArch,
        num_pages: int,
        page_size: int,
        device: torch.device,
        dtype: torch.dtype,
        *,
        table_heads: int | None = None,
        local: slice | None = None,
    ) -> None:
        self.num_pages, self.page_size = num_pages, page_size
        self.num_layers, self.head_dim = arch.num_layers, arch.head_dim
        # block-table rows (every rank's KV heads under TP) and the rows whose data this pool holds
        self.num_kv_heads = table_heads or arch.num_kv_heads
        self.local = local or slice(0, arch.num_kv_heads)
        self.data_heads = arch.num_kv_heads
        self.on_evict: Callable[[bytes], None] | None = None  # a prefix cache entry was evicted
        self.on_swap: Callable[[str, Sequence], None] | None = None  # ("out" | "in", seq), tables set
        # one extra page, `scratch_page`, never handed out: padded rows of a graphed decode batch write there
        shape = (arch.num_layers, 2, num_pages + 1, arch.num_kv_heads, page_size, arch.head_dim)
        self.data = torch.zeros(shape, device=device, dtype=dtype)
        self.scratch_page = num_pages
        # per KV head, a stack of free page ids (page 0 handed out first)
        self._free: list[list[int]] = [list(range(num_pages - 1, -1, -1)) for _ in range(self.num_kv_heads)]
        self.device = device
        self.cache = PrefixCache()
        self.tables = BatchTables(self.num_kv_heads, device)  # device block tables (`batch_tables`)

    def kv(self, layer: int) -> torch.Tensor:
        """One layer's keys and values, ``[2, num_pages + 1, Hkv, page_size, d]`` (`paged_kv_write`)."""
        return self.data[layer]

    def k(self, layer: int) -> torch.Tensor:
        return self.data[layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        return self.data[layer, 1]

    # ------------------------------------------------------------------------------------------ counting
    @property
    def free_pages(self) -> int:
        """Pages an uncompressed sequence can still take in every head: free ones, plus the resident prefix
        cache pages that nobody references (evicted on demand)."""
        return min(len(f) for f in self._free) + self.cache.evictable

    @property
    def used_pages(self) -> int:
        """Pages held by sequences, counted per head and averaged (a page of all heads counts once);
        resident cache pages nobody references do not count."""
        held = sum(self.num_pages - len(f) for f in self._free)
        return round(held / self.num_kv_heads) - self.cache.evictable

    @property
    def page_bytes(self) -> int:
        """Bytes of one page in every layer and head."""
        return self.data[:, :, 0].numel() * self.data.element_size()

    def pages(self, tokens: int) -> int:
        return pages_for(tokens, self.page_size)

    def head_needs(self, seq: Sequence, extra: int = 1) -> list[int]:
        """Pages each head of `seq` lacks to hold `extra` more tokens."""
        return [
            max(0, self.pages(n + extra) - len(t))
            for n, t in zip(self.longest_per_head(seq), seq.block_table, strict=True)
        ]

    @staticmethod
    def longest_per_head(seq: Sequence) -> list[int]:
        """Each KV head's most cached tokens over the layers of `seq`. numpy, not a torch CPU reduction:
        this runs for every decoding sequence every step, and torch's took 3.2 ms each on an H200 host (16
        streams: 51 ms of a 109 ms step)."""
        lengths = seq.kv_lengths
        assert lengths is not None
        return [int(n) for n in lengths.numpy().max(axis=0)]

    def can_take(self, needs: list[int]) -> bool:
        spare = self.cache.evictable
        return all(len(f) + spare >= n for f, n in zip(self._free, needs, strict=True))

    # ---------------------------------------------------------------------------------------- allocating
    def _take(self, head: int, n: int) -> list[int]:
        """`n` page ids of one head: free ones first, then evicting unreferenced cache entries (LRU)."""
        free = self._free[head]
        while len(free) < n:
            name = next(iter(self.cache.idle), None)
            entry = self.cache.evict()
            if name is not None and self.on_evict is not None:
                self.on_evict(name)
            if entry is None:
                raise MemoryError(f"{n} KV pages asked in head {head}, {len(free)} free")
            for f, page in zip(self._free, entry.pages, strict=True):
                f.append(page)
        return [free.pop() for _ in range(n)]

    def allocate(self, seq: Sequence, tokens: int, cached: list[bytes] | None = None) -> None:
        """Give a sequence without pages room for `tokens` tokens in every head (lengths zero): its first
        pages are the prefix cache entries named `cached` (a reference each), the rest fresh."""
        cached = cached or []
        n = self.pages(tokens)
        entries = [self.cache.acquire(name) for name in cached]  # off the eviction list before taking
        fresh = n - len(entries)
        if self.free_pages < fresh:
            for name in cached:
                self.cache.release(name)
            raise MemoryError(f"{fresh} KV pages asked, {self.free_pages} free")
        seq.block_table = [[e.pages[h] for e in entries] for h in range(self.num_kv_heads)]
        for h, table in enumerate(seq.block_table):
            table.extend(self._take(h, fresh))
        seq.cached_names = list(cached)
        seq.table_cache = None
        seq.kv_lengths = torch.zeros(self.num_layers, self.num_kv_heads, dtype=torch.int32)
        seq.kv_lengths.fill_(len(cached) * self.page_size)

    def fits(self, tokens: int, cached: list[bytes], seq: Sequence | None = None) -> bool:
        """Could `allocate(seq, tokens, cached)` succeed now? (`seq`: for pools that hold only part of a
        sequence, `parallel/segment_pages.py`; every token here.)"""
        idle = sum(1 for name in cached if self.cache.entries[name].ref == 0)
        return self.free_pages - idle >= self.pages(tokens) - len(cached)

    def allocate_heads(self, seq: Sequence, needs: list[int]) -> None:
        """Give a sequence without pages `needs[h]` pages in head `h` (its lengths are left as they are)."""
        if not self.can_take(needs):
            raise MemoryError(f"KV pages asked per head {needs}, free {[len(f) for f in self._free]}")
        seq.block_table = [self._take(h, n) for h, n in enumerate(needs)]
        seq.cached_names = []
        seq.table_cache = None

    def grow(self, seq: Sequence, extra: int = 1) -> bool:
        """Room for `extra` more tokens in every (layer, head) of `seq`; False (nothing taken) if short."""
        needs = self.head_needs(seq, extra)
        if not self.can_take(needs):
            return False
        for h, (table, n) in enumerate(zip(seq.block_table, needs, strict=True)):
            table.extend(self._take(h, n))
        return True

    def free(self, seq: Sequence) -> None:
        """Return every page of `seq` at once: its private pages to the free lists, its references to
        shared cache entries (which stay resident until evicted)."""
        shared = len(seq.cached_names)
        for name in seq.cached_names:
            self.cache.release(name)
        for table, free in zip(seq.block_table, self._free, strict=True):
            free.extend(reversed(table[shared:]))
        self.cache.clear_pending(seq.request_id)
        seq.block_table, seq.cached_names = [], []
        seq.table_cache = None

    # ------------------------------------------------------------------------------------ prefix cache
    def register(self, seq: Sequence, names: list[bytes], upto: int, states: Mapping[int, object]) -> None:
        """Share the full pages of `seq` below page `upto` (their KV is written) under `names`, in order
        after those it already shares; it stops at a name another sequence registered first (that copy
        stays private). `states[i]`: the causal prefill state at the end of page i, if any."""
        for i in range(len(seq.cached_names), min(upto, len(names))):
            name = names[i]
            if name in self.cache.entries:
                self.cache.clear_pending(seq.request_id)
                return
            self.cache.insert(name, tuple(t[i] for t in seq.block_table), states.get(i))
            seq.cached_names.append(name)

    # ------------------------------------------------------------------------------------ moving tokens
    def page_index(self, block_table: list[list[int]]) -> torch.Tensor:
        """int64 ``[H, P]`` on the device: the heads' page lists (`seq.block_table[pages.local]` for this
        pool's heads), each padded with its last page. Build it once for a loop over layers: from lists it
        is a host conversion and a copy (8192 ids a head at 128k tokens)."""
        pages = max(len(t) for t in block_table)
        return torch.tensor(
            [t + [t[-1]] * (pages - len(t)) for t in block_table], dtype=torch.long, device=self.device
        )

    def gather_table(
        self, block_table: list[list[int]] | torch.Tensor, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous K and V of one layer of the heads with these page lists (or their `page_index`):
        ``[H, P * page_size, d]`` each (P: the most pages any head holds; a head's slots past its length hold
        whatever its pages hold)."""
        table = block_table if isinstance(block_table, torch.Tensor) else self.page_index(block_table)
        return gather_heads(self.k(layer), table), gather_heads(self.v(layer), table)

    def write_index(self, block_table: list[list[int]]) -> WriteIndex:
        """Where `write_table` puts each head's pages of rows; build it once for a loop over layers."""
        pages = max((len(t) for t in block_table), default=0)
        heads = len(block_table)
        dst = [page * heads + h for h, t in enumerate(block_table) for page in t]
        src = [h * pages + j for h, t in enumerate(block_table) for j in range(len(t))]
        dev = self.device
        return WriteIndex(
            torch.tensor(dst, dtype=torch.long, device=dev),
            torch.tensor(src, dtype=torch.long, device=dev),
            pages,
        )

    def write_heads(
        self,
        seq: Sequence,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        index: WriteIndex | None = None,
    ) -> None:
        """Write ``[Hkv, S, d]`` keys and values into the pages of `seq` (each head up to its pages)."""
        self.write_table(seq.block_table[self.local], layer, keys, values, index)

    def write_table(
        self,
        block_table: list[list[int]],
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        index: WriteIndex | None = None,
    ) -> None:
        """`write_heads` of the data heads given their page lists (or their `write_index`): one row copy of
        whole (page, head) rows per K and V."""
        index = self.write_index(block_table) if index is None else index
        if not index.dst.numel():
            return
        ps, d = self.page_size, self.head_dim
        span = index.pages * ps
        for pool, src in ((self.k(layer), keys), (self.v(layer), values)):
            x = src[:, :span]
            if x.shape[1] < span:
                x = torch.nn.functional.pad(x, (0, 0, 0, span - x.shape[1]))
            rows = x.reshape(-1, ps * d).index_select(0, index.src)
            pool.view(-1, ps * d).index_copy_(0, index.dst, rows.to(pool.dtype))

    def swap_out(self, seq: Sequence) -> None:
        """Copy the KV of `seq` to host memory and free its pages (preemption of a compressed sequence)."""
        saved = []
        index = self.page_index(seq.block_table[self.local])  # once, not per layer
        for li in range(self.num_layers):
            k, v = self.gather_table(index, li)
            saved.append((k.to("cpu", copy=True), v.to("cpu", copy=True)))
        seq.swapped_kv = saved
        seq.swapped_pages = [len(t) for t in seq.block_table]
        if self.on_swap is not None:
            self.on_swap("out", seq)
        self.free(seq)

    def swap_in(self, seq: Sequence) -> bool:
        """Bring a swapped sequence back (its pages plus room for one token); False if pages are short."""
        needs = seq.swapped_pages
        if seq.swapped_kv is None or not self.can_take([n + 1 for n in needs]):
            return False
        self.allocate_heads(seq, needs)
        if self.on_swap is not None:
            self.on_swap("in", seq)
        windex = self.write_index(seq.block_table[self.local])  # once, not per layer
        for li, (k, v) in enumerate(seq.swapped_kv):
            self.write_heads(seq, li, k.to(self.device), v.to(self.device), windex)
        seq.swapped_kv = None
        return True

    # ------------------------------------------------------------------------------------ batch tensors
    def batch_tables(self, seqs: list[Sequence], stage: StepInputs | None = None) -> torch.Tensor:
        """int32 ``[B, Hkv, max_pages]`` block tables of a decode batch (padded with each row's last page).

        Each sequence's table lives on the device and only its new entries are written (a new page every
        `page_size` tokens); compression and preemption rebuild it; the batch's rows are copied only when
        they change (`shard/block_tables.py`). With `stage`, the writes ride with the decode step's one
        host-to-device copy and the result is valid after ``stage.upload()``."""
        return self.tables.batch(seqs, stage)

    def device_table(self, seq: Sequence) -> torch.Tensor:
        """int32 ``[Hkv, pages]`` on the device, padded per head with the head's last page."""
        return self.tables.table(seq)
