"""OpenAI response shapes: completion and chat bodies, their SSE chunks, and usage.

Built from the engine's typed `events.Final`; each body also carries the shard's stats (policy, density,
prefill time, ...) under `entropyinfer` (a completion) or `stats` (a choice).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, TypedDict

from entropyinfer.cluster import wire
from entropyinfer.cluster.events import Final, Stat
from entropyinfer.cluster.http_errors import ErrorBody

DONE = "data: [DONE]\n\n"


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Message(TypedDict):
    role: Literal["assistant"]
    content: str


class TextChoice(TypedDict):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None
    stats: dict[str, Stat]


class ChatChoice(TypedDict):
    index: int
    message: Message
    finish_reason: str | None
    stats: dict[str, Stat]


class CompletionBody(TypedDict):
    id: str
    object: Literal["text_completion", "chat.completion"]
    created: int
    model: str
    choices: list[TextChoice] | list[ChatChoice]
    usage: Usage
    entropyinfer: dict[str, Stat]


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(model: str, outs: list[Final]) -> CompletionBody:
    """/v1/completions: one choice per prompt, usage summed over them."""
    choices: list[TextChoice] = [
        {"index": i, "text": o.text, "finish_reason": o.finish_reason, "logprobs": None, "stats": o.stats}
        for i, o in enumerate(outs)
    ]
    return _body("text_completion", model, choices, outs)


def chat_body(model: str, out: Final) -> CompletionBody:
    """/v1/chat/completions: the assistant's message."""
    message: Message = {"role": "assistant", "content": out.text}
    choices: list[ChatChoice] = [
        {"index": 0, "message": message, "finish_reason": out.finish_reason, "stats": out.stats}
    ]
    return _body("chat.completion", model, choices, [out])


def _body(
    obj: Literal["text_completion", "chat.completion"],
    model: str,
    choices: list[TextChoice] | list[ChatChoice],
    outs: list[Final],
) -> CompletionBody:
    prompt_tokens = sum(o.prompt_tokens for o in outs)
    return {
        "id": _id("cmpl"),
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, sum(o.completion_tokens for o in outs)),
        "entropyinfer": outs[0].stats,
    }


class Chunks:
    """The `data:` lines of one streamed completion (chat deltas, or text) sharing an id and a time."""

    def __init__(self, model: str, chat: bool) -> None:
        self.chat = chat
        self.head: dict[str, object] = {
            "id": _id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

    def role(self) -> str:
        """A chat stream's first chunk: the assistant's role, no content yet."""
        return self._line({**self.head, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})

    def delta(self, text: str | None, finish_reason: str | None = None) -> str:
        choice: dict[str, object]
        if self.chat:
            choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return self._line({**self.head, "choices": [choice]})

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        """The last chunk when the client asked for `stream_options.include_usage`."""
        return self._line({**self.head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})

    @staticmethod
    def error(body: ErrorBody) -> str:
        """An error after the 200 went out: the error body as one event."""
        return Chunks._line(body)

    @staticmethod
    def _line(body: object) -> str:
        return f"data: {wire.encode(body, 'json').decode()}\n\n"
