"""The engine core: requests in, one step at a time, typed events out (nano-vllm's `LLMEngine.step`).

    core = EngineCore(engine, tokenizer, eos_ids, max_context)
    core.add_request(SequenceRequest(...))        # queued; fails at once only if it can never fit
    while core.has_unfinished():
        for event in core.step():                 # TokenDelta ... Finished
            ...
    core.abort(request_id)                        # frees its pages at once

A step (1) ends cancelled sequences, (2) compresses the running sequences whose compression is due
(latent after N_D decode steps, SnapKV right after prefill, then every R steps), so the pages they free
serve this very step, (3) asks the `Scheduler` what to run, (4) decodes one token for every scheduled
running sequence in one batched forward over paged KV (`shard/paged_decode.py: PagedDecoder`, CUDA graphs
per padded batch size on GPU; each sequence at its own position, with its own lengths per (layer, KV
head)), and (5) runs the scheduled prefill chunks, each
through every layer straight into the sequence's pages (`Engine.prefill_pages`) with its own policy's
attention object, which carries the policy's per-layer state from one chunk to the next. A prompt whose
first pages are in the prefix cache (`shard/prefix_cache.py`) starts after them, from the causal policy
state stored with the last one (sparse); the pages each chunk completes are shared at once, so requests
that arrive while a document prefills wait for its pages instead of prefilling it again. Every sequence
keeps its own policy, sparse settings, compression schedule and observation window, sampling parameters
and stop rules.

The core never calls the model itself: prefill chunks, decode steps, compression and observation rows go
through its executor (`shard/parallel/executor.py`): `LocalExecutor` runs them on this rank;
`shard/parallel/lockstep.py: LockstepExecutor` is rank 0 of a tensor-parallel group, which sends each call
to the other ranks first, so they run it in lockstep. The scheduler, page bookkeeping (of every rank's KV
heads), prefix cache and sampling live here, on rank 0 only. Beside it: `shard/prefix_sharing.py` (what a
prompt takes from and gives to the prefix cache), `shard/sequence_stats.py` (what a finished sequence
reports).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from entropyinfer.errors import PromptTooLongError, RequestCancelled
from entropyinfer.policies.kv_compression import KVCompressionConfig
from entropyinfer.shard.attention import PrefillAttention, prompt_attention
from entropyinfer.shard.compression import PromptObserver, compression_due
from entropyinfer.shard.decode_overlap import InFlight, ReadBack, deferrable, feeds_from
from entropyinfer.shard.devices import synced_now
from entropyinfer.shard.engine import Engine
from entropyinfer.shard.head_report import StatsSinks, pinned_head_table
from entropyinfer.shard.parallel.executor import Executor, LocalExecutor, PrefillCall, resumable
from entropyinfer.shard.prefix_sharing import plan_chunks, share_chunk
from entropyinfer.shard.sampling import TokenLogprobs, logprobs_of, make_generator, sample
from entropyinfer.shard.scheduler import Chunk, Scheduler
from entropyinfer.shard.sequence import RequestOutput, Sequence, SequenceRequest
from entropyinfer.shard.sequence_stats import fill_stats
from entropyinfer.shard.sparse_attention import SparsePrefill
from entropyinfer.shard.step_inputs import StepInputs


@dataclass(frozen=True)
class TokenDelta:
    """A sampled token and the text it adds (may be "" while text is held back); logprobs: its own
    and the top-k alternatives' when the request asks (`SamplingParams.logprobs`)."""

    request_id: str
    token_id: int
    text: str
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class Finished:
    """The request is over (finish_reason "stop", "length" or "cancelled"); its pages are free."""

    request_id: str
    output: RequestOutput


EngineEvent = TokenDelta | Finished


