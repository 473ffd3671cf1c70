"""The client SDK's errors and result types (shared by `Client` and `AsyncClient`, cluster/client.py).

Errors the server reports are `APIError` subclasses carrying its message, type and field (by HTTP
status); transport errors are `ConnectionFailed` (`RequestTimeout` for timeouts). Results are frozen
dataclasses read from the server's bodies (JobBody, ResultBody in cluster/job_types.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from entropyinfer.cluster.events import Stat
from entropyinfer.errors import EntropyInferError

# A decoded response body: plain data whose shape the server decides (read defensively).
Body = Mapping[str, Any]


class ClientError(EntropyInferError):
    """Base of the SDK's errors."""


class APIError(ClientError):
    """The server answered with an error; `message`, `type` and `field` are the server's."""

    def __init__(self, status: int, message: str, type: str | None = None, field: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.type = type
        self.field = field


class BadRequestError(APIError):
    """400/413/415/422: the request is invalid; `field` names the offending field when known."""


class AuthenticationError(APIError):
    """401/403: missing or wrong API key."""


class NotFoundError(APIError):
    """404: unknown job id, route or model."""


class ConflictError(APIError):
    """409: the idempotency key was used for a different request."""


class DeadlineExceededError(APIError):
    """408: the request's deadline (its `timeout` field, or the server's default) passed; the server
    aborted it."""


class ServerError(APIError):
    """5xx after retries (503 included when retries are exhausted)."""


class ConnectionFailed(ClientError):
    """The request failed in transport after all retries: no connection, connection dropped, or a
    read/write error; `RequestTimeout` when it timed out."""


class RequestTimeout(ConnectionFailed):
    """Connecting, sending, waiting for the answer or for a pooled connection took longer than `timeout`."""


class JobFailedError(ClientError):
    """`wait` saw the job fail; `job` holds its final status and `job.error` the reason."""

    def __init__(self, job: JobStatus) -> None:
        super().__init__(f"job {job.id} failed: {job.error}")
        self.job = job


def api_error(status: int, body: object) -> APIError:
    """The APIError subclass for an HTTP status, with the server's message, type and field."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message, typ, fld = str(err.get("message")), err.get("type"), err.get("field")
    else:
        message, typ, fld = (str(body)[:500] or f"HTTP {status}"), None, None
    cls: type[APIError]
    if status in (400, 413, 415, 422):
        cls = BadRequestError
    elif status in (401, 403):
        cls = AuthenticationError
    elif status == 404:
        cls = NotFoundError
    elif status == 408:
        cls = DeadlineExceededError
    elif status == 409:
        cls = ConflictError
    elif status >= 500:
        cls = ServerError
    else:
        cls = APIError
    return cls(status, message, typ, fld)


class JobOptions(TypedDict, total=False):
    """The keyword options of `submit` (and `run`): more questions, sampling, policy, idempotency key."""

    questions: Sequence[str] | None  # each asked of every document (instead of `question`)
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: str | list[str] | None
    policy: str | None
    idempotency_key: str | None  # default: a fresh one, reused across the submission's retries


# ---- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobStatus:
    id: str
    state: str  # queued | running | succeeded | failed | cancelled
    documents_done: int
    documents_total: int
    prefill_tokens_done: int
    prefill_tokens_total: int
    error: str | None = None
    created_at: float | None = None
    finished_at: float | None = None
    created: bool = True  # False when an idempotent resubmission returned an existing job

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")

    @classmethod
    def from_dict(cls, d: Body) -> JobStatus:
        """From a job body (`JobBody`, plus `created` for a submission)."""
        p = d.get("progress") or {}
        return cls(
            id=d["id"],
            state=d["state"],
            documents_done=int(p.get("documents_done", 0)),
            documents_total=int(p.get("documents_total", 0)),
            prefill_tokens_done=int(p.get("prefill_tokens_done", 0)),
            prefill_tokens_total=int(p.get("prefill_tokens_total", 0)),
            error=d.get("error"),
            created_at=d.get("created_at"),
            finished_at=d.get("finished_at"),
            created=bool(d.get("created", True)),
        )


# What `status`, `wait`, `results` and `cancel` take: a job id or the JobStatus that `submit` returned.
JobRef = str | JobStatus


@dataclass(frozen=True)
class JobResult:
    document_index: int
    document_name: str | None
    question_index: int
    question: str
    text: str | None
    finish_reason: str | None
    error: str | None = None
    stats: dict[str, Stat] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Body) -> JobResult:
        """From one entry of a results body (`ResultBody`)."""
        return cls(
            document_index=d["document_index"],
            document_name=d.get("document_name"),
            question_index=d["question_index"],
            question=d["question"],
            text=d.get("text"),
            finish_reason=d.get("finish_reason"),
            error=d.get("error"),
            stats=dict(d.get("stats") or {}),
        )


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    usage: dict[str, Any]  # OpenAI usage (prompt_tokens_details.cached_tokens, ...) and extension fields
    stats: dict[str, Stat]
    raw: Body = field(repr=False)  # the whole response body
