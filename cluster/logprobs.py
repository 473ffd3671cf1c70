"""Token logprobs between the engine and the OpenAI bodies.

The engine core gives, per position, ``{token_id: logprob}`` of the chosen token and its top-k alternatives
(`SamplingParams.logprobs` / `prompt_logprobs`). The shard turns them into `Entry`s (token text, logprob,
UTF-8 bytes, the top-k as entries, most likely first) with its tokenizer (`entries`, `entry`), so the
events carry plain data (cluster/events.py); the ingress shapes them as OpenAI's (`completion_logprobs`:
the legacy ``tokens / token_logprobs / top_logprobs / text_offset`` of /v1/completions; `chat_logprobs`:
``content = [{token, logprob, bytes, top_logprobs}]`` of /v1/chat/completions). A prompt's first token has
no logprob (None), as in OpenAI's echo.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypedDict

from entropyinfer.shard.sampling import SamplingParams, TokenLogprobs, top_logprobs

if TYPE_CHECKING:  # the shard's types (torch): only where the shard builds its events
    from entropyinfer.shard.engine_core import TokenDelta
    from entropyinfer.shard.sequence import RequestOutput


class Top(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class Entry(TypedDict):
    token: str
    logprob: float | None
    bytes: list[int]
    top: list[Top]


def _text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id]))


def entry(tokenizer: Any, token_id: int, row: TokenLogprobs | None, k: int) -> Entry:
    """One position: the chosen token's text and logprob (None: no row, a prompt's first token) and its
    top-k alternatives."""
    text = _text(tokenizer, token_id)
    top: list[Top] = []
    for tid, lp in top_logprobs(row, k) if row is not None else []:
        alt = _text(tokenizer, tid)
        top.append({"token": alt, "logprob": lp, "bytes": list(alt.encode())})
    lp_chosen = None if row is None else row[token_id]
    return {"token": text, "logprob": lp_chosen, "bytes": list(text.encode()), "top": top}


def entries(
    tokenizer: Any, token_ids: Sequence[int], rows: Sequence[TokenLogprobs | None] | None, k: int | None
) -> list[Entry] | None:
    """Every position of `token_ids` (None when the request asked for no logprobs)."""
    if rows is None or k is None:
        return None
    return [entry(tokenizer, t, r, k) for t, r in zip(token_ids, rows, strict=True)]


def token_entry(tokenizer: Any, delta: TokenDelta, params: SamplingParams) -> Entry | None:
    """A streamed token's entry (None: the request asked for no logprobs)."""
    if delta.logprobs is None:
        return None
    return entry(tokenizer, delta.token_id, delta.logprobs, params.logprobs or 0)


def output_entries(
    tokenizer: Any, out: RequestOutput, params: SamplingParams
) -> dict[str, list[Entry] | None]:
    """`events.Final`'s logprobs and prompt_logprobs of a result."""
    return {
        "logprobs": entries(tokenizer, out.token_ids, out.logprobs, params.logprobs),
        "prompt_logprobs": entries(
            tokenizer, out.prompt_token_ids, out.prompt_logprobs, params.prompt_logprobs
        ),
    }


def completion_logprobs(items: list[Entry], offset: int = 0) -> dict[str, object]:
    """OpenAI's legacy completion `logprobs`: text_offset counts characters from `offset` (the echoed
    prompt's start, or the completion's)."""
    offsets, at = [], offset
    for e in items:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in items],
        "token_logprobs": [e["logprob"] for e in items],
        "top_logprobs": [
            None if e["logprob"] is None else {t["token"]: t["logprob"] for t in e["top"]} for e in items
        ],
        "text_offset": offsets,
    }


def chat_logprobs(items: list[Entry]) -> dict[str, object]:
    """OpenAI's chat `logprobs`: one content entry per generated token."""
    content = [
        {
            "token": e["token"],
            "logprob": e["logprob"],
            "bytes": e["bytes"],
            "top_logprobs": [dict(t) for t in e["top"]],
        }
        for e in items
    ]
    return {"content": content, "refusal": None}
