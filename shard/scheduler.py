"""The scheduler: which sequences a step decodes and which it prefills (nano-vllm's `Scheduler`, plus swap).

Queues: `waiting` (new requests, and sequences preempted by recompute, which go back to its front),
`running` (hold KV pages, decode one token every step), `swapped` (compressed sequences preempted to host
memory). `schedule()` builds one step:

1. Decode: every running sequence gets room for its next token (`KVPages.grow`). When pages run out, the
   most recently admitted running sequence is preempted (LIFO, as vLLM): an uncompressed one by
   recompute (its pages are freed; it is prefilled again and replays its generated tokens, so it resumes
   with the same output), a compressed one by swapping its compact pages to host memory (a recompute could
   not rebuild what compression kept).
2. Swapped sequences come back first, oldest first, when their pages fit; while any wait, no new prompt
   is admitted.
3. Prefill admission, in arrival order, within `max_num_seqs` running sequences and a token budget of
   `max_num_batched_tokens` per step (a decode counts one token; a prompt longer than what is left runs
   only as the step's first prefill, since prefill is one-shot per prompt). A prompt needs pages for
   itself plus one decode token in every KV head; a short prompt that does not fit stops admission (FIFO
   among short ones), a long one is skipped.

Short interactive requests are not starved by documents: prompts longer than
`long_prefill_token_threshold` are "long"; at most `max_long_partial_prefills` of them start per step, and
short prompts behind a long one are admitted past it (in the same step, and whenever the long one waits
for pages). A long prompt waits while short ones keep memory full (documented trade-off; chunked prefill
and a reserve for the oldest waiting document are the next steps).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from entropyinfer.shard.config import EngineConfig
from entropyinfer.shard.kv_pages import KVPages
from entropyinfer.shard.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledStep:
    decode: list[Sequence] = field(default_factory=list)  # one token each
    prefill: list[Sequence] = field(default_factory=list)  # pages allocated, prompt to run
    preempted: list[Sequence] = field(default_factory=list)  # by recompute (back to waiting) or swap

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


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
        if not self.swapped:
            self._admit(step)
        return step

    def _schedule_decode(self, step: ScheduledStep) -> None:
        queue = list(self.running)
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

    def _admit(self, step: ScheduledStep) -> None:
        cfg = self.config
        budget = cfg.max_num_batched_tokens - len(step.decode)
        long_started = 0
        for seq in list(self.waiting):
            if len(self.running) >= cfg.max_num_seqs:
                return
            n = seq.num_prompt_tokens
            long = n > cfg.long_prefill_token_threshold
            if long and long_started >= cfg.max_long_partial_prefills:
                continue
            if n > budget and step.prefill:
                if long:
                    continue
                return
            if self.pages.free_pages < self.pages.pages(n + 1):
                if long:
                    continue
                return
            self.pages.allocate(seq, n + 1)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            step.prefill.append(seq)
            budget -= n
            long_started += long

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence from its queue and free its pages at once."""
        for queue in (self.running, self.waiting, self.swapped):
            if seq in queue:
                queue.remove(seq)
        if seq.block_table:
            self.pages.free(seq)
        seq.swapped_kv = None
        seq.status = SequenceStatus.FINISHED