class EngineCore:
    def __init__(
        self,
        engine: Engine,
        tokenizer: object,
        eos_token_ids: set[int],
        max_context: int,
        executor: Executor | None = None,
    ) -> None:
        self.engine, self.tokenizer, self.eos_token_ids = engine, tokenizer, eos_token_ids
        self.arch, self.config, self.max_context = engine.arch, engine.config, max_context
        self.device, self.dtype = engine.device, engine.dtype
        self.executor: Executor = executor or LocalExecutor(engine, max_context)
        self.full_arch = self.executor.full_arch  # the whole model (capacities, statistics)
        self.pages, self.obs = self.executor.pages, self.executor.obs
        self.decoder = self.executor.decoder  # eager, or CUDA graphs per batch size
        # one rank holds every head of every prompt: no TP group and no SP group. Otherwise the policy actor's
        # table goes to every rank with the first chunk (each pins its heads' rows) and the head statistics
        # come back gathered from every rank (`shard/parallel/head_gather.py`)
        self.single_rank = self.executor.shape == (1, 1)
        self.scheduler = Scheduler(self.config, self.pages)
        self.inputs = StepInputs(self.device)  # one host-to-device copy per decode step
        # overlapped decode (`shard/decode_overlap.py`): the step whose tokens are still on the device
        # (not with several ranks: sending a step's plan to them reads its inputs back, which waits for the
        # step in flight, so nothing would overlap)
        self.overlap = self.config.overlaps_decode(self.device.type) and self.executor.size == 1
        self._flight: InFlight | None = None
        self._read_backs = ReadBack()
        self._landed_at = 0.0  # when the last decode step's tokens were read back
        self.overlapped_steps = 0  # decode steps launched before the previous one was read back
        self.seqs: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self.sinks = StatsSinks()  # the policy actor's hooks (`shard/head_report.py`); none by default

    # --------------------------------------------------------------------------------------- requests
    def add_request(self, request: SequenceRequest) -> None:
        """Queue a request. Raises `PromptTooLongError` if it exceeds the context or could never get the KV
        pages it needs (then nothing is queued)."""
        if request.request_id in self.seqs:
            raise ValueError(f"request id {request.request_id!r} is already running")
        n, max_tokens = len(request.prompt_ids), request.params.max_tokens
        if n + max_tokens > self.max_context:
            raise PromptTooLongError(
                f"the prompt has {n} tokens; with max_tokens={max_tokens} that exceeds the model's context "
                f"of {self.max_context} tokens: shorten the prompt or lower max_tokens"
            )
        stop_ids = set(request.params.stop_token_ids)
        if not request.params.ignore_eos:
            stop_ids |= self.eos_token_ids
        generator = make_generator(request.params, self.device)
        seq = Sequence(request, self.tokenizer, stop_ids, generator, next(self._arrivals))
        peak = _peak_tokens(n, max_tokens, request.kv, self.full_arch.num_kv_heads)
        need = self.pages.pages(self.executor.held_tokens(seq, peak))  # an SP prompt: one rank's span
        if need > self.pages.num_pages:
            raise PromptTooLongError(
                f"the request needs {need} KV pages of {self.pages.page_size} tokens ({n} prompt tokens, "
                f"max_tokens={max_tokens}) but the pool has {self.pages.num_pages}: shorten it, lower "
                "max_tokens, or give the engine more pages (num_kv_pages / gpu_memory_utilization)"
            )
        self._plan_prefill(seq)
        self.seqs[request.request_id] = seq
        self.scheduler.add(seq)

    def _new_attention(self, seq: Sequence) -> PrefillAttention:
        req = seq.request
        attention = prompt_attention(req.policy, req.sparse, self.arch.num_layers, seq.num_prompt_tokens)
        if isinstance(attention, SparsePrefill):
            table, shape = req.head_budgets, (self.full_arch.num_layers, self.full_arch.num_kv_heads)
            if table is not None and table.version and table.shape == shape:  # every rank: its heads' rows
                self.executor.pin_table(attention, torch.from_numpy(table.scales), table.version)
            attention.collect_mass = self.sinks.heads is not None
        return attention

    def _plan_prefill(self, seq: Sequence) -> None:
        """How `seq` may prefill: one-shot, or in chunks with what it may take from and give to the prefix
        cache (`shard/prefix_sharing.py`, and the scheduler's docstring)."""
        req, n = seq.request, seq.num_prompt_tokens
        attention = self._new_attention(seq)
        seq.attention = attention
        if not attention.chunkable or req.params.prompt_logprobs is not None:
            return  # a non-causal budget rule, or every prompt position's logits: one-shot, no prefix cache
        if self.executor.sequence_parallel(n, req.kv if req.params.max_tokens > 1 else None, False):
            return  # split over the sequence-parallel ranks: one-shot, no prefix cache
        plan_chunks(seq, attention, self.pages.page_size, self.config.enable_prefix_caching)

    def abort(self, request_id: str) -> Finished | None:
        """End a request now (its pages go back to the pool); its `Finished` event, or None if unknown."""
        seq = self.seqs.get(request_id)
        return None if seq is None else self._finish(seq, "cancelled")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------------------------------- step
    def step(self) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        for seq in list(self.seqs.values()):
            if seq.cancelled():
                events.append(self._finish(seq, "cancelled"))
        for seq in list(self.scheduler.running):
            kv = seq.request.kv
            if kv is not None and seq.obs_row is not None and compression_due(seq, kv):
                self.executor.compress(seq, kv)
                kept, seq.kept_bins = seq.kept_bins, None  # reported at most once
                self.sinks.report_kept(seq.request_id, kept)
                if kv.recompress_every <= 0:
                    self._release_window(seq)
        scheduled = self.scheduler.schedule()
        decode = scheduled.decode
        if self._flight is not None and not feeds_from(self._flight, decode):
            events += self._land()  # a cancel or preemption changed the batch: read the step back first
            decode = [s for s in decode if not s.finished]
        if decode:
            events += self._decode(decode)
        for chunk in scheduled.prefill:
            if chunk.seq.finished:  # preempted, admitted again, then stopped at the token that landed since
                continue
            events += self._prefill(chunk)
        return events

    @torch.inference_mode()
    def _prefill(self, chunk: Chunk) -> list[EngineEvent]:
        seq, start, end = chunk.seq, chunk.start, chunk.end
        req, n = seq.request, seq.num_prompt_tokens
        if seq.attention is None:  # a recompute after preemption starts afresh
            seq.attention = self._new_attention(seq)
        attention, first, resume = seq.attention, seq.prefill_started is None, None
        if first:  # the prompt's first chunk
            seq.prefill_started = synced_now(self.device)
            stored = self.pages.cache.entries[seq.cached_names[-1]].state if start else None
            if stored is not None:  # a sparse prefix from the cache: continue its causal policy state
                snapshot, segments = stored
                attention.resume(resumable(snapshot, segments))
                resume = (seq.cached_names[-1], segments)
        if req.kv is not None and req.params.max_tokens > 1 and seq.observer is None:
            if seq.obs_row is None:
                seq.obs_row = self.executor.acquire_row(req.kv.window)
            seq.observer = PromptObserver(self.obs, seq.obs_row, req.kv)
        call = PrefillCall(
            seq.request_id, torch.tensor(seq.prompt_ids[start:end], dtype=torch.long), start, n,
            self.pages.device_table(seq).long(), req.policy, req.sparse, first, resume,
            seq.obs_row if seq.observer is not None else None, req.kv,
            entropy=req.kv is not None, stats=not seq.output_ids,
            all_logits=req.params.prompt_logprobs is not None,
            head_stats=self.sinks.heads is not None and not self.single_rank,
            head_table=pinned_head_table(attention, req) if first and not self.single_rank else None,
        )  # fmt: skip
        # a cancel is seen between the layers of one rank only; with several it waits for the next step
        cancel = req.cancel if self.executor.size == 1 else None
        try:
            result = self.executor.prefill(call, attention, seq.observer, req.progress, cancel)
        except RequestCancelled:
            return [self._finish(seq, "cancelled")]
        logits = result.logits
        seq.num_computed = end
        assert seq.kv_lengths is not None
        seq.kv_lengths.fill_(end)
        seq.stats["prefill_chunks"] = seq.stats.get("prefill_chunks", 0) + 1
        self._share(seq, end)
        if logits is None:
            return []
        if logits.dim() == 2:  # every position's (prompt logprobs): row i predicts prompt token i + 1
            k, targets = req.params.prompt_logprobs or 0, torch.tensor(seq.prompt_ids[1:])
            seq.prompt_logprobs = [None, *logprobs_of(logits[:-1], targets, k)]
            logits = logits[-1]
        prefill_s = synced_now(self.device) - (seq.prefill_started or 0.0)
        seq.prefill_started, seq.observer = None, None
        if req.kv is not None:
            seq.capacities = self.executor.capacities(result.entropy, req.kv)
        if seq.output_ids:  # a recompute after preemption: the outputs so far are replayed by decode
            return []
        token = sample(logits, req.params, seq.generator)
        seq.stats["prefill_ms"] = prefill_s * 1e3
        seq.stats.update(result.stats or {})
        if isinstance(attention, SparsePrefill):
            seq.stats["head_table_version"] = attention.table_version
            shape = (self.arch.num_layers, self.arch.num_kv_heads) if self.single_rank else None
            self.sinks.report_heads(seq.request_id, attention, result.heads, shape)
        return self._emit(seq, token, logits)

    def _share(self, seq: Sequence, end: int) -> None:
        """Share the pages this chunk completed (`prefix_sharing.share_chunk`)."""
        last, shared = share_chunk(seq, end, self.pages)
        if shared:  # the other ranks keep their own heads' policy state under the same names
            self.executor.share(seq.request_id, last, shared)

    @torch.inference_mode()
    def _decode(self, seqs: list[Sequence]) -> list[EngineEvent]:
        fed = feeds_from(self._flight, seqs)  # inputs from the step in flight, on the device
        t0 = time.perf_counter() if fed else synced_now(self.device)
        # the step's inputs and block-table changes go to the device in one copy (`shard/step_inputs.py`)
        inputs = self.inputs
        inputs.begin()
        inputs.longs([0] * fed + [s.next_input for s in seqs[fed:]])
        inputs.longs([s.position for s in seqs])
        inputs.stack([s.kv_lengths for s in seqs if s.kv_lengths is not None], dim=1)
        windows = any(s.obs_row is not None for s in seqs)
        if windows:
            scratch = self.obs.scratch_row
            inputs.longs([s.obs_row if s.obs_row is not None else scratch for s in seqs])
            inputs.longs(
                [
                    s.decode_steps % s.request.kv.window if s.obs_row is not None and s.request.kv else 0
                    for s in seqs
                ]
            )
        tables = self.pages.batch_tables(seqs, inputs)
        views = inputs.upload()
        tokens, positions, lengths = views[:3]
        if fed:
            assert self._flight is not None
            tokens[:fed].copy_(self._flight.tokens)
        index = (views[3], views[4]) if windows else None
        steps_left = max(s.params.max_tokens - len(s.output_ids) for s in seqs)
        ids = [s.request_id for s in seqs]
        logits = self.executor.decode(tokens, positions, tables, lengths, index, steps_left, ids)
        replays = [s.replaying for s in seqs]
        # the step in flight lands after this one is launched: a sequence that stops there had one more
        # token computed here, which is dropped and not counted (KV lengths and stats as the synchronous core)
        if self.overlap and deferrable(seqs, fed):  # read back while the next step runs
            events = self._land()
            self._advance(seqs)
            self._flight = self._read_backs.start(seqs, logits.argmax(-1), t0)
            self.overlapped_steps += fed > 0
            return events
        events = self._land()
        self._advance(seqs)
        greedy = logits.argmax(-1).tolist()
        elapsed = self._read_back(t0)
        for i, s in enumerate(seqs):
            if replays[i] or s.finished:  # a replayed token; or it stopped at the token in flight
                continue
            s.decoded_tokens += 1
            s.decode_seconds += elapsed
            token = greedy[i] if s.params.greedy else sample(logits[i], s.params, s.generator)
            events += self._emit(s, token, logits[i])
        return events

    @staticmethod
    def _advance(seqs: list[Sequence]) -> None:
        """The decode step of `seqs` ran: one more KV entry each (not those finished since it launched)."""
        for s in seqs:
            if not s.finished:
                assert s.kv_lengths is not None
                s.kv_lengths += 1
                s.decode_steps += 1

    def _land(self) -> list[EngineEvent]:
        """Read the step in flight back (if any) and emit its tokens."""
        flight, self._flight = self._flight, None
        if flight is None:
            return []
        greedy = flight.ids()
        elapsed = self._read_back(flight.started)
        events: list[EngineEvent] = []
        for s, token in zip(flight.seqs, greedy, strict=True):
            if s.finished:  # cancelled or aborted since: its token is dropped
                continue
            s.decoded_tokens += 1
            s.decode_seconds += elapsed
            events += self._emit(s, token, None)
        return events

    def _read_back(self, started: float) -> float:
        """Seconds a decode step's tokens took: since its launch began, or, when it was launched before the
        previous step was read back, since that read-back: the time between tokens, which in a step that also
        ran prefill chunks includes them (the synchronous path reads its tokens back before the chunks)."""
        now = time.perf_counter()
        elapsed, self._landed_at = now - max(started, self._landed_at), now
        return elapsed

    def _emit(self, seq: Sequence, token: int, logits: torch.Tensor | None) -> list[EngineEvent]:
        """The events of a sampled token (`logits`: its row, fp32 [vocab], for the logprobs asked)."""
        lp = None
        if seq.logprobs is not None:
            assert logits is not None
            lp = logprobs_of(logits[None], torch.tensor([token]), seq.params.logprobs or 0)[0]
            seq.logprobs.append(lp)
        events: list[EngineEvent] = [TokenDelta(seq.request_id, token, seq.append(token), lp)]
        if seq.finish_reason is not None:
            events.append(self._finish(seq, seq.finish_reason))
        return events

    # ----------------------------------------------------------------------------------------- finish
    def _release_window(self, seq: Sequence) -> None:
        if seq.obs_row is not None:
            self.executor.release_row(seq.obs_row)
            seq.obs_row = None

    def _finish(self, seq: Sequence, reason: str) -> Finished:
        seq.finish_reason = reason
        if reason == "cancelled":
            seq.text = seq.text[: seq.emitted]
        fill_stats(seq, self.full_arch, self.executor.kv_replicas, self.pages.data.element_size())
        self.scheduler.finish(seq)
        self._release_window(seq)
        self.executor.drop(seq.request_id)
        self.seqs.pop(seq.request_id, None)
        return Finished(seq.request_id, seq.output())

    # ------------------------------------------------------------------------------------------ stats
    def counts(self) -> dict[str, int | float]:
        """Sequences per queue and KV pages in use (for health checks and /metrics)."""
        s = self.scheduler
        return {
            "running": len(s.running),
            "waiting": len(s.waiting),
            "swapped": len(s.swapped),
            "preempted": s.num_preempted,
            "kv_pages_used": self.pages.used_pages,
            "kv_pages_total": self.pages.num_pages,
            "prefix_cache_pages": len(self.pages.cache.entries),
            "prefix_cache_queries": self.pages.cache.queried_tokens,
            "prefix_cache_hits": self.pages.cache.hit_tokens,
            "prefix_cache_hit_rate": self.pages.cache.hit_rate,
        }


def _peak_tokens(n: int, max_tokens: int, kv: KVCompressionConfig | None, num_kv_heads: int) -> int:
    """The most tokens one KV head of a request can hold at once (what must fit the pool)."""
    if kv is None:
        return n + max_tokens
    largest_head = kv.min_head_capacity + num_kv_heads * (kv.capacity - kv.min_head_capacity)
    cap = kv.capacity if kv.head_capacity == "uniform" else largest_head
    before = min(n + max_tokens, n + kv.compress_after + 1)
    return max(before, min(n, cap) + max_tokens)
