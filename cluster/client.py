"""Python client SDK for the entropyinfer HTTP API: `Client` (sync) and `AsyncClient`.

    from entropyinfer import Client
    client = Client("http://127.0.0.1:8000")
    job = client.submit([Path("a.txt"), "an inline document"], question="What is it about?")
    client.wait(job.id)                      # progress bar on a terminal
    for r in client.results(job.id):
        print(r.document_name, r.text)

Documents may be paths (`os.PathLike`; read as bytes), strings (the text itself) or bytes (UTF-8).
Bodies go as msgpack by default. 503 answers and transport errors (connect, read, write, pool, timeouts)
are retried with exponential backoff for idempotent calls (reads, cancel, and job submission, which reuses
its idempotency key across retries, so a retry never creates a second job); a completion is retried only
when it cannot have reached the server. Errors the server reports raise `APIError` subclasses carrying
its message, type and field; transport errors raise `ConnectionFailed` (`RequestTimeout` for timeouts).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from entropyinfer.cluster import wire
from entropyinfer.errors import EntropyInferError

DEFAULT_URL = "http://127.0.0.1:8000"
Document = str | bytes | os.PathLike[str]
Messages = Sequence[dict[str, str]]


# ---- errors -------------------------------------------------------------------------------------


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


def _api_error(status: int, body: Any) -> APIError:
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
    elif status == 409:
        cls = ConflictError
    elif status >= 500:
        cls = ServerError
    else:
        cls = APIError
    return cls(status, message, typ, fld)


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
    def from_dict(cls, d: dict[str, Any]) -> JobStatus:
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


@dataclass(frozen=True)
class JobResult:
    document_index: int
    document_name: str | None
    question_index: int
    question: str
    text: str | None
    finish_reason: str | None
    error: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobResult:
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
    usage: dict[str, int]
    stats: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)


# ---- request building shared by both clients ----------------------------------------------------


class _Core:
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

    def encode(self, payload: dict[str, Any]) -> bytes:
        return wire.encode(payload, self.fmt)

    def job_payload(
        self,
        documents: Iterable[Document],
        question: str | None,
        questions: Sequence[str] | None,
        idempotency_key: str,
        params: dict[str, Any],
    ) -> dict[str, Any]:
        docs = [self._document(d) for d in documents]
        payload: dict[str, Any] = {"documents": docs, "idempotency_key": idempotency_key}
        if question is not None:
            payload["question"] = question
        if questions is not None:
            payload["questions"] = list(questions)
        payload.update({k: v for k, v in params.items() if v is not None})
        return payload

    def _document(self, doc: Document) -> Any:
        if isinstance(doc, str):
            return doc
        if isinstance(doc, bytes):
            return doc if self.fmt == "msgpack" else doc.decode("utf-8")
        path = Path(doc)
        data = path.read_bytes()
        text: str | bytes = data if self.fmt == "msgpack" else data.decode("utf-8")
        return {"name": path.name, "text": text}

    @staticmethod
    def parse(resp: httpx.Response) -> Any:
        ctype = resp.headers.get("content-type", "")
        try:
            body: Any = wire.decode(resp.content, wire.format_of(ctype)) if resp.content else None
        except wire.WireError:
            body = resp.text
        if resp.status_code >= 400:
            raise _api_error(resp.status_code, body)
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
    def completion(body: dict[str, Any], chat: bool) -> Completion:
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
            raise _api_error(int(event["error"].get("code") or 500), event)
        if not event.get("choices"):
            return ""
        choice = event["choices"][0]
        return (
            str((choice.get("delta") or {}).get("content") or "") if chat else str(choice.get("text") or "")
        )


# Transport errors after which the request surely did not reach the server: retried for every call.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _transport_error(method: str, url: str, e: httpx.TransportError) -> ConnectionFailed:
    cls = RequestTimeout if isinstance(e, httpx.TimeoutException) else ConnectionFailed
    return cls(f"{method} {url}: {type(e).__name__}: {e}")


def _is_tty() -> bool:
    return sys.stderr.isatty()


# ---- the synchronous client ---------------------------------------------------------------------


class Client:
    """Synchronous client. Use as a context manager or call `close()`."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 300.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        wire_format: Literal["msgpack", "json"] = "msgpack",
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._core = _Core(url, api_key, timeout, retries, backoff_s, wire_format)
        self._http = httpx.Client(timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None, *, safe: bool) -> Any:
        """`safe`: the request may be repeated after a transport error (GET, DELETE, keyed submit)."""
        content = self._core.encode(payload) if payload is not None else None
        attempt = 0
        while True:
            resp = None
            try:
                resp = self._http.request(
                    method,
                    self._core.url + path,
                    content=content,
                    headers=self._core.headers(content is not None),
                )
                if resp.status_code != 503 or attempt >= self._core.retries:
                    return self._core.parse(resp)
            except httpx.TransportError as e:
                if not (safe or isinstance(e, _NOT_SENT)) or attempt >= self._core.retries:
                    raise _transport_error(method, self._core.url + path, e) from e
            time.sleep(self._core.retry_delay(attempt, resp))
            attempt += 1

    # jobs

    def submit(
        self,
        documents: Iterable[Document],
        question: str | None = None,
        *,
        questions: Sequence[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        policy: str | None = None,
        idempotency_key: str | None = None,
    ) -> JobStatus:
        """Submit a batch of documents with one question (or several, each asked of every document)."""
        key = idempotency_key or uuid.uuid4().hex
        params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        params["top_k"] = top_k
        params.update({"seed": seed, "stop": stop, "policy": policy})
        payload = self._core.job_payload(documents, question, questions, key, params)
        return JobStatus.from_dict(self._request("POST", "/v1/jobs", payload, safe=True))

    def status(self, job_id: str) -> JobStatus:
        return JobStatus.from_dict(self._request("GET", f"/v1/jobs/{job_id}", safe=True))

    def results(self, job_id: str) -> list[JobResult]:
        body = self._request("GET", f"/v1/jobs/{job_id}/results", safe=True)
        return [JobResult.from_dict(r) for r in body["results"]]

    def cancel(self, job_id: str) -> JobStatus:
        return JobStatus.from_dict(self._request("DELETE", f"/v1/jobs/{job_id}", safe=True))

    def wait(
        self,
        job_id: str,
        *,
        progress: bool | None = None,
        poll_s: float = 0.5,
        timeout: float | None = None,
        raise_on_failure: bool = True,
    ) -> JobStatus:
        """Poll until the job finishes; a tqdm bar of prefill tokens (on by default only on a TTY)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with _Progress(progress) as bar:
            while True:
                job = self.status(job_id)
                bar.update(job)
                if job.finished:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job.state} after {timeout}s")
                time.sleep(poll_s)
        if job.state == "failed" and raise_on_failure:
            raise JobFailedError(job)
        return job

    def run(
        self, documents: Iterable[Document], question: str, *, progress: bool | None = None, **params: Any
    ) -> list[JobResult]:
        """Submit, wait and fetch the results in one call."""
        job = self.submit(documents, question, **params)
        self.wait(job.id, progress=progress)
        return self.results(job.id)

    # OpenAI-compatible endpoints

    def complete(self, prompt: str, **params: Any) -> Completion:
        body = self._request("POST", "/v1/completions", {"prompt": prompt, **params}, safe=False)
        return self._core.completion(body, chat=False)

    def chat(self, messages: Messages, **params: Any) -> Completion:
        body = self._request(
            "POST", "/v1/chat/completions", {"messages": list(messages), **params}, safe=False
        )
        return self._core.completion(body, chat=True)

    def stream(self, prompt: str | Messages, **params: Any) -> Iterator[str]:
        """Text deltas of a streaming completion (chat when `prompt` is a message list)."""
        chat = not isinstance(prompt, str)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        payload = {("messages" if chat else "prompt"): prompt if not chat else list(prompt), **params}
        payload["stream"] = True
        headers = self._core.headers(True)
        content = self._core.encode(payload)
        try:
            with self._http.stream("POST", self._core.url + path, content=content, headers=headers) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._core.parse(resp)
                for line in resp.iter_lines():
                    delta = self._core.sse_delta(line, chat)
                    if delta is None:
                        return
                    if delta:
                        yield delta
        except httpx.TransportError as e:
            raise _transport_error("POST", self._core.url + path, e) from e

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/v1/models", safe=True)["data"]]

    def health(self) -> dict[str, Any]:
        return dict(self._request("GET", "/healthz", safe=True))


# ---- the asynchronous client --------------------------------------------------------------------


class AsyncClient:
    """The same API as `Client`, with coroutines (and an async iterator for `stream`)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 300.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        wire_format: Literal["msgpack", "json"] = "msgpack",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._core = _Core(url, api_key, timeout, retries, backoff_s, wire_format)
        self._http = httpx.AsyncClient(timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self, method: str, path: str, payload: dict[str, Any] | None = None, *, safe: bool
    ) -> Any:
        content = self._core.encode(payload) if payload is not None else None
        attempt = 0
        while True:
            resp = None
            try:
                resp = await self._http.request(
                    method,
                    self._core.url + path,
                    content=content,
                    headers=self._core.headers(content is not None),
                )
                if resp.status_code != 503 or attempt >= self._core.retries:
                    return self._core.parse(resp)
            except httpx.TransportError as e:
                if not (safe or isinstance(e, _NOT_SENT)) or attempt >= self._core.retries:
                    raise _transport_error(method, self._core.url + path, e) from e
            await asyncio.sleep(self._core.retry_delay(attempt, resp))
            attempt += 1

    async def submit(
        self,
        documents: Iterable[Document],
        question: str | None = None,
        *,
        questions: Sequence[str] | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> JobStatus:
        key = idempotency_key or uuid.uuid4().hex
        payload = self._core.job_payload(documents, question, questions, key, params)
        return JobStatus.from_dict(await self._request("POST", "/v1/jobs", payload, safe=True))

    async def status(self, job_id: str) -> JobStatus:
        return JobStatus.from_dict(await self._request("GET", f"/v1/jobs/{job_id}", safe=True))

    async def results(self, job_id: str) -> list[JobResult]:
        body = await self._request("GET", f"/v1/jobs/{job_id}/results", safe=True)
        return [JobResult.from_dict(r) for r in body["results"]]

    async def cancel(self, job_id: str) -> JobStatus:
        return JobStatus.from_dict(await self._request("DELETE", f"/v1/jobs/{job_id}", safe=True))

    async def wait(
        self,
        job_id: str,
        *,
        progress: bool | None = None,
        poll_s: float = 0.5,
        timeout: float | None = None,
        raise_on_failure: bool = True,
    ) -> JobStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        with _Progress(progress) as bar:
            while True:
                job = await self.status(job_id)
                bar.update(job)
                if job.finished:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job.state} after {timeout}s")
                await asyncio.sleep(poll_s)
        if job.state == "failed" and raise_on_failure:
            raise JobFailedError(job)
        return job

    async def run(
        self, documents: Iterable[Document], question: str, *, progress: bool | None = None, **params: Any
    ) -> list[JobResult]:
        job = await self.submit(documents, question, **params)
        await self.wait(job.id, progress=progress)
        return await self.results(job.id)

    async def complete(self, prompt: str, **params: Any) -> Completion:
        body = await self._request("POST", "/v1/completions", {"prompt": prompt, **params}, safe=False)
        return self._core.completion(body, chat=False)

    async def chat(self, messages: Messages, **params: Any) -> Completion:
        payload = {"messages": list(messages), **params}
        body = await self._request("POST", "/v1/chat/completions", payload, safe=False)
        return self._core.completion(body, chat=True)

    async def stream(self, prompt: str | Messages, **params: Any) -> AsyncIterator[str]:
        chat = not isinstance(prompt, str)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        payload = {("messages" if chat else "prompt"): prompt if not chat else list(prompt), **params}
        payload["stream"] = True
        headers = self._core.headers(True)
        content = self._core.encode(payload)
        try:
            async with self._http.stream(
                "POST", self._core.url + path, content=content, headers=headers
            ) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    self._core.parse(resp)
                async for line in resp.aiter_lines():
                    delta = self._core.sse_delta(line, chat)
                    if delta is None:
                        return
                    if delta:
                        yield delta
        except httpx.TransportError as e:
            raise _transport_error("POST", self._core.url + path, e) from e

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._request("GET", "/v1/models", safe=True))["data"]]

    async def health(self) -> dict[str, Any]:
        return dict(await self._request("GET", "/healthz", safe=True))


class _Progress:
    """A tqdm bar over prefill tokens with documents done/total; disabled off a TTY by default."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = _is_tty() if enabled is None else enabled
        self.bar: Any = None

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, job: JobStatus) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=job.prefill_tokens_total, unit="tok", unit_scale=True, desc=job.id[:16])
        self.bar.total = job.prefill_tokens_total
        self.bar.n = job.prefill_tokens_done
        self.bar.set_postfix_str(
            f"docs {job.documents_done}/{job.documents_total} {job.state}", refresh=False
        )
        self.bar.refresh()
