"""What the engine core asks of the model: the executor interface (vLLM's executor / worker split).

`EngineCore` (`shard/engine_core.py`) owns the scheduler, the sequences and the page bookkeeping; every
call that touches the model, the KV data or the observation pool goes through its executor:

    executor.prefill(call, attention, observer, progress, cancel)   # one prompt chunk -> PrefillResult
    executor.decode(tokens, positions, tables, lengths, obs, steps_left, ids)  # one batched step -> logits
    executor.sequence_parallel(seq_len, kv, all_logits)              # does a prompt prefill SP (one pass)?
    executor.shape                                                   # (tp, sp): (1, 1) on one rank
    executor.compress(seq, kv)                                       # KV compression of one sequence
    executor.acquire_row(window) / release_row(row)                  # observation-pool rows
    executor.share(request_id, segments, names) / drop(request_id)   # prefix-cache states, finished ones

`LocalExecutor` is one rank: the direct calls. `shard/parallel/lockstep.py: LockstepExecutor` is rank 0
of a tensor x sequence parallel group: it sends each call to the other ranks (`WorkerLoop`) and then runs
it itself, so every rank runs the same model calls in the same order.

Block tables and lengths are in the core's layout: ``table_heads`` rows, every rank's local KV heads one
after the other (`KVPages`); each rank uses the rows of its own heads (`local`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from entropyinfer.policies.config import SparsePrefillConfig
from entropyinfer.policies.head_stats import HeadStats
from entropyinfer.policies.kv_compression import KVCompressionConfig, head_capacities
from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.attention import PrefillAttention
from entropyinfer.shard.compression import ObservationPool, PromptObserver, compress_sequence
from entropyinfer.shard.engine import Engine
from entropyinfer.shard.kv_pages import KVPages, pool_pages
from entropyinfer.shard.paged_decode import ObsIndex, PagedDecoder
from entropyinfer.shard.prefill_state import LayerState
from entropyinfer.shard.sequence import Sequence
from entropyinfer.shard.sparse_attention import SparsePrefill

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class PrefillCall:
    """One prompt chunk, as every rank needs it.

    tokens: int64 ``[C]`` prompt positions ``[start, start + C)`` of a `seq_len`-token prompt; table: int64
    ``[table_heads, pages]`` the sequence's pages; policy / sparse: what builds the attention object; first:
    the prompt's first chunk (a new attention object, `begin`, then `resume` from the prefix cache entry
    ``resume = (name, segments)`` if given); obs_row / kv: the observation-pool row the chunk's last prompt
    queries go to (None: no compression window); entropy / stats: after the prompt's last chunk, return
    the per-head entropy (KV compression capacities) and the prefill statistics; all_logits: return the
    logits of every position of the chunk (prompt logprobs; computed on rank 0 only); sequence_parallel: the
    whole prompt, split over the SP ranks (`shard/parallel/sequence.py`; set by `LockstepExecutor`);
    head_stats: a sparse prefill collects the captured mass and, after the last chunk, returns the whole
    model's `HeadStats` (gathered from every rank's heads: `head_gather.py`; the policy actor's); head_table:
    on the first chunk, the policy actor's head budget table pinned for the prompt (scales float32 ``[L,
    Hkv]`` of the whole model, version): each rank pins its heads' rows."""

    request_id: str
    tokens: torch.Tensor
    start: int
    seq_len: int
    table: torch.Tensor
    policy: str
    sparse: SparsePrefillConfig
    first: bool
    resume: tuple[bytes, int] | None = None
    obs_row: int | None = None
    kv: KVCompressionConfig | None = None
    entropy: bool = False
    stats: bool = False
    all_logits: bool = False
    sequence_parallel: bool = False
    head_stats: bool = False
    head_table: tuple[torch.Tensor, int] | None = None


@dataclass(frozen=True)
class PrefillResult:
    """logits: fp32 ``[vocab]`` when the chunk ended the prompt (``[C, vocab]``, every position of the
    chunk, with `PrefillCall.all_logits`), else None; entropy: float32 ``[L, Hkv]``
    of the whole model's KV heads (None: not asked, or no layer profiled); stats: the prefill statistics
    over every head (`PrefillAttention.stats`), when asked; heads: `PrefillCall.head_stats` (None: not asked,
    one rank (the engine core reads its attention object), or not profiled)."""

    logits: torch.Tensor | None
    entropy: torch.Tensor | None = None
    stats: dict[str, Any] | None = None
    heads: HeadStats | None = None


