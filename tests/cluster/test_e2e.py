"""The Serve application over real HTTP on 127.0.0.1, with a real local Ray and the real SmolLM2 model.

Prompts are short and max_tokens small: the whole module runs in about a minute on 2 CPU cores.
The restart test is last (tests run in file order): it redeploys the app.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import pytest
from fastapi.routing import APIRoute

from entropyinfer.cluster.client import AuthenticationError, Client, ConflictError, NotFoundError
from entropyinfer.cluster.config import JobsConfig
from entropyinfer.cluster.ingress import PUBLIC_PATHS
from entropyinfer.cluster.ingress import app as ingress_app
from entropyinfer.cluster.job_worker import build_prompt
from entropyinfer.cluster.launcher import EmbeddedServer
from entropyinfer.shard.llm import LLM
from entropyinfer.shard.sampling import SamplingParams

from .conftest import API_KEY

pytestmark = [pytest.mark.serve, pytest.mark.slow]

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "The capital of France is"
STORY = "Once upon a time, in a land far away,"  # greedy SmolLM2 writes all 64 tokens: a long generation
FINISHED: dict[str, str] = {}  # a job the batch test finished, read again after the restart
DOCS = [
    "The Eiffel Tower is in Paris. It was finished in 1889 for the World's Fair.",
    "Mount Fuji is the highest mountain in Japan, at 3,776 metres.",
]


@pytest.fixture(scope="module")
def url(server: EmbeddedServer) -> str:
    return server.url


@pytest.fixture
def client(url: str) -> Iterator[Client]:
    with Client(url, api_key=API_KEY, retries=2, backoff_s=0.2) as c:
        yield c


def _offline(llm: LLM, prompt: str | list[dict[str, str]], max_tokens: int, policy: str = "dense") -> str:
    """What the same model answers through the Python API, greedily: what the server must answer."""
    return llm.generate(prompt, SamplingParams(max_tokens=max_tokens), policy=policy)[0].text


def _engine_status(server: EmbeddedServer) -> dict[str, Any]:
    """The engine replica's live counters: requests in flight, and per shard busy/cancelled."""
    from ray import serve

    handle = serve.get_deployment_handle("Engine", app_name=server.app_name)
    return dict(handle.status.remote().result(timeout_s=60))


def _cancelled(status: dict[str, Any]) -> int:
    return sum(int(s["cancelled"]) for s in status["shards"])


