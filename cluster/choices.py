"""The engine requests of one OpenAI body, and its results as choices.

A body with `n` asks for n sequences per prompt: each is its own engine request (choice ``i * n + j`` is
prompt i's j-th), with its own seed stream (``seed + j`` when the body gave a seed, else a fresh one). They
are sent together, so the forks find the first one's prompt pages in the prefix cache (shard/prefix_cache.py:
a request that arrives while those pages are being written waits for them) and prefill only the last page.
`echo` with ``max_tokens: 0`` scores the prompt alone: one token is run (the engine always samples one)
and `score_only` drops it from the results.
"""

from __future__ import annotations

import dataclasses
import secrets

from entropyinfer.cluster.events import Final, Prompt, Request
from entropyinfer.cluster.logprobs import Entry
from entropyinfer.cluster.schemas import SamplingFields


def engine_requests(prompts: list[Prompt], req: SamplingFields, stream: bool = False) -> list[Request]:
    """n requests per prompt, in choice order."""
    params = req.sampling_params
    return [
        Request(secrets.token_hex(16), p, params.fork(j), req.policy, stream)
        for p in prompts
        for j in range(params.n)
    ]


def score_only(out: Final) -> Final:
    """A result without its generated token (echo with max_tokens 0)."""
    logprobs: list[Entry] | None = None if out.logprobs is None else []
    return dataclasses.replace(out, text="", completion_tokens=0, logprobs=logprobs, finish_reason="length")
