"""The engine core on a tensor (x sequence) parallel group, in lockstep (vLLM's executor / worker split,
no Ray call per step).

Rank 0 runs the `EngineCore` with a `LockstepExecutor`: for every model call (prefill chunk, decode step,
KV compression) it broadcasts a `StepPlan` (`messages.py`: the call's inputs, preceded by what changed in
rank 0's state since the last plan) over a gloo process group, then runs the call on its own heads
(`rank.RankRunner`). Every other rank runs `WorkerLoop.run()`: receive a plan, apply it, until `Shutdown`.

Who decides what: rank 0 alone schedules, keeps the page bookkeeping of every rank (free lists, block
tables with one row per KV head of every rank, prefix cache) and samples: the logits are bitwise the same
on every rank (the lm_head all-gathers), so the other ranks never need the sampled ids except as the next
step's inputs. All ranks agree on the number of pages (the minimum of their `pool_pages`), so a page id
names a slot on every rank. Compression is the one call with a reply: every rank plans its own heads,
the kept counts are all-gathered and rank 0 allocates the new pages and broadcasts them. Rank 0 also
decides which prompts prefill sequence-parallel (`sequence.uses_sequence_parallel`: the call is marked,
and its decode steps then carry the request ids, so each rank finds where their K/V lies).

Failure: a rank that dies closes its sockets, so the next collective fails at once; rank 0 also checks its
worker processes before every plan. Either way every in-flight and later call raises `ShardGroupError`
naming the rank (never a hang); the collectives of the model group have a timeout as well
(`launch.py`). A cancel reaches rank 0 between steps only (one rank cannot leave a layer's collectives).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from entropyinfer.errors import ShardGroupError
from entropyinfer.policies.kv_compression import KVCompressionConfig
from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.attention import PrefillAttention
from entropyinfer.shard.compression import PromptObserver
from entropyinfer.shard.config import ParallelConfig
from entropyinfer.shard.engine import Engine
from entropyinfer.shard.kv_pages import pool_pages
from entropyinfer.shard.paged_decode import ObsIndex
from entropyinfer.shard.parallel.all_to_all import SequenceParallelGroup
from entropyinfer.shard.parallel.executor import PrefillCall, PrefillResult, ProgressFn
from entropyinfer.shard.parallel.group import TensorParallelGroup
from entropyinfer.shard.parallel.messages import (
    Compress,
    Decode,
    Drop,
    Evict,
    ObsAcquire,
    ObsRelease,
    Op,
    Prefill,
    Probe,
    Share,
    Shutdown,
    StepPlan,
    Swap,
    broadcast_plan,
    receive_plan,
)
from entropyinfer.shard.parallel.rank import RankRunner
from entropyinfer.shard.parallel.segment_pages import SegmentPages
from entropyinfer.shard.parallel.sequence import uses_sequence_parallel
from entropyinfer.shard.sequence import Sequence
from entropyinfer.shard.sparse_attention import SparsePrefill

__all__ = ["LockstepExecutor", "ShardGroupError", "WorkerLoop", "agree_on_pages"]

T = TypeVar("T")
LiveCheck = Callable[[], str | None]  # a sentence naming a dead rank, or None while all live


def agree_on_pages(engine: Engine, max_context: int, plan_group: dist.ProcessGroup | None) -> int:
    """The pages every rank can hold: the minimum of the ranks' `pool_pages`."""
    mine = pool_pages(engine.arch, engine.config, max_context, engine.device, engine.dtype)
    n = torch.tensor([mine], dtype=torch.long)
    dist.all_reduce(n, op=dist.ReduceOp.MIN, group=plan_group)
    return int(n)


