"""Request bodies at the HTTP edge: read (within the size limit), decoded (JSON or msgpack, cluster/wire.py)
and validated (pydantic), and how a validation error names its field.

Types are strict (no "10" for 10, no true for 1); non-finite floats are rejected. Sampling values are
not range-checked here: each body builds its `SamplingParams` (`sampling_params`), which checks them
against the one table of limits in shard/sampling.py, naming the field. Text must be valid Unicode:
JSON can carry lone surrogates ("\\ud800") that no UTF-8 encoder accepts, so they are rejected here,
naming the field, instead of failing later in the tokenizer, a hash or SQLite. The OpenAI-compatible
bodies ignore unknown fields (clients send many), the job body rejects them (it is ours).
Limits that come from the config (max_tokens cap, batch size) are checked in the ingress.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from entropyinfer.cluster import wire
from entropyinfer.cluster.config import LimitsConfig
from entropyinfer.cluster.http_errors import HTTPError
from entropyinfer.errors import InvalidRequestError
from entropyinfer.shard.sampling import SamplingParams

if TYPE_CHECKING:
    from fastapi import Request

M = TypeVar("M", bound=BaseModel)

_STRICT = {"strict": True, "allow_inf_nan": False}
_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_UNICODE = "text is not valid Unicode (a lone surrogate such as \\ud800 cannot be encoded as UTF-8)"


def _unicode(text: str) -> str:
    if _SURROGATE.search(text):
        raise ValueError(_NOT_UNICODE)
    return text


Text = Annotated[str, AfterValidator(_unicode)]  # a str that can be encoded as UTF-8


class SamplingFields(BaseModel):
    """Sampling parameters shared by every request kind (OpenAI names), built into a SamplingParams."""

    model_config = ConfigDict(extra="ignore", **_STRICT)  # type: ignore[typeddict-item]
    default_max_tokens: ClassVar[int] = 256

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # extension: 0 = off
    seed: int | None = None
    stop: Text | list[Text] | None = None
    policy: Text | None = Field(default=None, min_length=1, max_length=64)  # extension: attention policy
    ignore_eos: bool = False  # extension (vLLM's): generate max_tokens whatever the model's end token
    _sampling: SamplingParams | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _build_sampling(self) -> SamplingFields:
        try:
            fields: dict[str, Any] = {
                "max_tokens": self.max_tokens if self.max_tokens is not None else self.default_max_tokens,
                "temperature": self.temperature,
                "top_p": self.top_p,
                "top_k": self.top_k,
                "seed": self.seed,
                "stop": self.stop,
                "ignore_eos": self.ignore_eos,
            }
            self._sampling = SamplingParams(**{**fields, **self._sampling_extra()})
        except InvalidRequestError as e:
            field = self._field_names().get(e.field or "body", e.field or "body")
            raise _FieldError(field, str(e).removeprefix(f"{e.field} ")) from None
        return self

    def _sampling_extra(self) -> dict[str, Any]:
        """Sampling fields a body kind adds (logprobs, n), or overrides."""
        return {}

    def _field_names(self) -> dict[str, str]:
        """The body's name of a SamplingParams field, where they differ."""
        return {}

    @property
    def sampling_params(self) -> SamplingParams:
        """The request's sampling parameters (validated with the body)."""
        assert self._sampling is not None, "built by the model's validator"
        return self._sampling


