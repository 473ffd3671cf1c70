"""Python client SDK for the entropyinfer HTTP API: `Client` (sync) and `AsyncClient`.

    from entropyinfer import Client
    client = Client("http://127.0.0.1:8000")
    job = client.submit([Path("a.txt"), "an inline document"], question="What is it about?")
    client.wait(job)                         # progress bar on a terminal (the job or its id)
    for r in client.results(job):
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
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Literal

import httpx
from typing_extensions import Unpack

from entropyinfer.cluster.client_core import (
    DEFAULT_URL,
    NOT_SENT,
    Core,
    Document,
    Messages,
    Payload,
    ProgressBar,
    job_id_of,
    transport_error,
)
from entropyinfer.cluster.client_types import (
    APIError,
    AuthenticationError,
    BadRequestError,
    Body,
    ClientError,
    Completion,
    ConflictError,
    ConnectionFailed,
    DeadlineExceededError,
    JobFailedError,
    JobOptions,
    JobRef,
    JobResult,
    JobStatus,
    NotFoundError,
    RequestTimeout,
    ServerError,
)

__all__ = [  # the SDK's errors and results, importable from here too
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ClientError",
    "Completion",
    "ConflictError",
    "ConnectionFailed",
    "DeadlineExceededError",
    "JobFailedError",
    "JobRef",
    "JobResult",
    "JobStatus",
    "NotFoundError",
    "RequestTimeout",
    "ServerError",
]


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
        self._core = Core(url, api_key, timeout, retries, backoff_s, wire_format)
        self._http = httpx.Client(timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, payload: Payload | None = None, *, safe: bool) -> Body:
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
                if not (safe or isinstance(e, NOT_SENT)) or attempt >= self._core.retries:
                    raise transport_error(method, self._core.url + path, e) from e
            time.sleep(self._core.retry_delay(attempt, resp))
            attempt += 1

    # jobs

    def submit(
        self, documents: Iterable[Document], question: str | None = None, **options: Unpack[JobOptions]
    ) -> JobStatus:
        """Submit a batch of documents with one question (or several, `questions=`, each asked of every
        document); `options` are sampling parameters, `policy` and `idempotency_key` (JobOptions)."""
        payload, _ = self._core.job_payload(documents, question, options)
        return JobStatus.from_dict(self._request("POST", "/v1/jobs", payload, safe=True))

    def status(self, job: JobRef) -> JobStatus:
        job_id = job_id_of(job)
        return JobStatus.from_dict(self._request("GET", f"/v1/jobs/{job_id}", safe=True))

    def results(self, job: JobRef) -> list[JobResult]:
        job_id = job_id_of(job)
        body = self._request("GET", f"/v1/jobs/{job_id}/results", safe=True)
        return [JobResult.from_dict(r) for r in body["results"]]

    def cancel(self, job: JobRef) -> JobStatus:
        job_id = job_id_of(job)
        return JobStatus.from_dict(self._request("DELETE", f"/v1/jobs/{job_id}", safe=True))

    def wait(
        self,
        job: JobRef,
        *,
        progress: bool | None = None,
        poll_s: float = 0.5,
        timeout: float | None = None,
        raise_on_failure: bool = True,
    ) -> JobStatus:
        """Poll until the job finishes; a tqdm bar of prefill tokens (on by default only on a TTY)."""
        job_id = job_id_of(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        with ProgressBar(progress) as bar:
            while True:
                status = self.status(job_id)
                bar.update(status)
                if status.finished:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {status.state} after {timeout}s")
                time.sleep(poll_s)
        if status.state == "failed" and raise_on_failure:
            raise JobFailedError(status)
        return status

    def run(
        self,
        documents: Iterable[Document],
        question: str,
        *,
        progress: bool | None = None,
        **options: Unpack[JobOptions],
    ) -> list[JobResult]:
        """Submit, wait and fetch the results in one call."""
        job = self.submit(documents, question, **options)
        self.wait(job, progress=progress)
        return self.results(job)

    # OpenAI-compatible endpoints

    def complete(self, prompt: str, **params: object) -> Completion:
        body = self._request("POST", "/v1/completions", {"prompt": prompt, **params}, safe=False)
        return self._core.completion(body, chat=False)

    def chat(self, messages: Messages, **params: object) -> Completion:
        body = self._request(
            "POST", "/v1/chat/completions", {"messages": list(messages), **params}, safe=False
        )
        return self._core.completion(body, chat=True)

    def stream(self, prompt: str | Messages, **params: object) -> Iterator[str]:
        """Text deltas of a streaming completion (chat when `prompt` is a message list)."""
        path, chat, payload = self._core.stream_payload(prompt, params)
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
            raise transport_error("POST", self._core.url + path, e) from e

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/v1/models", safe=True)["data"]]

    def health(self) -> dict[str, object]:
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
        self._core = Core(url, api_key, timeout, retries, backoff_s, wire_format)
        self._http = httpx.AsyncClient(timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, payload: Payload | None = None, *, safe: bool) -> Body:
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
                if not (safe or isinstance(e, NOT_SENT)) or attempt >= self._core.retries:
                    raise transport_error(method, self._core.url + path, e) from e
            await asyncio.sleep(self._core.retry_delay(attempt, resp))
            attempt += 1

    async def submit(
        self, documents: Iterable[Document], question: str | None = None, **options: Unpack[JobOptions]
    ) -> JobStatus:
        payload, _ = self._core.job_payload(documents, question, options)
        return JobStatus.from_dict(await self._request("POST", "/v1/jobs", payload, safe=True))

    async def status(self, job: JobRef) -> JobStatus:
        job_id = job_id_of(job)
        return JobStatus.from_dict(await self._request("GET", f"/v1/jobs/{job_id}", safe=True))

    async def results(self, job: JobRef) -> list[JobResult]:
        job_id = job_id_of(job)
        body = await self._request("GET", f"/v1/jobs/{job_id}/results", safe=True)
        return [JobResult.from_dict(r) for r in body["results"]]

    async def cancel(self, job: JobRef) -> JobStatus:
        job_id = job_id_of(job)
        return JobStatus.from_dict(await self._request("DELETE", f"/v1/jobs/{job_id}", safe=True))

    async def wait(
        self,
        job: JobRef,
        *,
        progress: bool | None = None,
        poll_s: float = 0.5,
        timeout: float | None = None,
        raise_on_failure: bool = True,
    ) -> JobStatus:
        job_id = job_id_of(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        with ProgressBar(progress) as bar:
            while True:
                status = await self.status(job_id)
                bar.update(status)
                if status.finished:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {status.state} after {timeout}s")
                await asyncio.sleep(poll_s)
        if status.state == "failed" and raise_on_failure:
            raise JobFailedError(status)
        return status

    async def run(
        self,
        documents: Iterable[Document],
        question: str,
        *,
        progress: bool | None = None,
        **options: Unpack[JobOptions],
    ) -> list[JobResult]:
        job = await self.submit(documents, question, **options)
        await self.wait(job, progress=progress)
        return await self.results(job)

    async def complete(self, prompt: str, **params: object) -> Completion:
        body = await self._request("POST", "/v1/completions", {"prompt": prompt, **params}, safe=False)
        return self._core.completion(body, chat=False)

    async def chat(self, messages: Messages, **params: object) -> Completion:
        payload = {"messages": list(messages), **params}
        body = await self._request("POST", "/v1/chat/completions", payload, safe=False)
        return self._core.completion(body, chat=True)

    async def stream(self, prompt: str | Messages, **params: object) -> AsyncIterator[str]:
        path, chat, payload = self._core.stream_payload(prompt, params)
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
            raise transport_error("POST", self._core.url + path, e) from e

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._request("GET", "/v1/models", safe=True))["data"]]

    async def health(self) -> dict[str, object]:
        return dict(await self._request("GET", "/healthz", safe=True))
