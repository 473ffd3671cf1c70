"""Timeouts and cancellation over real HTTP (the session's Serve app, real SmolLM2 on CPU; issue 14
item 5): a request's deadline (`timeout`, an extension field) aborts it with a 408 in OpenAI's error shape
(streaming: an error event, then the stream closes) and frees its KV pages and the shard; a client that
hangs up on a non-streaming request aborts its generation too. Each test prints a FIGURE line (-s).

(A disconnected stream and a cancelled job freeing their pages: tests/cluster/test_engine_http.py.)"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from entropyinfer.cluster.client import Client, DeadlineExceededError
from entropyinfer.cluster.config import LimitsConfig
from entropyinfer.cluster.deadline import Deadline
from entropyinfer.cluster.launcher import EmbeddedServer

from .conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
STORY = "Once upon a time, in a land far away,"
# 64 tokens whatever the model's end token: a generation of a few seconds on 2 CPU cores
LONG = {"prompt": STORY, "max_tokens": 64, "temperature": 0, "ignore_eos": True}


def _engine(server: EmbeddedServer) -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle("Engine", app_name=server.app_name)
    return dict(handle.status.remote().result(timeout_s=60))


def _cancelled(server: EmbeddedServer) -> int:
    return sum(int(s["cancelled"]) for s in _engine(server)["shards"])


def _freed(server: EmbeddedServer, cancelled_before: int, timeout_s: float = 30.0) -> dict[str, Any]:
    """The engine once the shard stopped a request early (its cancelled count went up), nothing runs or
    waits in its core and no KV page is in use; fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = _engine(server)
        shard = status["shards"][0]
        core = shard["engine_core"]
        idle = status["in_flight"] == 0 and shard["busy"] == 0
        free = (core["running"], core["waiting"], core["kv_pages_used"]) == (0, 0, 0)
        cancelled = sum(int(s["cancelled"]) for s in status["shards"]) > cancelled_before
        if (idle and free and cancelled) or time.monotonic() > deadline:
            assert cancelled, f"the generation was not aborted: {status}"
            assert idle and free, f"the request still holds the shard or KV pages: {status}"
            return status
        time.sleep(0.05)


def _full_generation_s(url: str) -> float:
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/completions", json=LONG, headers=AUTH, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 64, r.text
    return time.monotonic() - t0


def test_the_servers_default_deadline_applies_when_the_request_gives_none() -> None:
    assert Deadline.of(None, LimitsConfig()) is None  # no default: no deadline
    default = Deadline.of(None, LimitsConfig(request_timeout_s=30.0))
    assert default is not None and default.timeout_s == 30.0 and 29.0 < default.remaining() <= 30.0
    own = Deadline.of(2.0, LimitsConfig(request_timeout_s=30.0))  # the request's own wins
    assert own is not None and own.timeout_s == 2.0
    err = own.error()
    assert err.status == 408 and err.body()["error"]["type"] == "timeout"
    assert err.body()["error"]["param"] == "timeout"


@pytest.mark.serve
def test_a_request_past_its_deadline_is_a_408_and_frees_the_shard(server: EmbeddedServer) -> None:
    full_s = _full_generation_s(server.url)
    timeout = 0.3
    before = _cancelled(server)
    t0 = time.monotonic()
    r = httpx.post(
        server.url + "/v1/completions", json={**LONG, "timeout": timeout}, headers=AUTH, timeout=60
    )
    answered_s = time.monotonic() - t0
    assert r.status_code == 408, r.text
    error = r.json()["error"]
    assert error["type"] == "timeout" and error["param"] == "timeout" and error["code"] == 408
    assert "0.3s" in error["message"]
    status = _freed(server, before)
    freed_s = time.monotonic() - t0
    assert answered_s < full_s, (answered_s, full_s)
    print(
        f"FIGURE deadline: timeout {timeout}s -> 408 after {answered_s:.2f}s (the full generation takes "
        f"{full_s:.2f}s); shard idle, 0/{status['shards'][0]['engine_core']['kv_pages_total']} KV pages "
        f"in use {freed_s:.2f}s after the request"
    )
    # the shard serves the next request, and one within its deadline answers normally
    ok = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": STORY, "max_tokens": 2, "temperature": 0, "timeout": 60},
        headers=AUTH,
        timeout=60,
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


@pytest.mark.serve
def test_a_chat_past_its_deadline_through_the_openai_client_and_the_sdk(server: EmbeddedServer) -> None:
    openai = pytest.importorskip("openai")
    before = _cancelled(server)
    # max_retries 0: the openai client retries a 408 by default
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        oa.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "Tell me a long story."}],
            max_tokens=64,
            temperature=0,
            extra_body={"timeout": 0.3, "ignore_eos": True},
        )
    assert e.value.status_code == 408 and e.value.type == "timeout" and e.value.param == "timeout"
    _freed(server, before)
    before = _cancelled(server)
    with Client(server.url, api_key=API_KEY, retries=0) as client, pytest.raises(DeadlineExceededError):
        client.complete(STORY, max_tokens=64, temperature=0, ignore_eos=True, timeout=0.3)
    _freed(server, before)


@pytest.mark.serve
def test_a_stream_past_its_deadline_ends_with_an_error_event_and_frees_the_shard(
    server: EmbeddedServer,
) -> None:
    before = _cancelled(server)
    body = {**LONG, "stream": True, "timeout": 1.0}
    events: list[Any] = []
    t0 = time.monotonic()
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as resp:
        assert resp.status_code == 200  # accepted within the deadline: the 200 went out first
        for line in resp.iter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                events.append(data if data == "[DONE]" else json.loads(data))
    closed_s = time.monotonic() - t0
    assert events and "[DONE]" not in events, events[-3:]
    last = events[-1]
    assert last["error"]["code"] == 408 and last["error"]["type"] == "timeout", last
    tokens = [e for e in events[:-1] if e.get("choices")]
    assert len(tokens) < 64
    status = _freed(server, before)
    print(
        f"FIGURE deadline (stream): timeout 1.0s -> {len(tokens)} token events, then the 408 error event; "
        f"closed after {closed_s:.2f}s; shard idle, {status['shards'][0]['engine_core']['kv_pages_used']} "
        "KV pages in use"
    )


@pytest.mark.serve
def test_a_client_hanging_up_on_a_non_streaming_request_aborts_it(server: EmbeddedServer) -> None:
    before = _cancelled(server)
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.5 s and closes the connection
        httpx.post(
            server.url + "/v1/completions", json=LONG, headers=AUTH, timeout=httpx.Timeout(60, read=0.5)
        )
    status = _freed(server, before)
    print(
        f"FIGURE disconnect (non-streaming): client hung up at 0.5s; generation aborted, shard idle and "
        f"{status['shards'][0]['engine_core']['kv_pages_used']} KV pages in use "
        f"{time.monotonic() - t0:.2f}s after the request"
    )


@pytest.mark.parametrize("bad", [0, -1.5, "10", True, 10**9])
def test_a_bad_timeout_names_its_field(bad: Any) -> None:
    from pydantic import ValidationError

    from entropyinfer.cluster.schemas import ChatCompletionRequest, CompletionRequest, first_error

    for model, body in (
        (CompletionRequest, {"prompt": "x"}),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]}),
    ):
        with pytest.raises(ValidationError) as e:
            model.model_validate({**body, "timeout": bad})
        assert first_error(e.value)[0] == "timeout"
