"""Automatic prefix caching: full KV pages found again by their content (vLLM's hash-chained blocks).

A prompt's page ``i`` (tokens ``i*P .. (i+1)*P - 1``, P = ``kv_page_size``) is named by
``hash(name of page i-1, its tokens, key)``, so a name stands for the whole prefix up to the page's end; the
`key` is everything besides the tokens that shaped the page's KV: the policy and its sparse config (the one
a layer runs with, so `fixed` with a target density includes the budget solved for the prompt's length).
The model and dtype are the engine's own: one cache lives in one engine core.

An entry is one page id per KV head, a reference count (sequences whose block table holds it) and, for
sparse prefill, the causal policy state at the page's end when that is a segment boundary (what a reader
needs to continue choosing the same blocks, `SparsePrefill.state_at`). Entries nobody references stay
resident, least recently used first in line for eviction, until their pages are needed
(`KVPages` takes free pages first, then evicts).

In-flight sharing: while a sequence prefills pages it will register, their names are `pending`; a request
whose next uncached page is pending waits for the writer instead of prefilling the same text again.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CachedPage:
    """One shared page: its page id in every KV head, how many sequences hold it, and the causal prefill
    state at its end (sparse policies, at segment boundaries only; else None)."""

    pages: tuple[int, ...]
    ref: int = 0
    state: Any = None


def key_digest(key: Hashable) -> bytes:
    """A stable digest of a cache key (the policy and its config's repr)."""
    return hashlib.blake2b(repr(key).encode(), digest_size=16).digest()


def page_names(tokens: list[int], page_size: int, key: Hashable) -> list[bytes]:
    """The names of the full pages of `tokens` (hash chain, each name covers the whole prefix)."""
    names, parent = [], key_digest(key)
    for i in range(len(tokens) // page_size):
        chunk = tokens[i * page_size : (i + 1) * page_size]
        parent = hashlib.blake2b(parent + struct.pack(f"<{len(chunk)}q", *chunk), digest_size=16).digest()
        names.append(parent)
    return names


@dataclass
class PrefixCache:
    """Resident shared pages by name, the LRU order of the unreferenced ones, and pending names."""

    entries: dict[bytes, CachedPage] = field(default_factory=dict)
    idle: OrderedDict[bytes, None] = field(default_factory=OrderedDict)  # ref == 0, oldest first
    pending: dict[bytes, str] = field(default_factory=dict)  # name -> request id writing it
    queried_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of those, served from the cache

    def match(self, names: list[bytes]) -> list[bytes]:
        """The longest prefix of `names` that is resident."""
        hit = []
        for name in names:
            if name not in self.entries:
                break
            hit.append(name)
        return hit

    def acquire(self, name: bytes) -> CachedPage:
        entry = self.entries[name]
        entry.ref += 1
        self.idle.pop(name, None)
        return entry

    def release(self, name: bytes) -> None:
        entry = self.entries[name]
        entry.ref -= 1
        if entry.ref == 0:
            self.idle[name] = None

    def insert(self, name: bytes, pages: tuple[int, ...], state: Any) -> None:
        """Register a page its writer holds (ref 1, the writer's)."""
        self.entries[name] = CachedPage(pages, ref=1, state=state)
        self.pending.pop(name, None)

    def evict(self) -> CachedPage | None:
        """Drop the least recently used unreferenced entry; its pages go back to the caller."""
        if not self.idle:
            return None
        name, _ = self.idle.popitem(last=False)
        return self.entries.pop(name)

    @property
    def evictable(self) -> int:
        return len(self.idle)

    def clear_pending(self, request_id: str) -> None:
        for name in [n for n, rid in self.pending.items() if rid == request_id]:
            del self.pending[name]

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
