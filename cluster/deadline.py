"""Per-request deadlines of the completion routes (issue 14 item 5).

A request's deadline is its body's `timeout` (seconds, an extension field of the OpenAI bodies) or the
server's default `limits.request_timeout_s` (None: no deadline), counted from when the ingress has read
and validated the body. Past it the request is aborted (its engine requests cancelled, which stops the
sequences in the engine core and frees their KV pages) and the answer is a 408 with the OpenAI-shaped
error body (`type` "timeout", `param`/`field` "timeout"); a stream that already answered 200 ends with
that error as its last event instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from entropyinfer.cluster.config import LimitsConfig
from entropyinfer.cluster.http_errors import HTTPError

T = TypeVar("T")


@dataclass(frozen=True)
class Deadline:
    timeout_s: float
    at: float  # time.monotonic() when it passes

    @classmethod
    def of(cls, timeout_s: float | None, limits: LimitsConfig) -> Deadline | None:
        """The deadline of a request whose body asked for `timeout_s` (None: the server's default)."""
        chosen = timeout_s if timeout_s is not None else limits.request_timeout_s
        if chosen is None:
            return None
        return cls(float(chosen), time.monotonic() + float(chosen))

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def error(self) -> HTTPError:
        return HTTPError(
            408,
            f"timeout: the request did not finish within its deadline of {self.timeout_s:g}s and was aborted",
            "timeout",
            "timeout",
        )


async def within(call: Awaitable[T], deadline: Deadline | None) -> T:
    """Await `call` until `deadline` (cancelling it when the deadline passes: a 408 `HTTPError`)."""
    if deadline is None:
        return await call
    try:
        return await asyncio.wait_for(call, deadline.remaining())
    except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
        raise deadline.error() from None
