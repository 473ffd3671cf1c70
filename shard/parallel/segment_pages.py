"""Rank 0's page bookkeeping on a sequence-parallel group: a sequence that prefills split over the SP ranks
gets the pages of one rank's span, not of the whole prompt (the point of SP for 1M-token prompts).

Every SP rank writes its segment at local positions ``0 .. S`` of the sequence's block table (``S = ceil(n /
sp)``), and the last SP rank also every decode token, after its segment (`sequence.py`, `sp_decode.py`); a
page id names a slot on every rank. So a table of ``pages(max(S, L - (sp - 1) S))`` pages per head holds
each rank's part of an ``L``-token sequence (``L >= n``): about ``n / sp`` where one rank needs ``n``.
`SegmentPages` is `KVPages` with that count wherever a sequence's tokens become pages (admission,
growth, `fits` when the scheduler names the sequence); rank 0 keeps it (the other ranks' pools hold
data only). Which prompts: those the engine core prefills sequence-parallel
(`sequence.uses_sequence_parallel` on the request, as `LockstepExecutor.prefill` decides). After KV
compression a sequence's spans are shares of the kept slots, allocated at the global counts
(`LockstepExecutor.compress`), so compressed sequences count whole; so do the prompts that run without SP.
"""

from __future__ import annotations

from typing import Any

from entropyinfer.shard.config import ParallelConfig
from entropyinfer.shard.kv_pages import KVPages
from entropyinfer.shard.parallel.sequence import segment_length, uses_sequence_parallel
from entropyinfer.shard.sequence import Sequence


def prefills_split(parallel: ParallelConfig, seq: Sequence) -> bool:
    """Whether the engine core prefills `seq`'s prompt over the SP ranks (`uses_sequence_parallel` on its
    request: decode-time compression only with more than one token to generate, prompt logprobs never)."""
    req = seq.request
    kv = req.kv if req.params.max_tokens > 1 else None
    return uses_sequence_parallel(parallel, seq.num_prompt_tokens, kv, req.params.prompt_logprobs is not None)


def held_tokens(parallel: ParallelConfig, seq: Sequence, tokens: int) -> int:
    """Token slots per head that `seq`'s block table needs on every SP rank to hold `tokens` tokens of it
    (`tokens` itself unless it prefills split and is not compressed; see the module docstring)."""
    if seq.compressed or not prefills_split(parallel, seq):
        return tokens
    sp = parallel.sequence_parallel_size
    s = segment_length(seq.num_prompt_tokens, sp)
    return max(s, tokens - (sp - 1) * s)


class SegmentPages(KVPages):
    """`KVPages` whose sequence-parallel sequences hold one rank's span (module docstring)."""

    def __init__(self, *args: Any, parallel: ParallelConfig, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.parallel = parallel

    def held(self, seq: Sequence, tokens: int) -> int:
        return held_tokens(self.parallel, seq, tokens)

    def allocate(self, seq: Sequence, tokens: int, cached: list[bytes] | None = None) -> None:
        super().allocate(seq, self.held(seq, tokens), cached)

    def fits(self, tokens: int, cached: list[bytes], seq: Sequence | None = None) -> bool:
        return super().fits(tokens if seq is None else self.held(seq, tokens), cached)

    def head_needs(self, seq: Sequence, extra: int = 1) -> list[int]:
        return [
            max(0, self.pages(self.held(seq, n + extra)) - len(t))
            for n, t in zip(self.longest_per_head(seq), seq.block_table, strict=True)
        ]
