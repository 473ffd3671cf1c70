"""The scheduler: which sequences a step decodes and which prompt chunks it prefills (nano-vllm's
`Scheduler`, plus chunked prefill, prefix-cache lookup and swap).

Queues: `waiting` (new requests, and sequences preempted by recompute, which go back to its front),
`running` (hold KV pages: prefilling, chunk by chunk, or decoding one token every step), `swapped`
(compressed sequences preempted to host memory). `schedule()` builds one step within a token budget of
`max_num_batched_tokens` (a decode counts one token, a prefill chunk its length):

1. Decode: every running sequence whose prompt is in its pages gets room for its next token
   (`KVPages.grow`). When pages run out, the most recently admitted decoding sequence is preempted (LIFO,
   as vLLM): an uncompressed one by recompute (its pages are freed; it is prefilled again, from the prefix
   cache where its pages are still resident, and replays its generated tokens, so it resumes with the
   same output), a compressed one by swapping its compact pages to host memory (a recompute could not
   rebuild what compression kept).
2. Swapped sequences come back first, oldest first, when their pages fit; while any wait, no new prompt
   is admitted.
3. Prefill chunks of running sequences still prefilling, oldest first, then admission of waiting ones in
   arrival order, within `max_num_seqs` running sequences. Admission looks the prompt up in the prefix
   cache (`shard/prefix_cache.py`): the longest resident prefix of full pages its policy may reuse is
   taken by reference and only the rest is prefilled; if the next page is being written by a running
   sequence (in-flight sharing), the request waits for it. A prompt needs pages for itself plus one
   decode token in every KV head, allocated at admission; a short prompt that does not fit stops
   admission (FIFO among short ones), a long one is skipped.

Chunk sizes: a chunk is what is left of the budget, cut down to a multiple of the sequence's chunk unit
(the sparse segment size, so every chunk starts on a segment boundary; a page for dense), at least one unit
for the step's first prefill. Dense attention over a long prefix costs by its keys, not its tokens: where
every position attends densely (a sparse prompt's last segment, all of a dense prompt; from
`Sequence.dense_from`) a chunk ends on any page and runs at most `max_dense_prefill_pairs` query-key pairs
(`EngineConfig.dense_prefill_pairs`: 16384 per token of the step budget, at least 2^24 = 128 queries over a
128k prefix; at least one page), and a chunk of sparse segments stops where
such a cut part would start, so a 128k document's last segment does not hold every stream for one long
step. A prefill that is alone in its step (no decode, no other chunk) runs the whole rest of its prompt in
one chunk: no stream waits on that step, and one chunk is the fastest prefill.
Policies whose budget rule is not causal (entropy `per_head` / `reference`) and
`enable_chunked_prefill=False` prefill one-shot: only as the step's first prefill when the prompt exceeds
what is left of the budget.

Short interactive requests are not starved by documents: prompts with more than
`long_prefill_token_threshold` tokens left to prefill (after the prefix cache) are "long"; at most
`max_long_partial_prefills` of them prefill at once, and short prompts behind a long one are admitted past
it (in the same step, and whenever the long one waits for pages). With chunked prefill a long prompt takes
only what the running streams leave of each step's budget, so their decode keeps its pace while the
document prefills.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from entropyinfer.shard.config import EngineConfig
from entropyinfer.shard.kv_pages import KVPages
from entropyinfer.shard.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class Chunk:
    """Prompt positions ``[start, end)`` of one sequence to prefill this step."""

    seq: Sequence
    start: int
    end: int


@dataclass
class ScheduledStep:
    decode: list[Sequence] = field(default_factory=list)  # one token each
    prefill: list[Chunk] = field(default_factory=list)  # pages allocated, chunk to run
    preempted: list[Sequence] = field(default_factory=list)  # by recompute (back to waiting) or swap


class Scheduler:
    def __init__(self, config: EngineConfig, pages: KVPages) -> None:
        self.config, self.pages = config, pages
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self.num_preempted = 0  # preemptions so far (recompute and swap)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        self._schedule_decode(step)
        if not step.preempted:
            self._swap_in(step)
        budget = self.config.max_num_batched_tokens - len(step.decode)
        budget = self._continue_prefills(step, budget)
        if not self.swapped:
            self._admit(step, budget)
        return step

    def _schedule_decode(self, step: ScheduledStep) -> None:
        queue = [s for s in self.running if not s.prefilling]
        while queue:
            seq = queue.pop(0)
            while not self.pages.grow(seq):
                victim = queue.pop() if queue else seq  # the newest sequence still unscheduled
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is seq:
                    break
            else:
                step.decode.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.num_preempted += 1
        seq.preemptions += 1
        if seq.compressed:
            self.pages.swap_out(seq)
            seq.status = SequenceStatus.SWAPPED
            self.swapped.append(seq)
        else:
            self.pages.free(seq)
            seq.kv_lengths = None
            seq.decode_steps = 0
            seq.num_computed, seq.attention, seq.observer = 0, None, None
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)

    def _swap_in(self, step: ScheduledStep) -> None:
        while self.swapped and len(self.running) < self.config.max_num_seqs:
            seq = self.swapped[0]
            if not self.pages.swap_in(seq):
                return
            self.swapped.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.pages.grow(seq)  # swap_in left room for one token
            step.decode.append(seq)

    def _chunk(self, seq: Sequence, start: int, budget: int, step: ScheduledStep) -> int:
        """Tokens of `seq`'s prompt from `start` to prefill this step (0: none; see the module docstring)."""
        n = seq.num_prompt_tokens
        first = not step.prefill  # the step's first prefill always makes progress
        if first and not step.decode:  # alone in its step: the whole rest
            return n - start
        unit = seq.chunk_unit if self.config.enable_chunked_prefill else 0
        if unit <= 0:  # one-shot only: as the step's first prefill, or when it fits
            return n - start if first or n - start <= budget else 0
        end = self._align(seq, start, self._dense_cap(seq, start, min(n, start + max(budget, 0))))
        if end > start:
            return end - start
        return self._next_end(seq, start) - start if first else 0

    def _dense_cap(self, seq: Sequence, start: int, end: int) -> int:
        """`end`, cut so that the chunk's dense part (positions >= seq.dense_from; position p reads p + 1
        keys) runs at most `max_dense_prefill_pairs` query-key pairs; a chunk of sparse segments whose dense
        part would be cut stops where that part starts (a piece on top of a full chunk is a slow step)."""
        limit = self.config.dense_prefill_pairs()
        a = max(start, seq.dense_from)
        if limit is None or end <= a:
            return end
        b = 2 * a + 1  # the pairs of positions [a, a + t) are t * (t + b) / 2
        cut = a + (math.isqrt(b * b + 8 * limit) - b) // 2
        if cut >= end:
            return end
        return a if start < a else cut

    def _align(self, seq: Sequence, start: int, end: int) -> int:
        """The last chunk end in ``[start, end]`` the policy allows: the prompt's end, a page past
        `seq.dense_from`, or a multiple of the chunk unit (`start` if none)."""
        if end >= seq.num_prompt_tokens:
            return seq.num_prompt_tokens
        page = end // self.pages.page_size * self.pages.page_size
        if page > seq.dense_from:
            return max(page, start)
        return max(end // seq.chunk_unit * seq.chunk_unit, start)

    def _next_end(self, seq: Sequence, start: int) -> int:
        """The first chunk end after `start` the policy allows (one unit, or one page in the dense tail)."""
        ps, unit = self.pages.page_size, seq.chunk_unit
        page = (max(start, seq.dense_from) // ps + 1) * ps
        return min(seq.num_prompt_tokens, (start // unit + 1) * unit, page)

    def _continue_prefills(self, step: ScheduledStep, budget: int) -> int:
        for seq in self.running:
            if not seq.prefilling:
                continue
            n = self._chunk(seq, seq.num_computed, budget, step)
            if n:
                step.prefill.append(Chunk(seq, seq.num_computed, seq.num_computed + n))
                budget -= n
        return budget

    def cached_prefix(self, seq: Sequence) -> tuple[list[bytes], bool]:
        """The prefix cache entries `seq` may start from, and whether it should wait for a running
        sequence that is writing its next page."""
        cache = self.pages.cache
        if not seq.page_names:
            return [], False
        hit = cache.match(seq.page_names[: seq.cache_limit])
        if seq.resume_unit > 1:  # sparse: resume only on a segment boundary that carries the policy state
            while hit and (len(hit) % seq.resume_unit or cache.entries[hit[-1]].state is None):
                hit.pop()
        nxt = len(hit)
        writer = cache.pending.get(seq.page_names[nxt]) if nxt < seq.cache_limit else None
        return hit, writer is not None and writer != seq.request_id

    def _admit(self, step: ScheduledStep, budget: int) -> None:
        cfg, ps = self.config, self.pages.page_size
        thr = cfg.long_prefill_token_threshold
        long_running = sum(
            1 for s in self.running if s.prefilling and s.num_prompt_tokens - s.num_computed > thr
        )
        for seq in list(self.waiting):
            if len(self.running) >= cfg.max_num_seqs:
                return
            n = seq.num_prompt_tokens
            hit, wait = self.cached_prefix(seq)
            if wait:  # in-flight sharing: the writer's pages will be there in a step or two
                continue
            start = len(hit) * ps
            # long: what is left to prefill (the questions of a cached document are short ones)
            long = n - start > thr
            if long and long_running >= cfg.max_long_partial_prefills:
                continue
            chunk = self._chunk(seq, start, budget, step)
            if chunk == 0:
                if long:
                    continue
                return
            if not self.pages.fits(n + 1, hit, seq):
                if long:
                    continue
                return
            self.pages.allocate(seq, n + 1, hit)
            self.pages.cache.queried_tokens += n
            self.pages.cache.hit_tokens += start
            seq.stats["cached_tokens"] = start
            seq.num_computed = start
            self._claim(seq)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            step.prefill.append(Chunk(seq, start, start + chunk))
            budget -= chunk
            long_running += long

    def _claim(self, seq: Sequence) -> None:
        """Mark the pages `seq` will write and share as pending (in-flight sharing)."""
        cache = self.pages.cache
        for name in seq.page_names[len(seq.cached_names) : seq.share_pages]:
            if name not in cache.entries:
                cache.pending.setdefault(name, seq.request_id)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence from its queue and free its pages at once."""
        for queue in (self.running, self.waiting, self.swapped):
            if seq in queue:
                queue.remove(seq)
        if seq.block_table:
            self.pages.free(seq)
        seq.swapped_kv = None
        seq.status = SequenceStatus.FINISHED