def _wait_for_cancel(server: EmbeddedServer, before: int, timeout_s: float = 30.0) -> dict[str, Any]:
    """Wait until the model stopped a request early (the shard's cancelled count went up) and nothing
    is in flight any more; fails after `timeout_s` (a generation left running ends with `length`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = _engine_status(server)
        idle = status["in_flight"] == 0 and all(s["busy"] == 0 for s in status["shards"])
        if (_cancelled(status) > before and idle) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert _cancelled(status) > before, f"the generation was not cancelled: {status}"
    assert idle, f"requests still in flight: {status}"
    return status


def _post(
    url: str, path: str, body: Any, *, fmt: str = "json", headers: dict[str, str] | None = None
) -> httpx.Response:
    if isinstance(body, bytes):
        content = body
    elif fmt == "json":
        content = json.dumps(body).encode()
    else:
        content = msgpack.packb(body, use_bin_type=True)
    ctype = "application/json" if fmt == "json" else "application/msgpack"
    return httpx.post(
        url + path, content=content, headers={"Content-Type": ctype, **AUTH, **(headers or {})}, timeout=120
    )


# ---- health, models, auth -------------------------------------------------------------------------


def test_healthz_needs_no_key_and_models_list(url: str, client: Client) -> None:
    r = httpx.get(url + "/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert client.models() == ["smollm2-135m"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/v1/jobs/x"), ("GET", "/nope")],
)
def test_api_key_is_enforced(url: str, headers: dict[str, str], method: str, path: str) -> None:
    r = httpx.request(method, url + path, headers=headers, content=b'{"prompt": "x"}', timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


def _api_routes(router: Any) -> list[APIRoute]:
    """The app's routes; FastAPI >= 0.137 nests included routers (Serve includes the class's routes)."""
    found: list[APIRoute] = []
    for route in router.routes:
        if isinstance(route, APIRoute):
            found.append(route)
        elif hasattr(route, "original_router"):
            found += _api_routes(route.original_router)
    return found


# Every route of the app (from FastAPI's own table), path parameters filled in: each needs the key.
PROTECTED = sorted(
    (method, route.path.replace("{job_id}", "job-x").replace("{path:path}", "nope"))
    for route in _api_routes(ingress_app)
    if route.path not in PUBLIC_PATHS
    for method in route.methods
)


def test_every_route_is_in_the_protected_list() -> None:
    paths = {path for _, path in PROTECTED}
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/jobs", "/v1/jobs/job-x"} <= paths
    assert {"/v1/jobs/job-x/results", "/nope"} <= paths and len(PROTECTED) >= 12


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
@pytest.mark.parametrize(("method", "path"), PROTECTED, ids=[f"{m} {p}" for m, p in PROTECTED])
def test_api_key_is_enforced_on_every_route(
    url: str, headers: dict[str, str], method: str, path: str
) -> None:
    r = httpx.request(method, url + path, headers=headers, content=b'{"prompt": "x"}', timeout=30)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "authentication_error"


def test_sdk_raises_authentication_error(url: str) -> None:
    with Client(url, api_key="wrong", retries=0) as c, pytest.raises(AuthenticationError):
        c.models()


# ---- completions ----------------------------------------------------------------------------------


def test_completion_and_stream_agree(url: str, client: Client) -> None:
    r = _post(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "smollm2-135m"
    text = body["choices"][0]["text"]
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] >= 1
    assert body["entropyinfer"]["policy"] == "dense" and body["entropyinfer"]["density"] == 1.0

    with httpx.stream(
        "POST",
        url + "/v1/completions",
        json={
            "prompt": PROMPT,
            "max_tokens": 4,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers=AUTH,
        timeout=120,
    ) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[5:]) for line in lines[:-1]]
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert streamed == text
    assert chunks[-1]["usage"]["completion_tokens"] == body["usage"]["completion_tokens"]


def test_chat_over_msgpack_and_policy_selection(client: Client, smollm2: LLM) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    out = client.chat(messages, max_tokens=3, temperature=0, policy="fixed")
    assert out.text and out.text == _offline(smollm2, messages, 3, policy="fixed")
    assert out.stats["policy"] == "fixed" and out.finish_reason in ("stop", "length")
    assert out.usage["prompt_tokens"] == smollm2.count_tokens(messages)
    streamed = "".join(client.stream(messages, max_tokens=3, temperature=0))
    assert (
        streamed == client.chat(messages, max_tokens=3, temperature=0).text == _offline(smollm2, messages, 3)
    )


# ---- bad input ------------------------------------------------------------------------------------

LONG_DOC = "All work and no play makes Jack a dull boy. " * 1000  # about 11k tokens > 8192
JOB = {"documents": ["a short document"], "question": "what?", "max_tokens": 2}

BAD = [
    ("malformed-json", "/v1/completions", b'{"prompt": "x",', "json", 400, "body"),
    ("malformed-msgpack", "/v1/jobs", b"\x92\x01", "msgpack", 400, "body"),
    (
        "msgpack-ext-type",
        "/v1/jobs",
        msgpack.packb({"documents": [msgpack.ExtType(1, b"x")]}),
        "msgpack",
        400,
        "body",
    ),
    ("not-an-object", "/v1/completions", [1, 2], "json", 400, "body"),
    ("missing-prompt", "/v1/completions", {"max_tokens": 2}, "json", 400, "prompt"),
    ("missing-messages", "/v1/chat/completions", {"model": "smollm2-135m"}, "json", 400, "messages"),
    ("missing-documents", "/v1/jobs", {"question": "q"}, "msgpack", 400, "documents"),
    ("missing-question", "/v1/jobs", {"documents": ["d"]}, "json", 400, "question"),
    (
        "wrong-type-max-tokens",
        "/v1/completions",
        {"prompt": "x", "max_tokens": "5"},
        "json",
        400,
        "max_tokens",
    ),
    ("wrong-type-stream", "/v1/completions", {"prompt": "x", "stream": "yes"}, "json", 400, "stream"),
    ("wrong-type-documents", "/v1/jobs", {**JOB, "documents": "one string"}, "msgpack", 400, "documents"),
    (
        "negative-temperature",
        "/v1/completions",
        {"prompt": "x", "temperature": -1},
        "json",
        400,
        "temperature",
    ),
    ("absurd-temperature", "/v1/jobs", {**JOB, "temperature": 1e30}, "json", 400, "temperature"),
    # OpenAI's cap, in the HTTP edge and in the engine alike (one table of limits)
    (
        "temperature-over-2",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "temperature": 2.5},
        "json",
        400,
        "temperature",
    ),
    (
        "zero-top-p",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_p": 0},
        "json",
        400,
        "top_p",
    ),
    ("negative-top-k", "/v1/completions", {"prompt": "x", "top_k": -3}, "json", 400, "top_k"),
    ("absurd-max-tokens", "/v1/completions", {"prompt": "x", "max_tokens": 10**9}, "json", 400, "max_tokens"),
    ("zero-max-tokens", "/v1/jobs", {**JOB, "max_tokens": 0}, "msgpack", 400, "max_tokens"),
    ("empty-document", "/v1/jobs", {**JOB, "documents": ["fine", "   "]}, "msgpack", 400, "documents[1]"),
    ("no-documents", "/v1/jobs", {**JOB, "documents": []}, "json", 400, "documents"),
    ("not-utf8-document", "/v1/jobs", {**JOB, "documents": [b"\xff\xfe"]}, "msgpack", 400, "documents[0]"),
    (
        "document-over-context",
        "/v1/jobs",
        {**JOB, "documents": ["ok", LONG_DOC]},
        "msgpack",
        400,
        "documents[1]",
    ),
    ("prompt-over-context", "/v1/completions", {"prompt": LONG_DOC, "max_tokens": 2}, "json", 400, "prompt"),
    ("too-many-documents", "/v1/jobs", {**JOB, "documents": ["d"] * 5}, "json", 400, "documents"),
    ("unknown-policy-job", "/v1/jobs", {**JOB, "policy": "magic"}, "json", 400, "policy"),
    (
        "unknown-policy-completion",
        "/v1/completions",
        {"prompt": "x", "policy": "snapkv"},
        "json",
        400,
        "policy",
    ),
    ("unknown-model", "/v1/completions", {"prompt": "x", "model": "gpt-9"}, "json", 404, "model"),
    ("unknown-job-field", "/v1/jobs", {**JOB, "questoin": "typo"}, "json", 400, "questoin"),
    ("n-over-the-limit", "/v1/completions", {"prompt": "x", "n": 17}, "json", 400, "n"),
    ("body-too-large", "/v1/jobs", {**JOB, "documents": ["x" * (2 << 20)]}, "json", 413, "body"),
    # JSON strings with lone surrogates decode to str that no UTF-8 encoder (tokenizer, SQLite) accepts
    ("surrogate-prompt", "/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 2}', "json", 400, "prompt"),
    (
        "surrogate-chat",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi \\udfff"}]}',
        "json",
        400,
        "messages[0].content",
    ),
    (
        "surrogate-document",
        "/v1/jobs",
        b'{"documents": ["ok", "\\ud800"], "question": "q"}',
        "json",
        400,
        "documents[1]",
    ),
    ("surrogate-question", "/v1/jobs", b'{"documents":["x"],"question":"\\ud800"}', "json", 400, "question"),
    (
        "surrogate-idempotency-key",
        "/v1/jobs",
        b'{"documents": ["ok"], "question": "q", "idempotency_key": "\\ud800"}',
        "json",
        400,
        "idempotency_key",
    ),
    (
        "integer-over-4300-digits",
        "/v1/completions",
        b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}",
        "json",
        400,
        "body",
    ),
    ("msgpack-empty-arrays", "/v1/jobs", b"\xdd\x00\x07\xa1\x20" + b"\x90" * 500_000, "msgpack", 400, "body"),
    (
        "msgpack-nested-arrays",
        "/v1/jobs",
        msgpack.packb({"documents": [[[]] * 4000] * 50, "question": "q"}),
        "msgpack",
        400,
        "body",
    ),
]


@pytest.mark.parametrize(("name", "path", "body", "fmt", "status", "field"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_field(
    url: str, name: str, path: str, body: Any, fmt: str, status: int, field: str
) -> None:
    r = _post(url, path, body, fmt=fmt)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field, err
    assert err["message"] and err["type"]


def test_unsupported_content_type_and_unknown_job(url: str, client: Client) -> None:
    r = httpx.post(
        url + "/v1/jobs", content=b"hello", headers={"Content-Type": "text/plain", **AUTH}, timeout=30
    )
    assert r.status_code == 415 and r.json()["error"]["field"] == "content-type"
    for method in ("GET", "DELETE"):
        r = httpx.request(method, url + "/v1/jobs/job-doesnotexist", headers=AUTH, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["field"] == "job_id"
    with pytest.raises(NotFoundError) as e:
        client.results("job-doesnotexist")
    assert e.value.field == "job_id"


def test_replica_still_serves_after_bad_input(client: Client) -> None:
    assert client.complete(PROMPT, max_tokens=2, temperature=0).usage["completion_tokens"] >= 1


# ---- document jobs --------------------------------------------------------------------------------


def test_job_batch_through_the_sdk(client: Client, smollm2: LLM) -> None:
    question = "Which place does the document talk about?"
    job = client.submit(DOCS, question, max_tokens=6)
    assert job.created and job.documents_total == 2 and job.prefill_tokens_total > 0
    done = client.wait(job.id, poll_s=0.2, timeout=300, progress=False)
    assert done.state == "succeeded"
    assert (done.documents_done, done.prefill_tokens_done) == (2, done.prefill_tokens_total)
    results = client.results(job.id)
    assert [r.document_index for r in results] == [0, 1]
    jobs = JobsConfig()  # the server's prompt template and system prompt
    for doc, r in zip(DOCS, results, strict=True):
        prompt = build_prompt(doc, question, jobs.system_prompt, jobs.prompt_template)
        assert r.text and r.text == _offline(smollm2, prompt, 6), (r.text, doc)
        assert r.finish_reason in ("stop", "length") and r.stats["prompt_tokens"] == smollm2.count_tokens(
            prompt
        )
    FINISHED["job"] = job.id


def test_idempotent_resubmission(client: Client) -> None:
    first = client.submit(["idempotent doc"], "q?", max_tokens=2, idempotency_key="key-e2e-1")
    again = client.submit(["idempotent doc"], "q?", max_tokens=2, idempotency_key="key-e2e-1")
    assert first.created and not again.created and again.id == first.id
    with pytest.raises(ConflictError) as e:
        client.submit(["another doc"], "q?", max_tokens=2, idempotency_key="key-e2e-1")
    assert e.value.status == 409 and e.value.field == "idempotency_key"
    client.wait(first.id, poll_s=0.2, timeout=300, progress=False)


def test_cancel_a_running_job(client: Client) -> None:
    docs = [f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * 40 for i in range(3)]
    job = client.submit(docs, "Write a long story about this.", max_tokens=64, temperature=0)
    deadline = time.monotonic() + 120
    while client.status(job.id).state != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    queued = client.submit(["never runs"], "q?", max_tokens=2)  # the one worker loop is busy: queued
    assert client.cancel(queued.id).state == "cancelled"
    t0 = time.monotonic()
    client.cancel(job.id)
    final = client.wait(job.id, poll_s=0.1, timeout=60, progress=False)
    assert final.state == "cancelled"
    assert time.monotonic() - t0 < 20  # the engine stopped mid-document, not after all three
    assert final.documents_done < 3
    settled = client.wait(queued.id, poll_s=0.1, timeout=30, progress=False)
    assert settled.state == "cancelled" and settled.documents_done == 0 and client.results(queued.id) == []


def test_streaming_client_disconnect_does_not_wedge_the_engine(
    server: EmbeddedServer, url: str, client: Client, smollm2: LLM
) -> None:
    before = _cancelled(_engine_status(server))
    with httpx.stream(
        "POST",
        url + "/v1/completions",
        json={"prompt": STORY, "max_tokens": 64, "temperature": 0, "stream": True},
        headers=AUTH,
        timeout=60,
    ) as resp:
        for line in resp.iter_lines():
            if line.startswith("data:"):
                break  # hang up after the first token
    _wait_for_cancel(server, before)  # the model stopped: the generation did not run to its 64 tokens
    assert client.complete(PROMPT, max_tokens=2, temperature=0).text == _offline(smollm2, PROMPT, 2)


def test_a_failing_prompt_cancels_the_other_prompts_of_the_request(server: EmbeddedServer, url: str) -> None:
    before = _cancelled(_engine_status(server))
    r = _post(url, "/v1/completions", {"prompt": [STORY, LONG_DOC], "max_tokens": 64, "temperature": 0})
    assert r.status_code == 400 and r.json()["error"]["field"] == "prompt", r.text
    _wait_for_cancel(server, before)  # the story's generation was stopped, not left to run to the end


def test_project_metrics_reach_prometheus(server: EmbeddedServer) -> None:
    """Ray's metrics agent exports the project's metrics (prefixed `ray_`) next to Serve's."""
    wanted = {
        "ray_entropyinfer_prefill_tokens_total",
        "ray_entropyinfer_prefill_density_count",
        "ray_entropyinfer_job_queue_length",
        "ray_serve_num_http_requests_total",
    }
    deadline = time.monotonic() + 60
    while True:
        text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
        names = {
            line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")
        }
        if wanted <= names or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert wanted <= names, wanted - names


# ---- restart (last: it redeploys the app) ---------------------------------------------------------


def test_finished_job_survives_an_app_restart(server: EmbeddedServer, client: Client, smollm2: LLM) -> None:
    job_id = FINISHED.get("job")
    if job_id is None:
        job = client.submit(DOCS[:1], "q?", max_tokens=2)
        client.wait(job.id, poll_s=0.2, timeout=300, progress=False)
        job_id = job.id
    before = client.results(job_id)
    running = client.submit(DOCS, "Tell a long story about it.", max_tokens=32)
    deadline = time.monotonic() + 120
    while client.status(running.id).state != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)

    server.restart_app()

    with Client(server.url, api_key=API_KEY, retries=5) as after:
        assert after.status(job_id).state == "succeeded"
        assert after.results(job_id) == before
        # the job that was running when the app went down is handed back and resumed, not lost
        resumed = after.wait(running.id, poll_s=0.2, timeout=300, progress=False)
        assert resumed.state == "succeeded" and resumed.documents_done == 2
        assert [r.document_index for r in after.results(running.id)] == [0, 1]
        assert after.complete(PROMPT, max_tokens=2, temperature=0).text == _offline(smollm2, PROMPT, 2)