class LockstepExecutor:
    """Rank 0's executor (`executor.Executor`): each call is broadcast, then run here."""

    def __init__(
        self,
        engine: Engine,
        group: TensorParallelGroup,
        plan_group: dist.ProcessGroup | None,
        full_arch: ModelArch,
        max_context: int,
        live: LiveCheck | None = None,
        on_close: Callable[[bool], None] | None = None,
        sp: SequenceParallelGroup | None = None,
        parallel: ParallelConfig | None = None,
    ) -> None:
        num_pages = agree_on_pages(engine, max_context, plan_group)
        self.parallel = parallel or ParallelConfig(tensor_parallel_size=group.size)
        self.runner = RankRunner(engine, group, plan_group, num_pages, full_arch, sp, self.parallel)
        self._sp_requests: set[str] = set()  # prefilled sequence-parallel: their decode steps name them
        self.pages, self.obs, self.decoder = self.runner.pages, self.runner.obs, self.runner.decoder
        self.full_arch, self.kv_replicas = full_arch, self.runner.kv_replicas
        self.shape = (group.size, 1 if sp is None else sp.size)
        self.size = self.shape[0] * self.shape[1]
        self.plan_group, self.live, self.on_close = plan_group, live, on_close
        self._pending: list[Op] = []
        self.ranks: Any = None  # where the other ranks run (`launch.Ranks`), set by whoever started them
        self.broken: str | None = None
        self.closed = False
        self.pages.on_evict = lambda name: self._pending.append(Evict(name))
        self.pages.on_swap = lambda kind, seq: self._pending.append(
            Swap(seq.request_id, kind == "out", [list(t) for t in seq.block_table])
        )

    # ---------------------------------------------------------------------------------- sending
    def _run(self, op: Op, local: Callable[[], T]) -> T:
        """Broadcast the pending mirrors and `op`, then run `local` (this rank's part of `op`)."""
        self._check()
        plan, self._pending = StepPlan([*self._pending, op]), []
        try:
            broadcast_plan(plan, self.plan_group)
            return local()
        except BaseException as e:  # the ranks are no longer in step: nothing more can run on the group
            dead = self._dead_rank() if isinstance(e, RuntimeError) else None
            collective = isinstance(e, RuntimeError) and (dead is not None or _collective_error(e))
            if self.broken is None:
                self.broken = dead or (
                    f"a collective failed ({e})" if collective else f"rank 0 failed: {e!r}"
                )
            if collective:
                raise ShardGroupError(f"the tensor-parallel group is broken: {self.broken}") from e
            raise

    def _dead_rank(self, wait_s: float = 2.0) -> str | None:
        """After a failed collective: the rank that died (it may take a moment to be seen exiting)."""
        deadline = time.perf_counter() + wait_s
        while self.live is not None:
            dead = self.live()
            if dead is not None or time.perf_counter() > deadline:
                return dead
            time.sleep(0.05)
        return None

    def _check(self) -> None:
        if self.broken is None and self.live is not None:
            self.broken = self.live()
        if self.closed:
            raise ShardGroupError("the tensor-parallel group is closed")
        if self.broken is not None:
            raise ShardGroupError(f"the tensor-parallel group is broken: {self.broken}")

    # ------------------------------------------------------------------------------ model calls
    def prefill(
        self,
        call: PrefillCall,
        attention: PrefillAttention,
        observer: PromptObserver | None,
        progress: ProgressFn | None,
        cancel: Any,
    ) -> PrefillResult:
        n = call.seq_len
        whole = call.first and call.start == 0 and call.tokens.shape[0] == n and call.resume is None
        kv = call.kv if call.obs_row is not None else None
        if whole and self.sequence_parallel(n, kv, call.all_logits):
            call = dataclasses.replace(call, sequence_parallel=True)
            self._sp_requests.add(call.request_id)
        else:
            self._sp_requests.discard(call.request_id)
        return self._run(Prefill(call), lambda: self.runner.prefill(call, attention, observer, progress))

    def sequence_parallel(self, seq_len: int, kv: KVCompressionConfig | None, all_logits: bool) -> bool:
        return self.runner.sp is not None and uses_sequence_parallel(self.parallel, seq_len, kv, all_logits)

    def pin_table(self, attention: SparsePrefill, scales: torch.Tensor, version: int) -> None:
        self.runner.pin_rows(attention, scales, version, split=False)

    def held_tokens(self, seq: Sequence, tokens: int) -> int:
        pages = self.pages
        return pages.held(seq, tokens) if isinstance(pages, SegmentPages) else tokens

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
        rows, slots = obs if obs is not None else (None, None)
        ids = request_ids if request_ids and any(r in self._sp_requests for r in request_ids) else None
        op = Decode(tokens, positions, tables, lengths, rows, slots, steps_left, ids)
        return self._run(
            op, lambda: self.runner.decode(tokens, positions, tables, lengths, obs, steps_left, ids)
        )

    def compress(self, seq: Sequence, kv: KVCompressionConfig) -> None:
        """`compress_sequence` over every rank's heads (see the module docstring)."""
        lengths, caps, pages = seq.kv_lengths, seq.capacities, self.pages
        assert lengths is not None and caps is not None and seq.obs_row is not None
        t0 = _now(pages.device)
        if seq.compressions == 0:
            elem = pages.data.element_size()
            seq.kv_bytes_before = (
                int(lengths.long().sum()) // self.kv_replicas * 2 * self.full_arch.head_dim * elem
            )
        used = pages.used_pages
        table = [list(t) for t in seq.block_table]
        r = self.kv_replicas
        pinned = seq.request.keep_shares  # the learned split of an SP sequence, once the actor has a table
        learned = kv.sp_split == "learned" and seq.request_id in self._sp_requests and seq.compressions == 0
        shares = None
        model_heads = (lengths.shape[0], lengths.shape[1] // r)
        if learned and pinned is not None and pinned.version > 0 and pinned.shape == model_heads:
            shares = torch.from_numpy(pinned.bins).repeat_interleave(r, dim=1)  # model heads -> rows
        op = Compress(seq.request_id, seq.obs_row, seq.decode_steps, kv, lengths, caps, table, shares)

        def allocate(counts: torch.Tensor) -> list[list[int]]:
            pages.free(seq)
            pages.allocate_heads(seq, [pages.pages(int(n)) for n in counts.max(dim=0).values])
            return [list(t) for t in seq.block_table]

        counts, _, hist = self._run(op, lambda: self.runner.compress(op, allocate))
        if hist is not None and seq.compressions == 0:  # rows -> the model's KV heads (replicas agree)
            seq.kept_bins = (hist[0][:, ::r].contiguous(), hist[1][:, ::r].contiguous())
        seq.kv_lengths = counts.to(torch.int32)
        seq.compressions += 1
        seq.last_compression = seq.decode_steps
        seq.stats["kv_pages_freed"] = seq.stats.get("kv_pages_freed", 0) + used - pages.used_pages
        seq.compression_ms += (_now(pages.device) - t0) * 1e3

    def capacities(self, entropy: torch.Tensor | None, kv: KVCompressionConfig) -> torch.Tensor:
        return self.runner.capacities(entropy, kv)

    def probe(self, reset_peak: bool = False) -> list[list[int]]:
        """Per rank: [attention objects, prefix-cache policy states, swapped requests, SP spans] it holds,
        and its peak device memory in bytes (`RankRunner.probe`)."""
        return self._run(Probe(reset_peak), lambda: self.runner.probe(reset_peak))

    def peak_memory(self, reset: bool = False) -> list[int]:
        """Every rank's peak device memory in bytes (global rank order; 0 on the CPU); `reset`: then a new
        peak starts on every rank."""
        return [row[4] for row in self.probe(reset)]

    # -------------------------------------------------------------------------- rank-0 state
    def acquire_row(self, window: int) -> int:
        row = self.obs.acquire(window)
        self._pending.append(ObsAcquire(window, row))
        return row

    def release_row(self, row: int) -> None:
        self.obs.release(row)
        self._pending.append(ObsRelease(row))

    def share(self, request_id: str, segments: int, names: list[tuple[bytes, int]]) -> None:
        self._pending.append(Share(request_id, segments, [n for n, _ in names], [c for _, c in names]))

    def drop(self, request_id: str) -> None:
        self._sp_requests.discard(request_id)
        self.runner.spans.pop(request_id, None)  # rank 0's own; the others drop theirs with the plan
        self._pending.append(Drop(request_id))

    def close(self) -> None:
        """Stop the other ranks (if they still run) and release the group; idempotent."""
        if self.closed:
            return
        try:
            if self.broken is None:
                self._run(Shutdown(), lambda: None)
        except ShardGroupError:
            pass
        finally:
            self.closed = True
            if self.on_close is not None:
                self.on_close(self.broken is None)


class WorkerLoop:
    """A rank > 0: receive plans from rank 0 and run them until `Shutdown` (or rank 0 goes away)."""

    def __init__(
        self,
        engine: Engine,
        group: TensorParallelGroup,
        plan_group: dist.ProcessGroup | None,
        full_arch: ModelArch,
        max_context: int,
        sp: SequenceParallelGroup | None = None,
    ) -> None:
        num_pages = agree_on_pages(engine, max_context, plan_group)
        self.runner = RankRunner(engine, group, plan_group, num_pages, full_arch, sp)
        self.plan_group = plan_group
        self.steps = 0

    def run(self) -> None:
        while True:
            plan = receive_plan(self.plan_group)
            *mirrors, call = plan.ops
            for op in mirrors:
                self.runner.mirror(op)
            if isinstance(call, Shutdown):
                return
            self.execute(call)
            self.steps += 1

    @torch.inference_mode()
    def execute(self, op: Op) -> None:
        r = self.runner
        if isinstance(op, Prefill):
            r.prefill(op.call)
        elif isinstance(op, Decode):
            obs = (op.rows, op.slots) if op.rows is not None and op.slots is not None else None
            r.decode(op.tokens, op.positions, op.tables, op.lengths, obs, op.steps_left, op.request_ids)
        elif isinstance(op, Compress):
            r.compress(op)
        elif isinstance(op, Probe):
            r.probe(op.reset_peak)
        else:
            r.mirror(op)


def _collective_error(e: RuntimeError) -> bool:
    """A failed collective (a peer closed its connection, a timeout), not an error of the model code."""
    text = str(e).lower()
    return isinstance(e, dist.DistError) or any(
        w in text for w in ("gloo", "nccl", "connection", "timed out")
    )


def _now(device: torch.device) -> float:

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
