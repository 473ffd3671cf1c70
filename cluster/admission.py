"""Backpressure and the limits of a job submission, each refusal an HTTPError that says its limit.

`Admission` bounds the completion requests an ingress replica holds (running in the engine or waiting
for a free engine slot): past `engine.max_ongoing_requests x engine.num_replicas +
limits.max_waiting_requests` a request gets a 503 with Retry-After before its body is read, so a burst
below the limit is queued and a flood costs neither memory nor a hanging client.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from entropyinfer.cluster.config import LimitsConfig, ServeAppConfig
from entropyinfer.cluster.http_errors import HTTPError


class Admission:
    """Completion requests in flight in this ingress replica, up to `capacity`."""

    def __init__(self, config: ServeAppConfig) -> None:
        engine, self.limits = config.engine, config.limits
        self.capacity = engine.max_ongoing_requests * engine.num_replicas + self.limits.max_waiting_requests
        self.in_flight = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the block; a 503 with Retry-After when none is free."""
        if self.in_flight >= self.capacity:
            raise HTTPError(
                503,
                f"server busy: {self.in_flight} completion requests in flight, the limit is {self.capacity}"
                f" (limits.max_waiting_requests={self.limits.max_waiting_requests} waiting beyond what "
                "the engine runs); retry later",
                "unavailable",
                retry_after=self.limits.retry_after_s,
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


def check_job_queue(limits: LimitsConfig, queued: int) -> None:
    """A 503 with Retry-After when `limits.max_queued_jobs` jobs are already queued."""
    if queued >= limits.max_queued_jobs:
        raise HTTPError(
            503,
            f"server busy: {queued} jobs queued, the limit is {limits.max_queued_jobs} "
            "(limits.max_queued_jobs); retry later",
            "unavailable",
            retry_after=limits.retry_after_s,
        )


def check_job_counts(limits: LimitsConfig, documents: int, questions: int) -> None:
    for name, count, limit in (
        ("documents", documents, limits.max_batch_documents),
        ("questions", questions, limits.max_questions),
    ):
        if count > limit:
            raise HTTPError(400, f"{name}: {count} {name} exceed the limit of {limit}", field=name)


def check_document_tokens(limits: LimitsConfig, per_document: Sequence[Sequence[int]]) -> None:
    """A 400 naming the first document whose prompt (with a question) is over `max_document_tokens`."""
    cap = limits.max_document_tokens
    for i, tokens in enumerate(per_document):
        if cap is not None and max(tokens) > cap:
            raise HTTPError(
                400,
                f"documents[{i}]: {max(tokens)} prompt tokens exceed the limit of {cap} tokens per document"
                " (limits.max_document_tokens)",
                field=f"documents[{i}]",
            )
