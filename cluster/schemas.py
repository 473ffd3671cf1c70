"""Request bodies at the HTTP edge (pydantic), and how a validation error names its field.

Types are strict (no "10" for 10, no true for 1); non-finite floats are rejected. The OpenAI-compatible
bodies ignore unknown fields (clients send many), the job body rejects them (it is ours).
Limits that come from the config (max_tokens cap, batch size) are checked in the ingress.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_STRICT = {"strict": True, "allow_inf_nan": False}


class SamplingFields(BaseModel):
    """Sampling parameters shared by every request kind (OpenAI names)."""

    model_config = ConfigDict(extra="ignore", **_STRICT)  # type: ignore[typeddict-item]

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=100_000)  # extension: 0 = off
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    policy: str | None = Field(default=None, min_length=1, max_length=64)  # extension: attention policy

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is None:
            return None
        if len(stops) > 8:
            raise ValueError("at most 8 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    def sampling(self, default_max_tokens: int) -> dict[str, Any]:
        """The keyword arguments of SamplingParams."""
        return {
            "max_tokens": self.max_tokens if self.max_tokens is not None else default_max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": self.stop,
        }


class _OpenAIFields(SamplingFields):
    model: str | None = None
    stream: bool = False
    n: int = 1
    user: str | None = None
    stream_options: dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_OpenAIFields):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts:
            raise ValueError("prompt must not be an empty list")
        if any(not p.strip() for p in prompts):
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError("logprobs is not supported")
        return v

    @model_validator(mode="after")
    def _stream_single(self) -> CompletionRequest:
        if self.stream and isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise _FieldError("prompt", "streaming takes a single prompt")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", **_STRICT)  # type: ignore[typeddict-item]
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", **_STRICT)  # type: ignore[typeddict-item]
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _messages(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if not any(m.role == "user" and m.text().strip() for m in self.messages):
            raise _FieldError("messages", "messages must contain a non-empty user message")
        return self

    def chat(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid", **_STRICT)  # type: ignore[typeddict-item]
    text: str | bytes
    name: str | None = Field(default=None, max_length=512)


class JobRequest(SamplingFields):
    """POST /v1/jobs: a batch of documents and one or more questions asked of each."""

    model_config = ConfigDict(extra="forbid", **_STRICT)  # type: ignore[typeddict-item]

    documents: list[str | bytes | DocumentIn] = Field(min_length=1)
    question: str | None = None
    questions: list[str] | None = None
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("documents")
    @classmethod
    def _documents(cls, docs: list[str | bytes | DocumentIn]) -> list[DocumentIn]:
        out = []
        for i, d in enumerate(docs):
            doc = d if isinstance(d, DocumentIn) else DocumentIn(text=d)
            if isinstance(doc.text, bytes):
                try:
                    doc = DocumentIn(text=doc.text.decode("utf-8"), name=doc.name)
                except UnicodeDecodeError:
                    raise _FieldError(f"documents[{i}]", "document is not valid UTF-8 text") from None
            if not str(doc.text).strip():
                raise _FieldError(f"documents[{i}]", "document is empty")
            out.append(doc)
        return out

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

    @property
    def docs(self) -> list[DocumentIn]:
        return [d for d in self.documents if isinstance(d, DocumentIn)]


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
    # A union reports one error per member it tried, all at the same field: show them together.
    same = [e for e in errors if field_path(tuple(e["loc"])) == field]
    msgs = list(dict.fromkeys(_message(e) for e in same))
    msg = msgs[0] if len(msgs) == 1 else "invalid value: " + "; or ".join(msgs)
    return field, f"{field}: {msg}" if field else msg


def _message(err: Any) -> str:
    if err["type"] == "missing":
        return "field required" if len(err["loc"]) <= 1 else f"field {err['loc'][-1]!r} required"
    if err["type"] == "extra_forbidden":
        return "unknown field"
    return str(err["msg"]).removeprefix("Value error, ")
