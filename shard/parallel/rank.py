"""One rank's part of a tensor-parallel engine core: its KV pages, observation pool and decoder, and the
per-request state that lives with its heads (prefill attention objects, prefix-cache policy states,
swapped KV). Rank 0 (`LockstepExecutor`) and the other ranks (`WorkerLoop`) run the same methods on the
same inputs, so they make the same model calls, in the same order, with the same collectives.

Block tables and lengths arrive in the core's layout (one row per KV head of every rank, rank-major); a
rank uses its rows ``local``. Statistics that depend on the heads are gathered: the per-head entropy (KV
compression capacities are solved over every head of the model, as one rank would) and the prefill
statistics (density, rigid fraction and budget tokens: means over equal head counts, so the mean of the
ranks' values; min / max of the ranks').

Sequence parallelism: the SP ranks of one TP rank hold the same heads. A prefill call marked
`sequence_parallel` runs `sequence.sequence_parallel_prefill` (this rank's segment) and records the
request's `Spans` (where its K/V lies here); decode batches naming such requests run the
`SequenceParallelDecoder`, their compression `sp_compress.compress_spans`. Everything else runs alike on
every SP rank (replicas).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from entropyinfer.policies.head_stats import HeadStats
from entropyinfer.policies.kv_compression import KVCompressionConfig, head_capacities, plan_keep
from entropyinfer.policies.segment_split import kept_histogram
from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.attention import PrefillAttention, prompt_attention
from entropyinfer.shard.compression import ObservationPool, PromptObserver
from entropyinfer.shard.config import ParallelConfig
from entropyinfer.shard.engine import Engine
from entropyinfer.shard.head_report import head_stats
from entropyinfer.shard.kv_pages import KVPages
from entropyinfer.shard.paged_decode import ObsIndex, PagedDecoder
from entropyinfer.shard.parallel.all_to_all import SequenceParallelGroup, split_heads
from entropyinfer.shard.parallel.executor import (
    PrefillCall,
    PrefillResult,
    ProgressFn,
    finish_prefill,
    resumable,
)
from entropyinfer.shard.parallel.group import TensorParallelGroup
from entropyinfer.shard.parallel.head_gather import Part, gather_head_stats
from entropyinfer.shard.parallel.heads import head_shard
from entropyinfer.shard.parallel.messages import (
    Compress,
    Drop,
    Evict,
    ObsAcquire,
    ObsRelease,
    Op,
    Share,
    Swap,
    broadcast_object,
)
from entropyinfer.shard.parallel.segment_pages import SegmentPages
from entropyinfer.shard.parallel.sequence import gather_entropy, gather_stats, sequence_parallel_prefill
from entropyinfer.shard.parallel.sp_compress import Kept, Spans, compress_spans, segment_shares
from entropyinfer.shard.parallel.sp_decode import SequenceParallelDecoder
from entropyinfer.shard.sparse_attention import SparsePrefill

Allocate = Callable[[torch.Tensor], list[list[int]]]
_STAT_KEYS = ("density", "rigid_fraction", "rigid_fraction_reference")


class RankRunner:
    def __init__(
        self,
        engine: Engine,
        group: TensorParallelGroup,
        plan_group: dist.ProcessGroup | None,
        num_pages: int,
        full_arch: ModelArch,
        sp: SequenceParallelGroup | None = None,
        parallel: ParallelConfig | None = None,
    ) -> None:
        """`parallel`: rank 0's (it keeps the page bookkeeping: an SP sequence gets one rank's span,
        `segment_pages.py`); the other ranks' pools hold data only."""
        self.engine, self.group, self.plan_group, self.full_arch = engine, group, plan_group, full_arch
        self.sp = sp if sp is not None and sp.size > 1 else None
        arch, tp, r = engine.arch, group.size, group.rank
        self.arch, kvc = arch, arch.num_kv_heads
        self.local = slice(r * kvc, (r + 1) * kvc)
        self.shards = [head_shard(full_arch.num_heads, full_arch.num_kv_heads, tp, i) for i in range(tp)]
        self.kv_replicas = self.shards[0].kv_replicas
        ps, dev, dt = engine.config.kv_page_size, engine.device, engine.dtype
        self.pages: KVPages
        if self.sp is not None and parallel is not None:
            self.pages = SegmentPages(
                arch, num_pages, ps, dev, dt, table_heads=tp * kvc, local=self.local, parallel=parallel
            )
        else:
            self.pages = KVPages(arch, num_pages, ps, dev, dt, table_heads=tp * kvc, local=self.local)
        self.obs = ObservationPool(arch, dev, dt)
        self.decoder = PagedDecoder(engine, self.pages, self.obs)
        self.sp_decoder: SequenceParallelDecoder | None = None  # batches with SP rows
        if self.sp is not None:  # SP ranks: the heads they attend with in an SP prefill, the LSE decoder
            self.split = split_heads(arch.num_heads, arch.num_kv_heads, self.sp.size)
            self.sp_decoder = SequenceParallelDecoder(engine, self.pages, self.obs, self.sp, self.decoder)
        self.attentions: dict[str, PrefillAttention] = {}
        self.snapshots: dict[bytes, tuple[Any, int]] = {}
        self.swapped: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.spans: dict[str, Spans] = {}  # sequence-parallel requests: where their K/V lies (`sp_compress`)

    # --------------------------------------------------------------------------------- collectives
    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's `x` along `dim` in rank order, on the host (over the model's group and device)."""
        return self.group.all_gather(x.to(self.engine.device), dim=dim).cpu()

    # ------------------------------------------------------------------------------------- mirrors
    def mirror(self, op: Op) -> None:
        """Apply what rank 0 did to its own state (the ops before a plan's model call)."""
        if isinstance(op, ObsAcquire):
            row = self.obs.acquire(op.window)
            if row != op.row:
                raise RuntimeError(f"observation row {row} on rank {self.group.rank}, {op.row} on rank 0")
        elif isinstance(op, ObsRelease):
            self.obs.release(op.row)
        elif isinstance(op, Share):
            snapshot = self.attentions[op.request_id].state_at(op.segments)
            for name, count in zip(op.names, op.counts, strict=True):
                self.snapshots[name] = (snapshot, count)
        elif isinstance(op, Evict):
            self.snapshots.pop(op.name, None)
        elif isinstance(op, Drop):
            self.attentions.pop(op.request_id, None)
            self.spans.pop(op.request_id, None)
            self.swapped.pop(op.request_id, None)
        elif isinstance(op, Swap):
            table = op.table[self.local]
            if op.out:
                saved = []
                index = self.pages.page_index(table)  # once, not per layer
                for li in range(self.arch.num_layers):
                    k, v = self.pages.gather_table(index, li)
                    saved.append((k.to("cpu", copy=True), v.to("cpu", copy=True)))
                self.swapped[op.request_id] = saved
            else:
                windex = self.pages.write_index(table)  # once, not per layer
                for li, (k, v) in enumerate(self.swapped.pop(op.request_id)):
                    dev = self.engine.device
                    self.pages.write_table(table, li, k.to(dev), v.to(dev), windex)
        else:
            raise TypeError(f"{type(op).__name__} is not a mirrored op")

    def probe(self, reset_peak: bool = False) -> list[list[int]]:
        """Per rank (global rank order): [attention objects, prefix-cache policy states, swapped requests,
        sequence-parallel spans] held, and the peak device memory in bytes (`torch.cuda.max_memory_allocated`,
        0 on the CPU; `reset_peak`: then a new peak starts)."""
        held = [len(self.attentions), len(self.snapshots), len(self.swapped), len(self.spans)]
        cuda = self.engine.device.type == "cuda"
        held.append(int(torch.cuda.max_memory_allocated(self.engine.device)) if cuda else 0)
        if cuda and reset_peak:
            torch.cuda.reset_peak_memory_stats(self.engine.device)
        every = self.gather(torch.tensor([held]), dim=0)  # [tp, 5]
        if self.sp is not None:
            every = self.sp.all_gather(every.to(self.engine.device)).cpu().reshape(-1, len(held))
        return every.tolist()

    # -------------------------------------------------------------------------------------- prefill
    def prefill(
        self,
        call: PrefillCall,
        attention: PrefillAttention | None = None,
        observer: PromptObserver | None = None,
        progress: ProgressFn | None = None,
    ) -> PrefillResult:
        """One chunk on this rank. Rank 0 passes its sequence's attention object and observer; the other
        ranks build theirs from `call` (a new attention object on the prompt's first chunk). Every
        position's logits (`call.all_logits`, prompt logprobs) are computed on rank 0 only."""
        lead = attention is not None
        if attention is not None:  # rank 0's, built by the engine core
            self._prepare(attention, call)
        else:
            attention = self._attention(call)
            if call.obs_row is not None and call.kv is not None:
                observer = PromptObserver(self.obs, call.obs_row, call.kv)
        dev = self.engine.device
        table = call.table[self.local].to(dev)
        if call.sequence_parallel:
            return self._prefill_sp(call, attention, observer, table, progress)
        self.spans.pop(call.request_id, None)
        logits = self.engine.prefill_pages(
            call.tokens, call.start, call.seq_len, self.pages, table, attention,
            progress=progress, observe=observer, all_logits=call.all_logits and lead,
        )  # fmt: skip
        if logits is None:
            return PrefillResult(None)
        entropy, stats = finish_prefill(call, attention, self.arch.num_kv_heads)
        if call.entropy:
            entropy = self._gather_entropy(entropy)
        if call.stats and stats is not None:
            stats = self._gather_stats(stats)
        return PrefillResult(logits, entropy, stats, self._gather_heads(call, attention, False))

    def _prepare(self, attention: PrefillAttention, call: PrefillCall) -> PrefillAttention:
        """A sparse prefill whose replicas of a KV head decide from the GQA group's block logits
        (`group.mean_over_replicas`), collecting the captured mass when the call reports head statistics;
        returns `attention`."""
        if isinstance(attention, SparsePrefill):
            if self.group.replicas > 1:
                attention.logit_reduce = self.group.mean_over_replicas
                attention.rank_reduce = self.group.max_over_replicas
            attention.collect_mass = attention.collect_mass or call.head_stats
            if call.head_table is not None and call.first:  # the policy actor's table: this rank's rows
                self.pin_rows(attention, *call.head_table, split=call.sequence_parallel)
        return attention

    def pin_rows(self, attention: SparsePrefill, scales: torch.Tensor, version: int, split: bool) -> None:
        """Pin the rows of the whole model's head budget table ``scales [L, Hkv]`` that this rank's heads
        use: its TP rank's KV heads, and in a sequence-parallel prefill its SP rank's part of them."""
        shard = self.shards[self.group.rank]
        rows = scales[:, shard.kv_start : shard.kv_start + shard.kv_count]
        if split and self.sp is not None:
            k0 = self.split.kv_start(self.sp.rank)
            rows = rows[:, k0 : k0 + self.split.kv[self.sp.rank]]
        attention.pin_table(rows.contiguous(), version)

    def _gather_heads(self, call: PrefillCall, attention: PrefillAttention, split: bool) -> HeadStats | None:
        """The whole model's `HeadStats` of a finished sparse prefill (`head_gather.py`; every rank takes
        part, rank 0 reports it); `split`: a sequence-parallel prefill (the SP ranks hold parts of the
        heads). None unless `call.head_stats`."""
        if not call.head_stats or not isinstance(attention, SparsePrefill):
            return None
        dev, hkv, tp = self.engine.device, self.arch.num_kv_heads, self.group.size
        parts = []
        if split and self.sp is not None:
            sp = self.sp
            parts.append(Part(lambda x: sp.all_gather(x.to(dev)).cpu(), self.split.kv, (True,) * sp.size))
        keep = tuple(i % self.kv_replicas == 0 for i in range(tp))  # one replica of each KV head
        parts.append(Part(lambda x: self.group.all_gather(x[None].to(dev), dim=0).cpu(), (hkv,) * tp, keep))
        local_kv = self.split.kv[self.sp.rank] if split and self.sp is not None else hkv
        local = head_stats(attention, "", self.arch.num_layers, local_kv)
        cfg = attention.layer_config or attention.config
        nseg = -(-call.seq_len // cfg.segment_size)
        return gather_head_stats(local, self.arch.num_layers, local_kv, nseg, parts)

    def _prefill_sp(
        self,
        call: PrefillCall,
        attention: PrefillAttention,
        observer: PromptObserver | None,
        table: torch.Tensor,
        progress: ProgressFn | None,
    ) -> PrefillResult:
        """A whole prompt split over the SP ranks (`sequence.py`); entropy and statistics over every head."""
        if self.sp is None or call.start != 0 or call.tokens.shape[0] != call.seq_len:
            raise RuntimeError("a sequence-parallel prefill needs SP ranks and the whole prompt in one call")
        n = call.seq_len
        observed = min(call.kv.prompt_queries, n) if observer is not None and call.kv is not None else 0
        logits = sequence_parallel_prefill(
            self.engine, self.sp, self.split, call.tokens, self.pages, table, attention, progress,
            observer, observed,
        )  # fmt: skip
        self.spans[call.request_id] = Spans.segments(
            n, self.sp.size, self.arch.num_layers, self.arch.num_kv_heads
        )
        entropy = stats = None
        if call.entropy:
            dev = self.engine.device
            entropy = self._gather_entropy(
                gather_entropy(self.sp, self.split, attention, self.arch.num_layers, dev)
            )
        if call.stats:
            stats = self._gather_stats(
                gather_stats(self.sp, self.split, attention.stats(), self.engine.device)
            )
        if stats is not None:
            stats["sequence_parallel_size"] = self.sp.size
        return PrefillResult(logits, entropy, stats, self._gather_heads(call, attention, True))

    def _attention(self, call: PrefillCall) -> PrefillAttention:
        if not call.first:
            return self.attentions[call.request_id]
        attention = self._prepare(
            prompt_attention(call.policy, call.sparse, self.arch.num_layers, call.seq_len), call
        )
        if call.resume is not None:
            snapshot, segments = self.snapshots[call.resume[0]]
            attention.resume(resumable(snapshot, segments))
        self.attentions[call.request_id] = attention
        return attention

    def _gather_entropy(self, entropy: torch.Tensor | None) -> torch.Tensor | None:
        """float32 ``[L, Hkv]`` of the whole model (one replica of each KV head), None if not profiled."""
        layers, kvc = self.arch.num_layers, self.arch.num_kv_heads
        mine = torch.full((layers, kvc), math.nan)
        if entropy is not None:
            mine[: entropy.shape[0]] = entropy[:layers].float()
        every = self.gather(mine[None], dim=0)  # [tp, L, kvc]
        if entropy is None:
            return None
        firsts = [i for i, s in enumerate(self.shards) if i % s.kv_replicas == 0]
        return torch.cat([every[i] for i in firsts], dim=1)

    def _gather_stats(self, stats: dict[str, Any]) -> dict[str, Any]:
        budget = stats.get("budget_tokens") or {}
        per_layer = [math.nan if v is None else v for v in stats.get("rigid_fraction_per_layer", [])]
        values = [stats.get(k, math.nan) for k in _STAT_KEYS]
        values += [budget.get(k, math.nan) for k in ("mean", "min", "max")] + per_layer
        every = self.gather(torch.tensor([values], dtype=torch.float64), dim=0)  # [tp, n]
        out = dict(stats)
        for i, key in enumerate(_STAT_KEYS):
            if key in stats:
                out[key] = float(every[:, i].mean())
        if "density" in stats and self.group.size > 1:  # each rank's heads' work: the straggler shows here
            out["density_per_tp_rank"] = [round(float(x), 4) for x in every[:, 0]]
        if budget:
            col = len(_STAT_KEYS)
            out["budget_tokens"] = {
                **budget,
                "mean": float(every[:, col].mean()),
                "min": int(every[:, col + 1].min()),
                "max": int(every[:, col + 2].max()),
            }
        if per_layer:
            rigid = every[:, len(_STAT_KEYS) + 3 :].mean(dim=0).tolist()
            out["rigid_fraction_per_layer"] = [None if math.isnan(v) else v for v in rigid]
        return out

    def capacities(self, entropy: torch.Tensor | None, kv: KVCompressionConfig) -> torch.Tensor:
        """int64 ``[L, rows]``: `head_capacities` over the model's KV heads, laid out per rank's heads."""
        full = head_capacities(entropy, kv, (self.full_arch.num_layers, self.full_arch.num_kv_heads))
        return torch.cat([full[:, s.kv_start : s.kv_start + s.kv_count] for s in self.shards], dim=1)

    # --------------------------------------------------------------------------------------- decode
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
        """One step; `request_ids`: the rows' requests when some prefilled sequence-parallel (else None)."""
        dev = self.engine.device
        local = (tables[:, self.local].to(dev).contiguous(), lengths[:, :, self.local].to(dev).contiguous())
        index = None if obs is None else (obs[0].to(dev), obs[1].to(dev))
        args = (tokens.to(dev), positions.to(dev), *local, index)
        spans = [self.spans.get(r) for r in request_ids or []]
        if any(s is not None for s in spans):
            if self.sp_decoder is None or self.sp is None:
                raise RuntimeError("a sequence-parallel row reached a rank without SP ranks")
            layers, hkv = self.arch.num_layers, self.arch.num_kv_heads
            start = torch.zeros(layers, len(spans), hkv, dtype=torch.long)
            count = torch.zeros(layers, len(spans), hkv, dtype=torch.long)
            for b, s in enumerate(spans):
                if s is not None:
                    start[:, b], count[:, b] = s.starts[self.sp.rank], s.counts[self.sp.rank]
            is_sp = torch.tensor([s is not None for s in spans], device=dev)
            return self.sp_decoder.forward(*args, is_sp, start.to(dev), count.to(dev))
        return self.decoder(*args, steps_left=steps_left)

    # ------------------------------------------------------------------------------------- compress
    def _group_queries(self, q: torch.Tensor) -> torch.Tensor:
        """With replicated KV heads: the observation queries of every query head of this rank's KV head
        (its replicas' queries, in head order), ``[G, W, d]``."""
        every = self.group.all_gather(q, dim=0)  # [tp * Hq_local, W, d]
        first = self.group.rank // self.kv_replicas * self.kv_replicas
        hq = q.shape[0]
        return every[first * hq : (first + self.kv_replicas) * hq]

    @torch.inference_mode()
    def compress(
        self, op: Compress, allocate: Allocate | None = None
    ) -> tuple[torch.Tensor, list[list[int]], Kept | None]:
        """Keep each of this rank's heads' top positions (`compress_sequence`'s plan; an SP sequence:
        `compress_spans`, by the learned split when `op.shares` is given), all-gather the counts, get the
        new pages (rank 0: `allocate(counts)`; the others: its broadcast) and write what was kept there.
        -> (int32 counts ``[L, rows]``, the new table, the exact plans' `kept_histogram` ``[L, rows, B]``,
        ``[L, rows]`` (None after a learned split))."""
        arch, kv = self.arch, op.kv
        hkv, g, d = arch.num_kv_heads, arch.group_size, arch.head_dim
        lengths, caps = op.lengths[:, self.local], op.capacities[:, self.local]
        slots = int(torch.minimum(op.capacities, op.lengths.long()).max())  # as one rank: over every head
        table = op.table[self.local]
        dev = self.engine.device
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        counts: list[torch.Tensor] = []
        hists: list[Kept] = []
        hist: Kept | None = None
        spans = self.spans.get(op.request_id)
        if spans is not None and self.sp is not None:  # each SP rank its share of one rank's plan
            shares = None
            if op.shares is not None:
                shares = segment_shares(spans, lengths, kv.window, op.shares[:, self.local])
            kept, total, self.spans[op.request_id], hist = compress_spans(
                self.sp, self.pages, self.obs, spans, table, lengths, caps, slots, op.obs_row,
                op.decode_steps, kv, g, shares,
            )  # fmt: skip
            counts = list(total)
        index = self.pages.page_index(table) if spans is None else None  # once, not per layer
        for li in range(arch.num_layers if spans is None else 0):
            assert index is not None
            keys, values = self.pages.gather_table(index, li)
            q_obs = self.obs.ordered(op.obs_row, li, op.decode_steps, kv.window)  # [Hq_local, W, d]
            if self.kv_replicas > 1:  # score with the whole GQA group's queries, as one rank would
                q_obs, g = self._group_queries(q_obs), self.full_arch.group_size
            q_obs = q_obs.reshape(hkv, g, kv.window, d)
            length = lengths[li].to(dev)
            plan = plan_keep(q_obs, keys, length, caps[li].to(dev), kv, slots)
            idx = plan.indices[..., None].expand(-1, -1, d)
            kept.append((keys.gather(1, idx), values.gather(1, idx)))
            counts.append(plan.counts.cpu())
            hists.append(kept_histogram(plan.indices, plan.counts, length, kv.window))
        if hists:
            hist = (torch.stack([h for h, _ in hists]), torch.stack([w for _, w in hists]))
        every = self.gather(torch.stack(counts).to(torch.int32), dim=1)  # [L, rows]
        if hist is not None:  # every rank agrees: the same op, the same split
            hist = (self.gather(hist[0], dim=1), self.gather(hist[1], dim=1))
        new_table = allocate(every) if allocate is not None else None
        new_table = broadcast_object(new_table, self.plan_group)
        windex = self.pages.write_index(new_table[self.local])  # once, not per layer
        for li, (k, v) in enumerate(kept):
            self.pages.write_table(new_table[self.local], li, k, v, windex)
        return every, new_table, hist