class _OpenAIFields(SamplingFields):
    model: Text | None = None
    stream: bool = False
    n: int = 1
    best_of: int | None = None
    user: Text | None = None
    stream_options: dict[str, object] | None = None
    # extension: the request's deadline in seconds (cluster/deadline.py; default limits.request_timeout_s)
    timeout: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)

    def _sampling_extra(self) -> dict[str, Any]:
        return {"n": self.n}

    @model_validator(mode="after")
    def _n_choices(self) -> _OpenAIFields:
        if self.best_of is not None and self.best_of != self.n:
            raise _FieldError("best_of", "best_of other than n is not supported")
        if self.stream and self.n > 1:
            raise _FieldError("n", "streaming takes n=1")
        return self

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_OpenAIFields):
    default_max_tokens: ClassVar[int] = 16  # OpenAI's default for /v1/completions

    prompt: Text | list[Text]
    echo: bool = False  # with logprobs: the prompt's logprobs too (its first token's is null)
    logprobs: int | None = None  # top alternatives per token, within shard/sampling.py: MAX_LOGPROBS

    def _sampling_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"n": self.n, "logprobs": self.logprobs}
        if self.echo and self.logprobs is not None:
            extra["prompt_logprobs"] = self.logprobs
        if self.echo and self.max_tokens == 0:  # score the prompt only: one token is run, then dropped
            extra["max_tokens"] = 1
        return extra

    @property
    def generates(self) -> bool:
        """False for `echo` with max_tokens 0: the answer is the prompt alone."""
        return not (self.echo and self.max_tokens == 0)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts:
            raise ValueError("prompt must not be an empty list")
        if any(not p.strip() for p in prompts):
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _stream_single(self) -> CompletionRequest:
        if self.stream and isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise _FieldError("prompt", "streaming takes a single prompt")
        if self.stream and self.echo:
            raise _FieldError("echo", "echo is not streamed: send it with stream false")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", **_STRICT)  # type: ignore[typeddict-item]
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", **_STRICT)  # type: ignore[typeddict-item]
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None  # alternatives per token with logprobs true (0 when absent)

    def _sampling_extra(self) -> dict[str, Any]:
        if self.top_logprobs is not None and not self.logprobs:
            raise _FieldError("top_logprobs", "top_logprobs requires logprobs: true")
        return {"n": self.n, "logprobs": (self.top_logprobs or 0) if self.logprobs else None}

    def _field_names(self) -> dict[str, str]:
        return {"logprobs": "top_logprobs"}

    @model_validator(mode="before")
    @classmethod
    def _max_completion_tokens(cls, data: Any) -> Any:
        """OpenAI's newer name for max_tokens (before the sampling parameters are built from it)."""
        if isinstance(data, dict) and data.get("max_tokens") is None and "max_completion_tokens" in data:
            data = {**data, "max_tokens": data["max_completion_tokens"]}
        return data

    @model_validator(mode="after")
    def _messages(self) -> ChatCompletionRequest:
        if not any(m.role == "user" and m.text().strip() for m in self.messages):
            raise _FieldError("messages", "messages must contain a non-empty user message")
        return self

    def chat(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class DocumentIn(BaseModel):
    """One document of a job: a string, UTF-8 bytes, or {"text", "name"}; `text` is always str here."""

    model_config = ConfigDict(extra="forbid", **_STRICT)  # type: ignore[typeddict-item]
    text: str
    name: Text | None = Field(default=None, max_length=512)

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        if isinstance(value, (str, bytes)):
            value = {"text": value}
        if isinstance(value, dict) and isinstance(value.get("text"), bytes):
            try:
                value = {**value, "text": value["text"].decode("utf-8")}
            except UnicodeDecodeError:
                raise ValueError("document is not valid UTF-8 text") from None
        return value


class JobRequest(SamplingFields):
    """POST /v1/jobs: a batch of documents and one or more questions asked of each."""

    model_config = ConfigDict(extra="forbid", **_STRICT)  # type: ignore[typeddict-item]

    documents: list[DocumentIn] = Field(min_length=1)
    question: Text | None = None
    questions: list[Text] | None = None
    temperature: float = 0.0
    idempotency_key: Text | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("documents")
    @classmethod
    def _documents(cls, docs: list[DocumentIn]) -> list[DocumentIn]:
        for i, doc in enumerate(docs):
            if not doc.text.strip():
                raise _FieldError(f"documents[{i}]", "document is empty")
            if _SURROGATE.search(doc.text):
                raise _FieldError(f"documents[{i}]", _NOT_UNICODE)
        return docs

    @model_validator(mode="after")
    def _questions(self) -> JobRequest:
        if (self.question is None) == (self.questions is None):
            raise _FieldError("question", "give exactly one of `question` or `questions`")
        qs = self.question_list
        field_name = "question" if self.question is not None else "questions"
        if not qs:
            raise _FieldError(field_name, "questions must not be empty")
        for i, q in enumerate(qs):
            if not q.strip():
                raise _FieldError(
                    field_name if self.question is not None else f"questions[{i}]", "empty question"
                )
        return self

    @property
    def question_list(self) -> list[str]:
        return [self.question] if self.question is not None else list(self.questions or [])


class _FieldError(ValueError):
    """A model-level validation error that names its own field (pydantic cannot for model validators)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# pydantic adds the union member it tried to a location (('stop', 'list[str]', 0)); these are not fields.
_TYPE_TAGS = {"str", "bytes", "int", "float", "bool", "list", "dict", "none", "DocumentIn", "TextPart"}


def field_path(loc: tuple[int | str, ...]) -> str | None:
    """('documents', 2, 'text') -> 'documents[2].text'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_TAGS or not part.isidentifier():
            continue
        else:
            out += f".{part}" if out else part
    return out or None


def first_error(exc: ValidationError) -> tuple[str | None, str]:
    """(field, message) of the first problem in a ValidationError, message prefixed by the field."""
    errors = exc.errors()
    if not errors:
        return None, str(exc)
    err = errors[0]
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, _FieldError):
        return ctx_error.field, f"{ctx_error.field}: {ctx_error.message}"
    field = field_path(tuple(err["loc"]))
    # A union reports one error per member it tried, at the field or inside it (`prompt` as a str, and
    # `prompt[1]` as a list). A member whose type matched but whose value is wrong says what to fix.
    inside = [e for e in errors if _within(field_path(tuple(e["loc"])), field)]
    specific = [e for e in inside if not str(e["type"]).endswith("_type")]
    if specific:
        field = field_path(tuple(specific[0]["loc"]))
        same = [e for e in specific if field_path(tuple(e["loc"])) == field]
    else:
        same = [e for e in errors if field_path(tuple(e["loc"])) == field]
    msgs = list(dict.fromkeys(_message(e) for e in same))
    msg = msgs[0] if len(msgs) == 1 else "invalid value: " + "; or ".join(msgs)
    return field, f"{field}: {msg}" if field else msg


