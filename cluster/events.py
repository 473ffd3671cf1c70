"""Typed messages between the Ray actors of a request: the request, and the events that answer it.

    ingress / job worker --Request--> engine replica --Request--> shard actor
    shard actor --Accepted, Progress*, Token*, Final | Error--> engine replica --same--> ingress / worker

A request is answered by `Accepted` (it passed validation: its prompt tokens), then `Progress` (prefill
tokens done of total; repeated as a keepalive while decoding), `Token` (streaming requests only), and
one last event: `Final` (the text, or finish_reason "cancelled") or `Error` (the request was rejected:
a bad value, a prompt over the context, an unknown policy; `field` names what to fix). Failures that are
not the request's fault (an actor died, a bug) are exceptions, as Ray delivers them.

The messages cross Ray as these frozen dataclasses (Ray pickles them; `SamplingParams` travels as itself,
validated once where it was built). `encode` / `decode` are their versioned msgpack form: a map with
`"v"` (VERSION) and `"tag"` (the message's TAG) plus its fields; a message of another version, an
unknown tag or a field of the wrong shape raises `MessageError`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import msgpack

from entropyinfer.cluster.logprobs import Entry
from entropyinfer.errors import InvalidRequestError, PromptTooLongError, UnknownPolicyError
from entropyinfer.shard.sampling import SamplingParams

VERSION = 1

Prompt = str | list[dict[str, str]]  # text, or chat messages {"role", "content"}
Stat = int | float | str | bool | None
ErrorType = Literal["invalid_request", "prompt_too_long", "unknown_policy"]


class MessageError(ValueError):
    """Bytes that are not a message this version reads (wrong version, unknown tag, bad fields)."""


@dataclass(frozen=True)
class Request:
    """One prompt to run; `request_id` is what `cancel(request_id)` names."""

    TAG: ClassVar[str] = "request"
    request_id: str
    prompt: Prompt
    sampling: SamplingParams
    policy: str | None = None
    stream: bool = False


@dataclass(frozen=True)
class Accepted:
    """The request passed validation and is queued on the shard."""

    TAG: ClassVar[str] = "accepted"
    prompt_tokens: int


@dataclass(frozen=True)
class Progress:
    """Prefill tokens done of total (sent while prefilling, then as a keepalive)."""

    TAG: ClassVar[str] = "progress"
    done: int
    total: int


@dataclass(frozen=True)
class Token:
    """Newly decoded text of a streaming request (may be empty while a character is incomplete);
    `logprob`: the token's `cluster/logprobs.py: Entry` when the request asked for logprobs."""

    TAG: ClassVar[str] = "token"
    text: str
    token_id: int
    logprob: Entry | None = None


@dataclass(frozen=True)
class Final:
    """The request's result: finish_reason "stop", "length" or "cancelled" (then text is empty);
    logprobs / prompt_logprobs: one `cluster/logprobs.py: Entry` per generated / prompt token, when asked."""

    TAG: ClassVar[str] = "final"
    text: str
    finish_reason: str
    completion_tokens: int
    prompt_tokens: int = 0
    stats: dict[str, Stat] = field(default_factory=dict)
    logprobs: list[Entry] | None = None
    prompt_logprobs: list[Entry] | None = None

    @property
    def cancelled(self) -> bool:
        return self.finish_reason == "cancelled"


@dataclass(frozen=True)
class Error:
    """The request was rejected (the client's to fix); `field` names the offending field when known."""

    TAG: ClassVar[str] = "error"
    type: ErrorType
    message: str
    field: str | None = None

    @classmethod
    def from_exception(cls, exc: BaseException) -> Error | None:
        """The event for a request error (InvalidRequestError, PromptTooLongError, UnknownPolicyError);
        None for anything else (a failure, not an answer)."""
        if isinstance(exc, UnknownPolicyError):
            return cls("unknown_policy", str(exc), "policy")
        if isinstance(exc, PromptTooLongError):
            return cls("prompt_too_long", str(exc))
        if isinstance(exc, InvalidRequestError):
            return cls("invalid_request", str(exc), exc.field)
        return None


Event = Accepted | Progress | Token | Final | Error
Message = Request | Event
_CLASSES: dict[str, type[Message]] = {c.TAG: c for c in (Request, Accepted, Progress, Token, Final, Error)}
_ERROR_TYPES = ("invalid_request", "prompt_too_long", "unknown_policy")
_WIRE_TYPES: dict[str, tuple[type, ...]] = {  # what each field may hold on the wire
    "request_id": (str,),
    "prompt": (str, list),
    "sampling": (dict,),
    "policy": (str, type(None)),
    "stream": (bool,),
    "prompt_tokens": (int,),
    "done": (int,),
    "total": (int,),
    "text": (str,),
    "token_id": (int,),
    "finish_reason": (str,),
    "completion_tokens": (int,),
    "stats": (dict,),
    "type": (str,),
    "message": (str,),
    "field": (str, type(None)),
    "logprob": (dict, type(None)),
    "logprobs": (list, type(None)),
    "prompt_logprobs": (list, type(None)),
}


def encode(message: Message) -> bytes:
    """The msgpack bytes of a message: {"v": VERSION, "tag": its TAG, **its fields}."""
    body: dict[str, object] = {"v": VERSION, "tag": message.TAG}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        body[f.name] = value.to_dict() if isinstance(value, SamplingParams) else value
    return msgpack.packb(body, use_bin_type=True)


def decode(data: bytes) -> Message:
    """The message in msgpack bytes; MessageError when they are not one this version reads."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises ValueError, TypeError, ExtraData, FormatError, ...
        raise MessageError(f"not a msgpack message: {type(e).__name__}: {e}") from None
    if not isinstance(body, dict):
        raise MessageError(f"a message is a map, got {type(body).__name__}")
    values = dict(body)
    version, tag = values.pop("v", None), values.pop("tag", None)
    if version != VERSION:
        raise MessageError(f"message version {version!r}; this entropyinfer reads version {VERSION}")
    cls = _CLASSES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise MessageError(f"unknown message tag {tag!r}; known: {', '.join(_CLASSES)}")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise MessageError(f"{tag}: unknown field(s) {', '.join(map(str, unknown))}")
    for name, value in values.items():
        allowed = _WIRE_TYPES[name]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise MessageError(f"{tag}.{name}: a {type(value).__name__} is not a valid value")
    if not _plain_prompt(values.get("prompt", "")) or not _plain_stats(values.get("stats", {})):
        raise MessageError(f"{tag}: a prompt is text or {{role, content}} messages, stats are scalars")
    if cls is Error and values.get("type") not in _ERROR_TYPES:
        raise MessageError(f"error.type {values.get('type')!r}; known: {', '.join(_ERROR_TYPES)}")
    try:
        if cls is Request:
            values["sampling"] = SamplingParams.from_dict(values.get("sampling", {}))
        return cls(**values)
    except (TypeError, InvalidRequestError) as e:
        raise MessageError(f"{tag}: {e}") from None


def _plain_prompt(prompt: object) -> bool:
    if isinstance(prompt, str):
        return True
    return isinstance(prompt, list) and all(
        isinstance(m, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in m.items())
        for m in prompt
    )


def _plain_stats(stats: object) -> bool:
    return isinstance(stats, dict) and all(
        isinstance(v, (int, float, str, bool)) or v is None for v in stats.values()
    )


def decode_event(data: bytes) -> Event:
    """An event (not a request) from msgpack bytes."""
    message = decode(data)
    if isinstance(message, Request):
        raise MessageError("expected an event, got a request")
    return message
