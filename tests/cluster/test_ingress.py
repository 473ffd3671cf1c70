"""Ingress methods with a stand-in engine handle (no Ray cluster): health and info calls are bounded in
time and never cached, engine outages are classified for the job worker."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

pytest.importorskip("ray")

from ray.exceptions import ActorDiedError, RayActorError, RayTaskError
from starlette.requests import Request

from entropyinfer.cluster import ingress as ingress_module
from entropyinfer.cluster.config import ServeAppConfig
from entropyinfer.cluster.ingress import HTTPError, Ingress, engine_unavailable
from entropyinfer.errors import PromptTooLongError

IngressClass: Any = Ingress.func_or_class


class _Call:
    """A DeploymentResponse stand-in: awaitable, cancellable."""

    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __await__(self) -> Any:
        return self._run().__await__()

    async def _run(self) -> Any:
        if self.outcome == "hang":
            await asyncio.sleep(3600)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class _Method:
    def __init__(self, engine: _Engine, name: str) -> None:
        self.engine, self.name = engine, name

    def remote(self, *args: Any) -> _Call:
        call = _Call(self.engine.outcomes[self.name])
        self.engine.calls.append((self.name, call))
        return call


class _Engine:
    def __init__(self, **outcomes: Any) -> None:
        self.outcomes = outcomes
        self.calls: list[tuple[str, _Call]] = []

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)


class _Ingress:
    """The Ingress methods under test on an object without a job store or worker."""

    healthz = IngressClass.healthz
    models = IngressClass.models
    _info = IngressClass._info
    health_timeout_s = 0.05
    info_timeout_s = 0.05

    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.config = ServeAppConfig()
        self._engine_info: dict[str, Any] | None = None


def _ingress(engine: _Engine) -> Any:
    return _Ingress(engine)


def _request(path: str) -> Request:
    return Request({"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""})


STATUS = {"device": "cpu", "max_context": 8192, "in_flight": 0, "shards": [{"busy": 0}]}


def test_healthz_asks_the_engine_every_time() -> None:
    engine = _Engine(status=STATUS)
    obj = _ingress(engine)

    async def scenario() -> None:
        assert (await obj.healthz())["status"] == "ok"
        engine.outcomes["status"] = ActorDiedError()  # the replica's shard died
        with pytest.raises(HTTPError) as e:
            await obj.healthz()
        assert e.value.status == 503
        engine.outcomes["status"] = "hang"  # a replica that does not answer
        with pytest.raises(HTTPError) as e:
            await asyncio.wait_for(obj.healthz(), 2.0)
        assert e.value.status == 503 and engine.calls[-1][1].cancelled
        engine.outcomes["status"] = STATUS
        assert (await obj.healthz())["device"] == "cpu"

    asyncio.run(scenario())
    assert [name for name, _ in engine.calls] == ["status"] * 4


def test_models_times_out_with_a_503() -> None:
    engine = _Engine(info="hang")
    obj = _ingress(engine)

    async def scenario() -> None:
        with pytest.raises(HTTPError) as e:
            await asyncio.wait_for(obj.models(_request("/v1/models")), 2.0)
        assert e.value.status == 503 and e.value.type == "unavailable"
        engine.outcomes["info"] = {"max_context": 8192}
        response = await obj.models(_request("/v1/models"))
        assert json.loads(response.body)["data"][0]["max_context"] == 8192

    asyncio.run(scenario())


def test_engine_outages_are_transient_for_the_job_worker() -> None:
    assert engine_unavailable(RayActorError())
    assert engine_unavailable(ActorDiedError())
    wrapped = RayTaskError("generate", "traceback", ActorDiedError())
    assert engine_unavailable(wrapped)
    assert not engine_unavailable(PromptTooLongError("too long"))
    assert not engine_unavailable(RuntimeError("bug"))
    assert ingress_module._classify_task_error(PromptTooLongError("too long")) is not None
