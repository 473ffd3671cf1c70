"""The ingress's answers when the engine is slow, gone or rejects a request.

Over real HTTP: the real Ingress deployment is deployed a second time, at /stub next to the session's app,
bound to a stand-in engine deployment whose `status` and `info` answer, raise or hang on command, so
/healthz and /v1/models are seen bounded in time and never cached. Without HTTP: how engine outcomes (typed
`Error` events, exceptions through Ray's wrappers) map to HTTP errors, and which are engine outages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("ray")

from ray import serve
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

from entropyinfer.cluster.config import AuthConfig, JobsConfig, ServeAppConfig
from entropyinfer.cluster.events import Error
from entropyinfer.cluster.http_errors import HTTPError, rejected, to_http_error
from entropyinfer.cluster.ingress import HEALTH_TIMEOUT_S, INFO_TIMEOUT_S, Ingress
from entropyinfer.cluster.launcher import EmbeddedServer
from entropyinfer.cluster.ray_errors import engine_unavailable
from entropyinfer.errors import InvalidRequestError, PromptTooLongError, RequestCancelled

STUB_APP = "ingress-stub"
INFO = {"model": "stub", "max_context": 8192, "device": "cpu", "load_s": 0.0, "rank": 0}


@pytest.fixture(scope="module")
def stub(server: EmbeddedServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """(url, handle of the stand-in engine) of an Ingress at /stub over a stand-in engine deployment."""

    @serve.deployment(name="Engine")
    class StubEngine:
        """`status` and `info` answer ("ok"), raise as a dead actor ("dead") or never answer ("hang")."""

        def __init__(self) -> None:
            self.modes = {"status": "ok", "info": "ok"}
            self.calls = {"status": 0, "info": 0}

        async def set_mode(self, method: str, mode: str) -> None:
            self.modes[method] = mode

        async def counts(self) -> dict[str, int]:
            return dict(self.calls)

        async def _answer(self, method: str, value: dict[str, Any]) -> dict[str, Any]:
            self.calls[method] += 1
            if self.modes[method] == "hang":
                await asyncio.sleep(3600)
            if self.modes[method] == "dead":
                raise ActorDiedError()
            return value

        async def status(self) -> dict[str, Any]:
            return await self._answer("status", {**INFO, "in_flight": 0, "shards": []})

        async def info(self) -> dict[str, Any]:
            return await self._answer("info", INFO)

    db = tmp_path_factory.mktemp("stub-jobs") / "jobs.sqlite"
    config = ServeAppConfig(jobs=JobsConfig(db_path=str(db)), auth=AuthConfig(api_key=None, api_key_env=None))
    engine = StubEngine.bind()  # type: ignore[attr-defined]
    serve.run(Ingress.bind(engine, config), name=STUB_APP, route_prefix="/stub")  # type: ignore[attr-defined]
    try:
        yield server.url + "/stub", serve.get_deployment_handle("Engine", app_name=STUB_APP)
    finally:
        serve.delete(STUB_APP)


def _mode(handle: Any, method: str, mode: str) -> None:
    handle.set_mode.remote(method, mode).result(timeout_s=30)


def test_healthz_asks_the_engine_every_time_within_its_timeout(stub: tuple[str, Any]) -> None:
    url, handle = stub
    before = handle.counts.remote().result(timeout_s=30)["status"]
    r = httpx.get(url + "/healthz", timeout=30)
    engine = {"replica": "", "in_flight": 0, "shards": []}
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": "smollm2-135m", "device": "cpu", "engine": engine}
    _mode(handle, "status", "dead")  # the replica's shard died
    r = httpx.get(url + "/healthz", timeout=30)
    assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"
    r = httpx.get(url + "/metrics", timeout=30)  # the scrape still succeeds, and says the engine is down
    assert r.status_code == 200 and "\nentropyinfer_up 0\n" in r.text
    _mode(handle, "status", "hang")  # a replica that does not answer
    t0 = time.monotonic()
    r = httpx.get(url + "/healthz", timeout=30)
    assert r.status_code == 503 and "engine not ready" in r.json()["error"]["message"]
    assert HEALTH_TIMEOUT_S <= time.monotonic() - t0 < HEALTH_TIMEOUT_S + 10
    _mode(handle, "status", "ok")
    assert httpx.get(url + "/healthz", timeout=30).json()["device"] == "cpu"
    assert handle.counts.remote().result(timeout_s=30)["status"] - before == 5  # never cached


def test_models_times_out_with_a_503_then_keeps_the_engines_info(stub: tuple[str, Any]) -> None:
    url, handle = stub
    _mode(handle, "info", "hang")
    t0 = time.monotonic()
    r = httpx.get(url + "/v1/models", timeout=60)
    assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable", r.text
    assert "engine info took over" in r.json()["error"]["message"]
    assert INFO_TIMEOUT_S <= time.monotonic() - t0 < INFO_TIMEOUT_S + 10
    _mode(handle, "info", "ok")
    card = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
    assert card["max_context"] == 8192 and card["id"] == "smollm2-135m"
    _mode(handle, "info", "dead")  # static info: fetched once, the engine is not asked again
    assert httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["max_context"] == 8192


def test_engine_outages_are_transient_for_the_job_worker() -> None:
    assert engine_unavailable(RayActorError())
    assert engine_unavailable(ActorDiedError())
    assert engine_unavailable(RayTaskError("generate", "traceback", ActorDiedError()))
    assert not engine_unavailable(PromptTooLongError("too long"))
    assert not engine_unavailable(RuntimeError("bug"))


@pytest.mark.parametrize(
    ("error", "prompt_field", "status", "field", "message"),
    [
        (
            Error("invalid_request", "top_p must be in (0, 1]", "top_p"),
            "prompt",
            400,
            "top_p",
            "top_p: must be in (0, 1]",
        ),
        (Error("prompt_too_long", "9000 tokens"), "messages", 400, "messages", "messages: 9000 tokens"),
        (Error("unknown_policy", "unknown 'x'", "policy"), "prompt", 400, "policy", "policy: unknown 'x'"),
    ],
)
def test_a_rejected_request_is_a_400_naming_its_field(
    error: Error, prompt_field: str, status: int, field: str, message: str
) -> None:
    http = rejected(error, prompt_field)
    assert (http.status, http.field, http.type) == (status, field, "invalid_request_error")
    assert http.message.startswith(message)
    detail = {"message": http.message, "type": http.type, "field": field, "param": field, "code": 400}
    assert http.body() == {"error": detail}


def test_exceptions_map_to_http_errors_through_rays_wrappers() -> None:
    wrapped = RayTaskError("run", "traceback", InvalidRequestError("bad seed", field="seed"))
    http = to_http_error(wrapped)
    assert (http.status, http.field, http.message) == (400, "seed", "seed: bad seed")
    too_long = to_http_error(PromptTooLongError("over the context"), "documents")
    assert (too_long.status, too_long.field) == (400, "documents")
    assert to_http_error(RequestCancelled("gone")).status == 499
    outage = to_http_error(RayTaskError("run", "traceback", ActorDiedError()))
    assert (outage.status, outage.type) == (503, "unavailable")
    bug = to_http_error(RuntimeError("boom"))
    assert (bug.status, bug.type) == (500, "internal_error") and "RuntimeError: boom" in bug.message
    same = HTTPError(409, "conflict", "conflict", "idempotency_key")
    assert to_http_error(same) is same