def _within(path: str | None, field: str | None) -> bool:
    if path is None or field is None:
        return path == field
    return path == field or path.startswith((field + "[", field + "."))


def _message(err: ErrorDetails) -> str:
    if err["type"] == "missing":
        return "field required" if len(err["loc"]) <= 1 else f"field {err['loc'][-1]!r} required"
    if err["type"] == "extra_forbidden":
        return "unknown field"
    return str(err["msg"]).removeprefix("Value error, ")


async def read_body(request: Request, model: type[M], limits: LimitsConfig) -> M:
    """Read a request body (within `limits.max_body_bytes`), decode it (JSON or msgpack, by Content-Type,
    msgpack within bounds on its containers) and validate it; every failure is an HTTPError naming
    `body`, `content-type` or the offending field."""
    limit = limits.max_body_bytes
    try:
        fmt = wire.format_of(request.headers.get("content-type"))
    except wire.WireError as e:
        raise HTTPError(e.status, str(e), "unsupported_media_type", "content-type") from None
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        too_large = f"body of {declared} bytes exceeds the limit of {limit}"
        raise HTTPError(413, too_large, "request_too_large", "body")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPError(413, f"body exceeds the limit of {limit} bytes", "request_too_large", "body")
    bounds = wire.Limits(max_items=limits.max_wire_items, max_containers=4 * limits.max_wire_items + 64)
    try:
        data = wire.decode(bytes(body), fmt, bounds)
    except wire.WireError as e:
        raise HTTPError(e.status, str(e), field="body") from None
    if not isinstance(data, dict):
        raise HTTPError(400, f"the body must be an object, got {type(data).__name__}", field="body")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        field, message = first_error(e)
        raise HTTPError(400, message, field=field or "body") from None
