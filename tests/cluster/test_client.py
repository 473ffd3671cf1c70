"""The client SDK against a mock transport: retries, idempotency keys, typed errors, SSE parsing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from entropyinfer.cluster import wire
from entropyinfer.cluster.client import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ClientError,
    ConnectionFailed,
    JobFailedError,
    NotFoundError,
    RequestTimeout,
    ServerError,
)


def _job(state: str = "queued", **kw: Any) -> dict[str, Any]:
    return {
        "id": "job-1",
        "state": state,
        "error": kw.get("error"),
        "progress": {
            "documents_done": kw.get("docs", 0),
            "documents_total": 2,
            "prefill_tokens_done": kw.get("done", 0),
            "prefill_tokens_total": 100,
        },
    }


def _reply(status: int, body: Any, fmt: wire.Format = "msgpack", **headers: str) -> httpx.Response:
    return httpx.Response(
        status, content=wire.encode(body, fmt), headers={"content-type": wire.media_type(fmt), **headers}
    )


def test_submit_retries_503_and_connection_errors_with_the_same_key(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["content-type"] == "application/msgpack"
        assert request.headers["authorization"] == "Bearer k"
        seen.append(wire.unpack(request.content))
        if len(seen) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(seen) == 2:
            return _reply(503, {"error": {"message": "busy", "type": "unavailable"}}, **{"retry-after": "0"})
        return _reply(201, _job())

    doc = tmp_path / "doc.txt"
    doc.write_text("from a file")
    with Client("http://x", api_key="k", backoff_s=0.001, transport=httpx.MockTransport(handler)) as c:
        job = c.submit([doc, "inline", b"raw bytes"], "what?", max_tokens=5, policy="dense")
    assert job.id == "job-1" and job.documents_total == 2
    assert len(seen) == 3 and len({s["idempotency_key"] for s in seen}) == 1
    body = seen[-1]
    assert body["documents"] == [{"name": "doc.txt", "text": b"from a file"}, "inline", b"raw bytes"]
    assert body["question"] == "what?" and body["max_tokens"] == 5 and body["policy"] == "dense"
    assert "temperature" not in body


def test_both_clients_send_the_same_job_body_with_every_option() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return _reply(201, _job(), "json")

    options: dict[str, Any] = {"questions": ["q1", "q2"], "top_k": 5, "stop": ["."], "seed": 3}
    with Client("http://x", wire_format="json", transport=httpx.MockTransport(handler)) as c:
        c.submit(["doc", b"bytes"], idempotency_key="key-1", **options)

    async def submit_async() -> None:
        transport = httpx.MockTransport(handler)
        async with AsyncClient("http://x", wire_format="json", transport=transport) as c:
            await c.submit(["doc", b"bytes"], idempotency_key="key-1", **options)

    asyncio.run(submit_async())
    expected = {"documents": ["doc", "bytes"], "idempotency_key": "key-1", **options}
    assert bodies == [expected, expected]


def test_an_answer_that_is_not_an_object_is_a_client_error() -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(200, text="<html>proxy</html>"))
    with Client("http://x", transport=transport) as c, pytest.raises(ClientError) as e:
        c.status("job-1")
    assert "expected an object" in str(e.value) and "proxy" in str(e.value)


def test_retries_give_up() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("refused", request=request)

    transport = httpx.MockTransport(handler)
    with (
        Client("http://x", retries=2, backoff_s=0.001, transport=transport) as c,
        pytest.raises(ConnectionFailed),
    ):
        c.status("job-1")
    assert calls == 3

    with Client(
        "http://x", retries=1, backoff_s=0.001, transport=httpx.MockTransport(lambda r: _reply(503, {}))
    ) as c:
        with pytest.raises(ServerError) as e:
            c.status("job-1")
        assert e.value.status == 503


@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, BadRequestError), (413, BadRequestError), (401, AuthenticationError), (404, NotFoundError)],
)
def test_typed_errors_carry_the_server_message(status: int, cls: type[Exception]) -> None:
    body = {
        "error": {
            "message": "temperature: must be >= 0",
            "type": "invalid_request_error",
            "field": "temperature",
        }
    }
    transport = httpx.MockTransport(lambda r: _reply(status, body, "json"))
    with Client("http://x", transport=transport) as c, pytest.raises(cls) as e:
        c.complete("hi", temperature=-1)
    assert e.value.message == "temperature: must be >= 0"  # type: ignore[attr-defined]
    assert e.value.field == "temperature"  # type: ignore[attr-defined]
    assert e.value.status == status  # type: ignore[attr-defined]


def test_wait_polls_until_finished_and_raises_on_failure() -> None:
    states = iter([_job("queued"), _job("running", done=50, docs=1), _job("succeeded", done=100, docs=2)])
    transport = httpx.MockTransport(lambda r: _reply(200, next(states)))
    with Client("http://x", transport=transport) as c:
        job = c.wait("job-1", poll_s=0.001, progress=True)
    assert job.state == "succeeded" and job.prefill_tokens_done == 100

    transport = httpx.MockTransport(lambda r: _reply(200, _job("failed", error="worker lost")))
    with Client("http://x", transport=transport) as c, pytest.raises(JobFailedError) as e:
        c.wait("job-1", poll_s=0.001)
    assert e.value.job.error == "worker lost"


def test_json_wire_and_stream_parsing() -> None:
    chunks = [{"choices": [{"text": "Hel"}]}, {"choices": [{"text": "lo"}]}, {"choices": []}]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["content-type"] == "application/json"
        body = json.loads(request.content)
        assert body["stream"] is True and body["prompt"] == "hi"
        return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})

    with Client("http://x", wire_format="json", transport=httpx.MockTransport(handler)) as c:
        assert "".join(c.stream("hi", max_tokens=2)) == "Hello"

    error_sse = 'data: {"error": {"message": "cancelled", "type": "cancelled", "code": 499}}\n\n'
    transport = httpx.MockTransport(lambda r: httpx.Response(200, content=error_sse.encode()))
    with Client("http://x", transport=transport) as c, pytest.raises(Exception, match="cancelled"):
        list(c.stream([{"role": "user", "content": "hi"}]))


def test_async_client() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        if request.method == "POST":
            return _reply(201, _job())
        if request.url.path.endswith("/results"):
            row = {
                "document_index": 0,
                "question_index": 0,
                "question": "q",
                "text": "a",
                "finish_reason": "stop",
            }
            return _reply(200, {"results": [row]})
        return _reply(200, _job("succeeded", done=100, docs=2))

    async def scenario() -> None:
        async with AsyncClient("http://x", transport=httpx.MockTransport(handler)) as c:
            results = await c.run(["d1", "d2"], "q", progress=False)
            assert results[0].text == "a" and results[0].stats == {}

    asyncio.run(scenario())
    assert calls == ["POST /v1/jobs", "GET /v1/jobs/job-1", "GET /v1/jobs/job-1/results"]


def _failing_then_ok(errors: list[type[httpx.TransportError]]) -> tuple[httpx.MockTransport, list[str]]:
    """Raises each error in turn, then answers with a job."""
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]("boom", request=request)
        return _reply(200, _job())

    return httpx.MockTransport(handler), calls


@pytest.mark.parametrize(
    "error", [httpx.ReadTimeout, httpx.WriteError, httpx.WriteTimeout, httpx.PoolTimeout, httpx.ReadError]
)
def test_idempotent_calls_retry_every_transport_error(error: type[httpx.TransportError]) -> None:
    transport, calls = _failing_then_ok([error, error])
    with Client("http://x", retries=2, backoff_s=0.001, transport=transport) as c:
        assert c.status("job-1").state == "queued"
    assert len(calls) == 3
    transport, calls = _failing_then_ok([error])
    with Client("http://x", retries=2, backoff_s=0.001, transport=transport) as c:
        assert c.submit(["doc"], "q?").id == "job-1"  # keyed submission: safe to repeat
    assert calls == ["POST", "POST"]


@pytest.mark.parametrize(
    ("error", "cls"),
    [
        (httpx.ReadTimeout, RequestTimeout),
        (httpx.WriteError, ConnectionFailed),
        (httpx.PoolTimeout, RequestTimeout),
    ],
)
def test_transport_errors_are_typed_after_retries(
    error: type[httpx.TransportError], cls: type[Exception]
) -> None:
    transport, calls = _failing_then_ok([error] * 10)
    with Client("http://x", retries=2, backoff_s=0.001, transport=transport) as c, pytest.raises(cls):
        c.cancel("job-1")
    assert len(calls) == 3


def test_a_completion_is_not_repeated_once_it_may_have_reached_the_server() -> None:
    transport, calls = _failing_then_ok([httpx.ReadTimeout])
    with (
        Client("http://x", retries=3, backoff_s=0.001, transport=transport) as c,
        pytest.raises(RequestTimeout),
    ):
        c.complete("hi")
    assert len(calls) == 1
    transport, calls = _failing_then_ok([httpx.PoolTimeout])  # never sent: retried
    with (
        Client("http://x", retries=3, backoff_s=0.001, transport=transport) as c,
        pytest.raises(KeyError),  # the mock answers with a job, not a completion: it was sent again
    ):
        c.complete("hi")
    assert len(calls) == 2


def test_async_client_retries_and_types_transport_errors() -> None:
    async def scenario() -> None:
        transport, calls = _failing_then_ok([httpx.ReadTimeout, httpx.WriteError])
        async with AsyncClient("http://x", retries=2, backoff_s=0.001, transport=transport) as c:
            assert (await c.status("job-1")).state == "queued"
        assert len(calls) == 3
        transport, calls = _failing_then_ok([httpx.ReadTimeout] * 5)
        async with AsyncClient("http://x", retries=1, backoff_s=0.001, transport=transport) as c:
            with pytest.raises(RequestTimeout):
                await c.results("job-1")

    asyncio.run(scenario())


def test_stream_transport_errors_are_typed() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset", request=request)

    with Client("http://x", transport=httpx.MockTransport(handler)) as c, pytest.raises(ConnectionFailed):
        list(c.stream("hi"))
