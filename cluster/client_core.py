"""What `Client` and `AsyncClient` share (cluster/client.py): request bodies and headers, answers parsed
into bodies or `APIError`s, retry delays, SSE lines of a streamed completion, the progress bar of `wait`.
"""

from __future__ import annotations

import json
import os
import random
import sys
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NoReturn, cast

import httpx

from entropyinfer.cluster import wire
from entropyinfer.cluster.client_types import (
    Body,
    ClientError,
    Completion,
    ConnectionFailed,
    JobOptions,
    JobStatus,
    RequestTimeout,
    api_error,
)

if TYPE_CHECKING:
    from tqdm import tqdm

DEFAULT_URL = "http://127.0.0.1:8000"
Document = str | bytes | os.PathLike[str]
Messages = Sequence[dict[str, str]]
Payload = dict[str, object]  # a request body (plain data: wire.encode takes it as JSON or msgpack)


class Core:
    """Settings, headers, bodies and answers of one client (sync or async)."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        timeout: float,
        retries: int,
        backoff_s: float,
        wire_format: Literal["msgpack", "json"],
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("ENTROPYINFER_API_KEY")
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self.fmt: wire.Format = wire_format

    def headers(self, body: bool) -> dict[str, str]:
        h = {"Accept": wire.media_type(self.fmt)}
        if body:
            h["Content-Type"] = wire.media_type(self.fmt)
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def encode(self, payload: Payload) -> bytes:
        return wire.encode(payload, self.fmt)

    def job_payload(
        self, documents: Iterable[Document], question: str | None, options: JobOptions
    ) -> tuple[Payload, str]:
        """The body of a job submission and its idempotency key (made here when not given: a retry of
        the same body never creates a second job)."""
        opts: dict[str, object] = dict(options)
        key = str(opts.pop("idempotency_key", None) or uuid.uuid4().hex)
        payload: Payload = {"documents": [self._document(d) for d in documents], "idempotency_key": key}
        if question is not None:
            payload["question"] = question
        if opts.get("questions") is not None:
            payload["questions"] = list(cast(Sequence[str], opts.pop("questions")))
        payload.update({k: v for k, v in opts.items() if v is not None})
        return payload, key

    @staticmethod
    def stream_payload(prompt: str | Messages, params: dict[str, object]) -> tuple[str, bool, Payload]:
        """(path, chat, body) of a streaming completion: chat when `prompt` is a message list."""
        if isinstance(prompt, str):
            return "/v1/completions", False, {"prompt": prompt, **params, "stream": True}
        return "/v1/chat/completions", True, {"messages": list(prompt), **params, "stream": True}

    def _document(self, doc: Document) -> str | bytes | dict[str, str | bytes]:
        if isinstance(doc, str):
            return doc
        if isinstance(doc, bytes):
            return doc if self.fmt == "msgpack" else doc.decode("utf-8")
        path = Path(doc)
        data = path.read_bytes()
        text: str | bytes = data if self.fmt == "msgpack" else data.decode("utf-8")
        return {"name": path.name, "text": text}

    @staticmethod
    def parse(resp: httpx.Response) -> Body:
        """The decoded body of an answer (an object); an error answer raises its APIError."""
        ctype = resp.headers.get("content-type", "")
        try:
            body: object = wire.decode(resp.content, wire.format_of(ctype)) if resp.content else None
        except wire.WireError:
            body = resp.text
        if resp.status_code >= 400:
            raise api_error(resp.status_code, body)
        if not isinstance(body, dict):
            raise ClientError(f"HTTP {resp.status_code}: expected an object, got {str(body)[:200]!r}")
        return body

    def retry_delay(self, attempt: int, resp: httpx.Response | None) -> float:
        if resp is not None:
            after = resp.headers.get("retry-after")
            if after:
                try:
                    return min(float(after), 30.0)
                except ValueError:
                    pass
        return min(self.backoff_s * 2**attempt, 10.0) * (0.5 + random.random() / 2)

    @staticmethod
    def completion(body: Body, chat: bool) -> Completion:
        choice = body["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        return Completion(
            text, choice.get("finish_reason"), body.get("usage", {}), body.get("entropyinfer", {}), body
        )

    @staticmethod
    def sse_delta(line: str, chat: bool) -> str | None:
        """The text of one SSE `data:` line; None for [DONE] and non-data lines; raises on an error event."""
        if not line.startswith("data:"):
            return ""
        data = line[5:].strip()
        if data == "[DONE]":
            return None
        event = json.loads(data)
        if "error" in event:
            raise api_error(int(event["error"].get("code") or 500), event)
        if not event.get("choices"):
            return ""
        choice = event["choices"][0]
        return (
            str((choice.get("delta") or {}).get("content") or "") if chat else str(choice.get("text") or "")
        )


def job_id_of(job: object) -> str:
    """The id of `job`: a job id string or the `JobStatus` that `submit`, `status` or `wait` returned;
    anything else is a TypeError that says what to pass."""
    if isinstance(job, JobStatus):
        return job.id
    if isinstance(job, str):
        if not job:
            raise ValueError("job id must not be empty")
        return job
    raise TypeError(
        f"expected a job id (str) or the JobStatus that submit() returned, got {type(job).__name__}: "
        f"{str(job)[:80]!r}"
    )


# Transport errors after which the request surely did not reach the server: retried for every call.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def transport_error(method: str, url: str, e: httpx.TransportError) -> ConnectionFailed:
    cls = RequestTimeout if isinstance(e, httpx.TimeoutException) else ConnectionFailed
    return cls(f"{method} {url}: {type(e).__name__}: {e}")


def _is_tty() -> bool:
    return sys.stderr.isatty()


class ProgressBar:
    """A tqdm bar over prefill tokens with documents done/total; disabled off a TTY by default."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = _is_tty() if enabled is None else enabled
        self.bar: tqdm[NoReturn] | None = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, job: JobStatus) -> None:
        if not self.enabled:
            return
        bar = self.bar
        if bar is None:
            from tqdm.auto import tqdm

            bar = self.bar = tqdm(
                total=job.prefill_tokens_total, unit="tok", unit_scale=True, desc=job.id[:16]
            )
        bar.total = job.prefill_tokens_total
        bar.n = job.prefill_tokens_done
        bar.set_postfix_str(f"docs {job.documents_done}/{job.documents_total} {job.state}", refresh=False)
        bar.refresh()
