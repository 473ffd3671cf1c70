"""The Serve engine replica running a tensor-parallel shard group (TP=2, gloo on CPU, the tiny random
Llama with load_format="dummy"), as a second app at /tp beside the session's: one shard actor (rank 0) and
a `RayRanks` worker for rank 1 in the replica's 2-bundle placement group. Greedy answers over HTTP equal
one rank's; a document job completes; killing rank 1's actor mid-request gives the client a 503 naming
the rank within seconds, the shard actor rebuilds the group, the engine status says which rank failed,
and the next request succeeds with the same answer; a rank killed while the group is idle is found and
replaced before the next request. Without Ray: the error's HTTP status, and the step loop's rebuild."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from entropyinfer.cluster.client import Client
from entropyinfer.cluster.config import (
    AuthConfig,
    JobsConfig,
    LimitsConfig,
    ReplicaConfig,
    ServeAppConfig,
)
from entropyinfer.cluster.job_worker import build_prompt
from entropyinfer.cluster.launcher import EmbeddedServer
from entropyinfer.shard.config import LLMConfig
from entropyinfer.shard.llm import LLM
from entropyinfer.shard.sampling import SamplingParams

pytestmark = [pytest.mark.serve]

TP_APP = "tp"
PROMPT = "The capital of France is"
KEYWORDS: dict[str, Any] = dict(load_format="dummy", device="cpu", warm_up_kernels=False, policy="dense")


@pytest.fixture(scope="module")
def tp(
    server: EmbeddedServer, tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path
) -> Iterator[str]:
    """The URL of the TP=2 app (its own job store, no key)."""
    from ray import serve

    from entropyinfer.cluster.app import build_app

    llm = LLMConfig.from_keywords({"model": str(tiny_checkpoint), "tensor_parallel_size": 2, **KEYWORDS})
    config = ServeAppConfig(
        engine=ReplicaConfig(
            llm=llm, policies=("dense",), accelerator="cpu", cpus_per_shard=0.25, cpu_threads=1
        ),
        jobs=JobsConfig(db_path=str(tmp_path_factory.mktemp("tp-jobs") / "jobs.sqlite"), poll_s=0.1),
        limits=LimitsConfig(max_tokens=900),
        auth=AuthConfig(api_key=None, api_key_env=None),
    )
    serve.run(build_app(config), name=TP_APP, route_prefix="/tp")
    try:
        yield server.url + "/tp"
    finally:
        serve.delete(TP_APP)


@pytest.fixture(scope="module")
def one(tiny_checkpoint: Path) -> LLM:
    """The same model on one rank, in this process."""
    return LLM(str(tiny_checkpoint), **KEYWORDS)


def _status() -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle("Engine", app_name=TP_APP)
    return dict(handle.status.remote().result(timeout_s=30))


def _complete(url: str, max_tokens: int, timeout: float = 60.0) -> httpx.Response:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(url + "/v1/completions", json=body, timeout=timeout)


def _reference(one: LLM, prompt: Any, max_tokens: int, ignore_eos: bool = True) -> str:
    return one.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos))[0].text


# ---- without Ray: the error's status, and the step loop replacing a broken group ------------------------


def test_a_shard_group_error_is_a_503_naming_the_rank_and_an_engine_outage() -> None:
    from entropyinfer.cluster.http_errors import to_http_error
    from entropyinfer.cluster.ray_errors import engine_unavailable
    from entropyinfer.errors import ShardGroupError
    from entropyinfer.shard.parallel.lockstep import ShardGroupError as FromLockstep

    exc = ShardGroupError("the tensor-parallel group is broken: rank 1 exited (ActorDiedError: ...)")
    err = to_http_error(exc)
    assert (err.status, err.type, err.retry_after) == (503, "unavailable", 2)
    assert "rank 1 exited" in err.message and "retry later" in err.message
    assert engine_unavailable(exc) and FromLockstep is ShardGroupError  # a job is retried later


def test_the_replica_asks_for_one_bundle_per_rank_packed_unless_configured(tiny_checkpoint: Path) -> None:
    from entropyinfer.cluster.config import app_config
    from entropyinfer.cluster.replica import shard_bundles
    from entropyinfer.errors import ConfigError

    llm = {"model": str(tiny_checkpoint), "tensor_parallel_size": 2}
    cfg = app_config({"engine": {"llm": llm, "cpus_per_shard": 0.25}}).engine
    assert cfg.placement_strategy == "STRICT_PACK" and cfg.num_shards == 2
    assert shard_bundles(cfg, "cpu") == [{"CPU": 0.25}] * 2
    assert shard_bundles(cfg, "gpu") == [{"CPU": 0.25, "GPU": 1.0}] * 2
    assert app_config({"engine": {"placement_strategy": "SPREAD"}}).engine.placement_strategy == "SPREAD"
    with pytest.raises(ConfigError, match="placement_strategy"):
        app_config({"engine": {"placement_strategy": "ANYWHERE"}})


class _Executor:
    def __init__(self, broken: str | None) -> None:
        self.broken, self.closed, self.live = broken, False, None


class _FakeLLM:
    """Steps fail with ShardGroupError while `broken`; otherwise each request finishes at its first step."""

    def __init__(self, broken: str | None) -> None:
        self.executor, self.core = _Executor(broken), self
        self.pending: list[str] = []
        self.events: dict[str, list[Any]] = {}

    def submit(self, request: Any) -> None:
        self.pending.append(request.request_id)

    def step(self) -> None:
        from entropyinfer.errors import ShardGroupError
        from entropyinfer.shard.engine_core import Finished

        if self.executor.broken:
            raise ShardGroupError(f"the tensor-parallel group is broken: {self.executor.broken}")
        for rid in self.pending:
            self.events[rid] = [Finished(rid, cast(Any, "done"))]
        self.pending = []

    def abort(self, request_id: str) -> None:
        self.pending.remove(request_id)

    def take_events(self, request_id: str) -> list[Any]:
        return self.events.pop(request_id, [])


def test_the_step_loop_fails_the_requests_of_a_broken_group_then_runs_the_next_on_a_new_one() -> None:
    from types import SimpleNamespace

    from entropyinfer.cluster.shard_actor import StepLoop

    broken, fresh = _FakeLLM("rank 1 exited (code -9)"), _FakeLLM(None)
    reasons: list[str] = []
    got: dict[str, list[Any]] = {"a": [], "b": []}
    done = {k: threading.Event() for k in got}

    def sink(rid: str) -> Any:
        return lambda item: (got[rid].append(item), done[rid].set())

    def rebuild(reason: str) -> Any:
        reasons.append(reason)
        return fresh

    loop = StepLoop(cast(Any, broken), rebuild)
    loop.submit(cast(Any, SimpleNamespace(request_id="a")), sink("a"))
    assert done["a"].wait(10) and "rank 1 exited" in str(got["a"][0]), got
    loop.submit(cast(Any, SimpleNamespace(request_id="b")), sink("b"))
    assert done["b"].wait(10) and type(got["b"][0]).__name__ == "Finished", got
    assert reasons == ["rank 1 exited (code -9)"] and loop.llm is fresh


# ---- the TP=2 app over HTTP ----------------------------------------------------------------------------


def test_tp2_app_reports_its_group_and_answers_as_one_rank(tp: str, one: LLM) -> None:
    models = httpx.get(tp + "/v1/models", timeout=30)
    assert models.status_code == 200, models.text
    assert httpx.get(tp + "/healthz", timeout=30).status_code == 200
    status = _status()
    group = status["group"]
    assert status["tensor_parallel_size"] == 2 and group["tensor_parallel_size"] == 2
    assert group["state"] == "ok" and [r["healthy"] for r in group["ranks"]] == [True, True]
    assert len(status["shards"]) == 1  # one shard actor: rank 0, owning the group
    r = _complete(tp, 12)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == _reference(one, PROMPT, 12)


def test_a_document_job_completes_on_the_group(tp: str, one: LLM) -> None:
    doc, question = "The tower is in Paris. " * 4, "Where is the tower?"
    with Client(tp, retries=2, backoff_s=0.2) as client:
        job = client.submit([doc], questions=[question], max_tokens=6)
        done = client.wait(job.id, poll_s=0.2, timeout=120, progress=False)
        assert done.state == "succeeded", done
        (result,) = client.results(job.id)
    jobs = JobsConfig()
    prompt = build_prompt(doc, question, jobs.system_prompt, jobs.prompt_template)
    assert result.text == _reference(one, prompt, 6, ignore_eos=False)


def test_a_killed_rank_fails_the_request_with_503_then_the_group_is_rebuilt(tp: str, one: LLM) -> None:
    import ray

    from entropyinfer.cluster.shard_group import RANK_NAMESPACE

    name = _status()["group"]["ranks"][1]["actor"]
    assert name, "rank 1's actor has a name"
    answer: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: answer.append(_complete(tp, 900)), daemon=True)
    worker.start()
    deadline = time.monotonic() + 30
    while _status()["shards"][0]["engine_core"].get("running", 0) < 1:  # decoding now
        assert time.monotonic() < deadline and worker.is_alive(), "the long request never ran"
        time.sleep(0.05)
    ray.kill(ray.get_actor(name, namespace=RANK_NAMESPACE))
    t0 = time.monotonic()
    worker.join(30)
    assert answer, "the request in flight hung after its rank died"
    failed = answer[0]
    assert time.monotonic() - t0 < 10
    assert failed.status_code == 503, failed.text
    error = failed.json()["error"]
    assert error["type"] == "unavailable" and "rank 1" in error["message"], error
    assert failed.headers.get("retry-after")
    deadline = time.monotonic() + 120

    def rebuilt(group: dict[str, Any]) -> bool:  # replaced, and every rank of the new group up
        return group["state"] == "ok" and group["rebuilds"] >= 1 and all(r["healthy"] for r in group["ranks"])

    while not rebuilt(group := _status()["group"]):
        assert time.monotonic() < deadline, group
        time.sleep(0.2)
    assert group["failed_ranks"] == [1] and "rank 1" in (group["last_failure"] or ""), group
    assert group["ranks"][1]["actor"] != name, group
    again = _complete(tp, 12)
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["text"] == _reference(one, PROMPT, 12)

    ray.kill(ray.get_actor(group["ranks"][1]["actor"], namespace=RANK_NAMESPACE))  # now while idle
    deadline = time.monotonic() + 120
    while (group := _status()["group"])["state"] != "ok" or group["rebuilds"] < 2:  # found within ~1 s
        assert time.monotonic() < deadline, group
        time.sleep(0.2)
    assert group["failed_ranks"] == [1]
    assert _complete(tp, 12).json()["choices"][0]["text"] == _reference(one, PROMPT, 12)