class Executor(Protocol):
    pages: KVPages  # rank 0's pages: the bookkeeping of every rank, the data of its own heads
    obs: ObservationPool
    decoder: PagedDecoder
    full_arch: ModelArch  # the whole model (statistics, capacities)
    kv_replicas: int  # ranks holding each KV head (1: no replication)
    shape: tuple[int, int]  # (tensor_parallel_size, sequence_parallel_size)
    size: int  # ranks in all: tp x sp

    def prefill(
        self,
        call: PrefillCall,
        attention: PrefillAttention,
        observer: PromptObserver | None,
        progress: ProgressFn | None,
        cancel: Any,
    ) -> PrefillResult: ...

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        tables: torch.Tensor,
        lengths: torch.Tensor,
        obs: ObsIndex | None,
        steps_left: int,
        request_ids: list[str] | None = None,
    ) -> torch.Tensor: ...

    def sequence_parallel(self, seq_len: int, kv: KVCompressionConfig | None, all_logits: bool) -> bool:
        """Whether such a prompt prefills split over the SP ranks (then in one pass, not prefix-cached);
        `kv`: the request's decode-time compression, None if it keeps its whole cache."""
        ...

    def held_tokens(self, seq: Sequence, tokens: int) -> int:
        """Token slots per head `seq`'s block table needs for `tokens` of its tokens (fewer than `tokens`
        for a sequence-parallel prompt: each rank holds its span, `segment_pages.py`)."""
        ...

    def pin_table(self, attention: SparsePrefill, scales: torch.Tensor, version: int) -> None:
        """Pin the head budget table ``scales [L, Hkv]`` (the whole model's) on `attention`: the rows of
        the heads it prefills (rank 0's under TP)."""
        ...

    def compress(self, seq: Sequence, kv: KVCompressionConfig) -> None: ...

    def capacities(self, entropy: torch.Tensor | None, kv: KVCompressionConfig) -> torch.Tensor: ...

    def acquire_row(self, window: int) -> int: ...

    def release_row(self, row: int) -> None: ...

    def share(self, request_id: str, segments: int, names: list[tuple[bytes, int]]) -> None: ...

    def drop(self, request_id: str) -> None: ...

    def close(self) -> None: ...


def finish_prefill(
    call: PrefillCall, attention: PrefillAttention, num_kv_heads: int
) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
    """The entropy and statistics a last chunk returns (what `call` asks for)."""
    entropy = None
    if call.entropy and isinstance(attention, SparsePrefill):
        entropy = attention.head_entropy(num_kv_heads)
    return entropy, (attention.stats() if call.stats else None)


def resumable(snapshot: Any, segments: int) -> Any:
    """A prefix cache entry's policy state (`PrefillState` after ``snapshot.segments`` segments) cut to its
    first `segments` segments: the state a reader resuming at that page continues from."""
    if segments >= snapshot.segments:
        return snapshot
    cut = getattr(snapshot, "truncate", None)
    if cut is not None:
        return cut(segments)
    layers = tuple(
        None
        if ls is None
        else LayerState(
            ls.entropy[:, :segments].clone(),
            None if ls.spread is None else ls.spread[:, :segments].clone(),
            ls.counts[:, :segments].clone(),
        )
        for ls in snapshot.layers
    )
    return dataclasses.replace(snapshot, segments=segments, layers=layers)


class LocalExecutor:
    """One rank: the model calls themselves."""

    size, kv_replicas, shape = 1, 1, (1, 1)

    def __init__(self, engine: Engine, max_context: int) -> None:
        self.engine, self.arch, self.full_arch = engine, engine.arch, engine.arch
        num_pages = pool_pages(engine.arch, engine.config, max_context, engine.device, engine.dtype)
        self.pages = KVPages(engine.arch, num_pages, engine.config.kv_page_size, engine.device, engine.dtype)
        self.obs = ObservationPool(engine.arch, engine.device, engine.dtype)
        self.decoder = PagedDecoder(engine, self.pages, self.obs)  # eager, or CUDA graphs per batch size

    def prefill(
        self,
        call: PrefillCall,
        attention: PrefillAttention,
        observer: PromptObserver | None,
        progress: ProgressFn | None,
        cancel: Any,
    ) -> PrefillResult:
        logits = self.engine.prefill_pages(
            call.tokens, call.start, call.seq_len, self.pages, call.table, attention,
            progress=progress, cancel=cancel, observe=observer, all_logits=call.all_logits,
        )  # fmt: skip
        if logits is None:
            return PrefillResult(None)
        entropy, stats = finish_prefill(call, attention, self.arch.num_kv_heads)
        return PrefillResult(logits, entropy, stats)

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        tables: torch.Tensor,
        lengths: torch.Tensor,
        obs: ObsIndex | None,
        steps_left: int,
        request_ids: list[str] | None = None,
    ) -> torch.Tensor:
        return self.decoder(tokens, positions, tables, lengths, obs, steps_left=steps_left)

    def sequence_parallel(self, seq_len: int, kv: KVCompressionConfig | None, all_logits: bool) -> bool:
        return False

    def held_tokens(self, seq: Sequence, tokens: int) -> int:
        return tokens

    def pin_table(self, attention: SparsePrefill, scales: torch.Tensor, version: int) -> None:
        attention.pin_table(scales, version)

    def compress(self, seq: Sequence, kv: KVCompressionConfig) -> None:
        compress_sequence(self.pages, self.obs, seq, kv, self.arch)

    def capacities(self, entropy: torch.Tensor | None, kv: KVCompressionConfig) -> torch.Tensor:
        return head_capacities(entropy, kv, (self.arch.num_layers, self.arch.num_kv_heads))

    def acquire_row(self, window: int) -> int:
        return self.obs.acquire(window)

    def release_row(self, row: int) -> None:
        self.obs.release(row)

    def share(self, request_id: str, segments: int, names: list[tuple[bytes, int]]) -> None:
        """Nothing to tell: the states are in rank 0's prefix cache."""

    def drop(self, request_id: str) -> None:
        """Nothing to forget: the core's sequence holds the request's state."""

    def close(self) -> None:
        """Nothing to stop."""
