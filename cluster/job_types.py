"""The records of a document job: what the store takes (NewJob), what it gives back (Job, Task), their
HTTP bodies (JobBody, ResultBody), and what makes two submissions the same request (`request_digest`).

States: queued -> running -> succeeded | failed | cancelled. A job is a batch of documents and questions;
each (document, question) pair is a task whose prompt-token count is known at submission, so progress
is reported as prefill tokens done / total and documents done / total.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NotRequired, TypedDict

from entropyinfer.cluster.events import Stat
from entropyinfer.errors import InvalidRequestError

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: tuple[JobState, ...] = ("succeeded", "failed", "cancelled")


class JobParams(TypedDict):
    """How every task of a job runs: `SamplingParams.to_dict()` and the attention policy; `owner`: the id
    of the API key that submitted it (cluster/auth.py; None on an open server)."""

    sampling: dict[str, object]
    policy: str | None
    owner: NotRequired[str | None]


class ProgressBody(TypedDict):
    documents_done: int
    documents_total: int
    prefill_tokens_done: int
    prefill_tokens_total: int


class JobBody(TypedDict):
    """GET /v1/jobs/{id} (and the answer to a submission, with `created`)."""

    id: str
    object: Literal["job"]
    state: JobState
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    progress: ProgressBody
    questions: int
    resumed: int


class ResultBody(TypedDict):
    """One finished (document, question) task in GET /v1/jobs/{id}/results."""

    document_index: int
    document_name: str | None
    question_index: int
    question: str
    text: str | None
    finish_reason: str | None
    error: str | None
    stats: dict[str, Stat]


class IdempotencyConflict(Exception):
    """The idempotency key was used before for a different request."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"idempotency key {key!r} was already used for a different request (job {job_id})")
        self.key = key
        self.job_id = job_id


@dataclass(frozen=True)
class NewDocument:
    text: str
    name: str | None
    prompt_tokens: tuple[int, ...]  # one per question, as the engine counts them


@dataclass(frozen=True)
class NewJob:
    documents: tuple[NewDocument, ...]
    questions: tuple[str, ...]
    params: JobParams

    def request_hash(self) -> str:
        return request_digest([(d.name, d.text) for d in self.documents], self.questions, self.params)


def new_documents(
    named: Sequence[tuple[str | None, str]],
    task_tokens: Sequence[tuple[int, ...]],
    max_tokens: int,
    max_context: int,
) -> tuple[NewDocument, ...]:
    """The documents of a submission with their tasks' prompt tokens (one per question); a document
    whose longest task with `max_tokens` exceeds the context raises InvalidRequestError naming it."""
    docs = []
    for i, ((name, text), tokens) in enumerate(zip(named, task_tokens, strict=True)):
        if max(tokens) + max_tokens > max_context:
            raise InvalidRequestError(
                f"{max(tokens)} prompt tokens with the question; with max_tokens={max_tokens} this "
                f"exceeds the model's context of {max_context} tokens",
                field=f"documents[{i}]",
            )
        docs.append(NewDocument(text, name, tokens))
    return tuple(docs)


def request_digest(
    documents: Sequence[tuple[str | None, str]], questions: Sequence[str], params: JobParams
) -> str:
    """What makes two submissions the same request (for idempotency keys)."""
    h = hashlib.sha256()
    h.update(json.dumps([list(questions), params], sort_keys=True).encode())
    for name, text in documents:
        h.update(b"\0doc\0" + (name or "").encode() + b"\0" + text.encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Job:
    id: str
    state: JobState
    created_at: float
    started_at: float | None
    finished_at: float | None
    n_documents: int
    n_questions: int
    documents_done: int
    prefill_total: int
    prefill_done: int
    cancel_requested: bool
    lost_count: int
    error: str | None
    worker: str | None  # the worker loop running it (None unless running)
    params: JobParams = field(repr=False)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    def to_dict(self) -> JobBody:
        return {
            "id": self.id,
            "object": "job",
            "state": self.state,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "progress": {
                "documents_done": self.documents_done,
                "documents_total": self.n_documents,
                "prefill_tokens_done": self.prefill_done,
                "prefill_tokens_total": self.prefill_total,
            },
            "questions": self.n_questions,
            "resumed": self.lost_count,
        }


@dataclass(frozen=True)
class Task:
    """One (document, question) pair of a job that is still to run."""

    job_id: str
    doc_idx: int
    q_idx: int
    question: str
    prompt_tokens: int
    document: str
