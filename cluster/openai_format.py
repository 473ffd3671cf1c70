"""OpenAI response shapes: completion and chat bodies, their SSE chunks, and usage.

Built from the engine's typed `events.Final`; each body also carries the shard's stats (policy, density,
prefill time, ...) under `entropyinfer` (a completion) or `stats` (a choice).

Usage is OpenAI's (`prompt_tokens`, `completion_tokens`, `total_tokens`,
`prompt_tokens_details.cached_tokens`: prompt tokens served from the prefix cache) plus two extension
fields that say what the sparse policy did: `attention_density` (the fraction of causal attention work
computed in prefill, 1.0 for dense; over several prompts, their mean weighted by each prompt's causal
work n(n+1)/2) and `kv_bytes_kept` (bytes of KV cache the request held at its end, after any compression;
summed over prompts). Clients that do not know them ignore them (the `openai` package keeps them as
extra fields).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, TypedDict

from entropyinfer.cluster import wire
from entropyinfer.cluster.events import Final, Stat
from entropyinfer.cluster.http_errors import ErrorBody
from entropyinfer.cluster.logprobs import Entry, chat_logprobs, completion_logprobs

DONE = "data: [DONE]\n\n"


class PromptTokensDetails(TypedDict):
    cached_tokens: int


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    attention_density: float | None  # extension: see the module's docstring
    kv_bytes_kept: int | None  # extension


class Message(TypedDict):
    role: Literal["assistant"]
    content: str


class TextChoice(TypedDict):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, object] | None
    stats: dict[str, Stat]


class ChatChoice(TypedDict):
    index: int
    message: Message
    finish_reason: str | None
    logprobs: dict[str, object] | None
    stats: dict[str, Stat]


class CompletionBody(TypedDict):
    id: str
    object: Literal["text_completion", "chat.completion"]
    created: int
    model: str
    choices: list[TextChoice] | list[ChatChoice]
    usage: Usage
    entropyinfer: dict[str, Stat]


def usage(outs: list[Final]) -> Usage:
    """The usage of one request's results (one per prompt)."""
    prompt_tokens = sum(o.prompt_tokens for o in outs)
    completion_tokens = sum(o.completion_tokens for o in outs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(_int(o.stats.get("cached_tokens")) for o in outs)},
        "attention_density": _density(outs),
        "kv_bytes_kept": _kv_bytes(outs),
    }


def _int(value: Stat) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _density(outs: list[Final]) -> float | None:
    """The prompts' prefill density, weighted by their causal attention work; None if none reported it."""
    work = density = 0.0
    for o in outs:
        d = o.stats.get("density")
        if isinstance(d, (int, float)) and not isinstance(d, bool):
            w = o.prompt_tokens * (o.prompt_tokens + 1) / 2 or 1.0
            work, density = work + w, density + w * float(d)
    return round(density / work, 6) if work else None


def _kv_bytes(outs: list[Final]) -> int | None:
    found = [o.stats["kv_bytes"] for o in outs if isinstance(o.stats.get("kv_bytes"), (int, float))]
    return sum(_int(b) for b in found) if found else None


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(model: str, outs: list[Final], echoed: list[str] | None = None) -> CompletionBody:
    """/v1/completions: one choice per result (n per prompt, in prompt order), usage summed over them;
    `echoed`: each result's prompt, put before its text (with its logprobs, when asked)."""
    choices: list[TextChoice] = []
    for i, o in enumerate(outs):
        prompt = echoed[i] if echoed is not None else ""
        items: list[Entry] | None = o.logprobs
        if echoed is not None and o.prompt_logprobs is not None:
            items = [*o.prompt_logprobs, *(o.logprobs or [])]
        logprobs = None if items is None else completion_logprobs(items)
        choices.append(
            {"index": i, "text": prompt + o.text, "finish_reason": o.finish_reason, "logprobs": logprobs,
             "stats": o.stats}
        )  # fmt: skip
    return _body("text_completion", model, choices, outs)


def chat_body(model: str, outs: list[Final]) -> CompletionBody:
    """/v1/chat/completions: the assistant's message, one choice per result (n)."""
    choices: list[ChatChoice] = [
        {
            "index": i,
            "message": {"role": "assistant", "content": o.text},
            "finish_reason": o.finish_reason,
            "logprobs": None if o.logprobs is None else chat_logprobs(o.logprobs),
            "stats": o.stats,
        }
        for i, o in enumerate(outs)
    ]
    return _body("chat.completion", model, choices, outs)


def _body(
    obj: Literal["text_completion", "chat.completion"],
    model: str,
    choices: list[TextChoice] | list[ChatChoice],
    outs: list[Final],
) -> CompletionBody:
    return {
        "id": _id("cmpl"),
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(outs),
        "entropyinfer": outs[0].stats,
    }


class Chunks:
    """The `data:` lines of one streamed completion (chat deltas, or text) sharing an id and a time."""

    def __init__(self, model: str, chat: bool) -> None:
        self.chat = chat
        self.offset = 0  # characters streamed so far (a completion's text_offset)
        self.head: dict[str, object] = {
            "id": _id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

    def role(self) -> str:
        """A chat stream's first chunk: the assistant's role, no content yet."""
        return self._line({**self.head, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})

    def delta(self, text: str | None, finish_reason: str | None = None, logprob: Entry | None = None) -> str:
        choice: dict[str, object]
        if self.chat:
            choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish_reason}
            if logprob is not None:
                choice["logprobs"] = chat_logprobs([logprob])
        else:
            lp = None if logprob is None else completion_logprobs([logprob], self.offset)
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": lp}
        self.offset += len(text or "")
        return self._line({**self.head, "choices": [choice]})

    def usage(self, final: Final) -> str:
        """The last chunk when the client asked for `stream_options.include_usage`."""
        return self._line({**self.head, "choices": [], "usage": usage([final])})

    @staticmethod
    def error(body: ErrorBody) -> str:
        """An error after the 200 went out: the error body as one event."""
        return Chunks._line(body)

    @staticmethod
    def _line(body: object) -> str:
        return f"data: {wire.encode(body, 'json').decode()}\n\n"
