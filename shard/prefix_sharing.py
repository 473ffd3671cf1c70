"""How a sequence prefills against the prefix cache (`shard/prefix_cache.py`), for `EngineCore`.

`plan_chunks` sets a chunkable prompt's chunk unit (and where its dense tail starts) and what it may take
from and give to the cache: a dense reader takes pages up to its last one (it recomputes at least its last
position and the prompt queries KV compression observes); a sparse reader takes pages up to a segment
boundary before its own last segment (the writer's last segment ran dense), where the writer stored its
causal policy state.
`share_chunk` registers the pages a finished chunk completed, with one policy-state snapshot per chunk at
the last segment boundary it shares (each boundary page keeps the snapshot and its segment count; a reader
truncates it; a snapshot per boundary would be O(n^2)).
"""

from __future__ import annotations

import math

from entropyinfer.shard.attention import PrefillAttention
from entropyinfer.shard.kv_pages import KVPages
from entropyinfer.shard.prefix_cache import page_names
from entropyinfer.shard.sequence import Sequence
from entropyinfer.shard.sparse_attention import SparsePrefill


def plan_chunks(seq: Sequence, attention: PrefillAttention, page_size: int, caching: bool) -> None:
    """Set `seq`'s chunk unit and prefix-cache limits (`caching`: the engine's enable_prefix_caching);
    for a prompt that prefills in chunks (not one-shot)."""
    req, n, ps = seq.request, seq.num_prompt_tokens, page_size
    keep = 1  # a reader recomputes at least the last position (its logits) ...
    if req.kv is not None and req.params.max_tokens > 1:  # ... and the queries compression observes
        keep = max(keep, req.kv.prompt_queries)
    if isinstance(attention, SparsePrefill):
        unit = math.lcm(req.sparse.segment_size, ps)
        seq.chunk_unit, seq.resume_unit = unit, unit // ps
        last_segment = (n - 1) // req.sparse.segment_size * req.sparse.segment_size
        seq.dense_from = last_segment
        limit = min(last_segment, n - keep)
        # the writer's last segment ran dense; a prompt too short for sparse segments still profiles
        # every layer (its state serves longer readers), and its earlier segments are dense for them too
        seq.share_pages = last_segment // ps
        key: tuple = ("sparse", attention.policy, attention.layer_config, attention.key)
    else:
        seq.chunk_unit, seq.dense_from = ps, 0
        limit, seq.share_pages, key = n - keep, n // ps, ("dense",)
    if caching and attention.prefix_cacheable:
        seq.cache_limit = max(limit, 0) // ps
        seq.page_names = page_names(seq.prompt_ids, ps, key)
    else:
        seq.share_pages = 0


def share_chunk(seq: Sequence, end: int, pages: KVPages) -> tuple[int, list[tuple[bytes, int]]]:
    """Register the pages of `seq` that its chunk ending at `end` completed in the prefix cache (with the
    causal policy state at the segment boundaries among them, for sparse readers). Returns (the segments of
    this chunk's snapshot, [(page name, segments)] of the boundary pages registered now), which the other
    ranks need to keep their own heads' policy state under the same names."""
    ps = pages.page_size
    upto = min(end // ps, seq.share_pages)
    first = len(seq.cached_names)
    if upto <= first:
        return 0, []
    states: dict[int, tuple[object, int]] = {}
    last = 0  # segments of this chunk's snapshot
    if isinstance(seq.attention, SparsePrefill):
        s_len = seq.request.sparse.segment_size
        last = upto * ps // s_len
        if last * s_len // ps > first:
            snapshot = seq.attention.state_at(last)
            for i in range(first, upto):
                if (i + 1) * ps % s_len == 0:
                    states[i] = (snapshot, (i + 1) * ps // s_len)
    pages.register(seq, seq.page_names, upto, states)
    registered = range(first, len(seq.cached_names))
    return last, [(seq.cached_names[i], states[i][1]) for i in registered if i in states]
