"""The engine replica (the Serve deployment "Engine"): one per model replica, owning a shard group.

It forwards a typed `events.Request` to its shard actor and streams the shard's typed events back
(cluster/events.py); closing the stream before its last event cancels the request in the shard.
Serve reserves a placement group per replica (`placement_group_bundles`: one bundle per rank, a GPU each,
or CPU only where there is no GPU; `engine.placement_strategy`, STRICT_PACK by default). The replica
starts one shard actor, rank 0, in bundle 0: it owns the engine core and, with tensor_parallel_size=k,
starts ranks 1..k-1 as `shard_group.RayRanks` actors in bundles 1..k-1 and rebuilds them after a rank
dies. `info()` (for /v1/models) and `status()` (for /healthz) carry the group's shape and each rank's
health (`group`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import ray
from ray import serve
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from entropyinfer.cluster.config import ReplicaConfig, ServeAppConfig, app_config
from entropyinfer.cluster.events import Error, Event, Final, Prompt, Request
from entropyinfer.cluster.metrics import EngineMetrics
from entropyinfer.cluster.shard_actor import ShardActor, ShardInfo, ShardStats

if TYPE_CHECKING:
    from entropyinfer.cluster.shard_group import GroupHealth

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 30.0
STATUS_TIMEOUT_S = 5.0


def resolve_accelerator(cfg: ReplicaConfig) -> str:
    """'gpu' or 'cpu' for `accelerator: auto`: GPUs iff the (already initialized) Ray cluster has some."""
    if cfg.accelerator != "auto":
        return cfg.accelerator
    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
        return "gpu"
    return "cpu"


def shard_bundles(cfg: ReplicaConfig, accelerator: str) -> list[dict[str, float]]:
    """One placement-group bundle per rank: a GPU each on GPU clusters, CPU only otherwise."""
    bundle: dict[str, float] = {"CPU": cfg.cpus_per_shard}
    if accelerator == "gpu":
        bundle["GPU"] = 1.0
    return [dict(bundle) for _ in range(cfg.num_shards)]


class EngineInfo(ShardInfo):
    """What /v1/models and job submission read: the first shard's info and the replica's config."""

    policy: str
    policies: list[str]
    accelerator: str
    load_format: str


class EngineStatus(EngineInfo):
    """Live state for /healthz and /metrics: this replica's id, its requests in flight, each shard's
    counters (the engine core's queues, KV pages and prefix cache under `engine_core`) and the shard
    group's health (`group`: tensor_parallel_size, state, each rank's health, the last failure)."""

    replica: str
    in_flight: int
    shards: list[ShardStats]
    group: GroupHealth


@serve.deployment(name="Engine", ray_actor_options={"num_cpus": 0})
class EngineReplica:
    def __init__(self, args: dict[str, object] | ServeAppConfig, accelerator: str) -> None:
        self.config: ServeAppConfig = app_config(args)
        cfg = self.config.engine
        self.accelerator = accelerator
        self.replica_id = _replica_id()
        pg = get_current_placement_group()
        remote_shard: Any = ray.remote(ShardActor)  # Ray's actor classes and handles are untyped
        strategy = (
            PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0)
            if pg is not None
            else None
        )
        from entropyinfer.cluster.shard_group import RayRanks  # torch: never in the ingress (imports this)

        ranks = (
            functools.partial(
                RayRanks, pg, cfg.cpus_per_shard, accelerator == "gpu", 1, f"tp-{uuid.uuid4().hex[:8]}"
            )
            if cfg.num_shards > 1
            else None
        )  # made in the shard actor, once per group it builds
        self.shards: list[Any] = [
            remote_shard.options(
                num_cpus=cfg.cpus_per_shard,
                num_gpus=1 if accelerator == "gpu" else 0,
                scheduling_strategy=strategy,
                max_concurrency=64,
            ).remote(cfg.llm, 0, cfg.num_shards, cfg.cpu_threads, ranks, self.config.policy, app_name())
        ]
        infos: list[ShardInfo] = ray.get([s.ready.remote() for s in self.shards], timeout=cfg.load_timeout_s)
        self.info_: EngineInfo = {
            **infos[0],
            "policy": cfg.llm.policy,
            "policies": list(cfg.policies),
            "accelerator": accelerator,
            "load_format": cfg.llm.model.load_format,
        }
        self.metrics = EngineMetrics()
        log.info("engine replica ready: %s", self.info_)

    async def info(self) -> EngineInfo:
        return self.info_.copy()

    async def status(self) -> EngineStatus:
        """Live state for /healthz (raises if a shard does not answer within STATUS_TIMEOUT_S): the info,
        requests in flight in this replica, and each shard's counters (busy, cancelled, ...)."""
        shards = await asyncio.wait_for(
            asyncio.gather(*(s.stats.remote() for s in self.shards)), STATUS_TIMEOUT_S
        )
        self.metrics.record_shards(shards)
        return EngineStatus(
            **self.info_,
            replica=self.replica_id,
            in_flight=self.metrics.in_flight_count,
            shards=list(shards),
            group=shards[0]["group"],
        )

    async def count_tokens(self, prompts: list[Prompt]) -> list[int]:
        return list(await self.shards[0].count_tokens.remote(prompts))

    async def run(self, request: Request) -> AsyncIterator[Event]:
        """The shard's events of one request; closing the stream before its last event cancels it."""
        shard = self.shards[0]
        finished = False
        t0 = time.perf_counter()
        self.metrics.inflight(+1)
        try:
            gen = shard.run.options(num_returns="streaming").remote(request)
            async for ref in gen:
                try:
                    event: Event = await ref
                except Exception:
                    finished = True  # the shard ended the request itself (a bug): nothing to cancel
                    raise
                if isinstance(event, Final):
                    finished = True
                    policy = request.policy or self.config.engine.llm.policy
                    self.metrics.record(event, policy, time.perf_counter() - t0)
                elif isinstance(event, Error):
                    finished = True
                yield event
        finally:
            self.metrics.inflight(-1)
            if not finished:
                shard.cancel.remote(request.request_id)  # fire and forget: we may be inside a cancellation

    async def generate(self, request: Request) -> Final | Error:
        """The last event of a non-streaming request."""
        async for event in self.run(request):
            if isinstance(event, (Final, Error)):
                return event
        raise RuntimeError("the shard ended the request without a result")

    async def check_health(self) -> None:
        """Serve's periodic check: every shard answers (and the engine gauges Ray exports are refreshed)."""
        shards = await asyncio.wait_for(
            asyncio.gather(*(s.stats.remote() for s in self.shards)), HEALTH_TIMEOUT_S
        )
        self.metrics.record_shards(shards)


def app_name() -> str:
    """This Serve application's name ("default" outside a replica): it names the policy actor."""
    try:
        return str(serve.get_replica_context().app_name) or "default"
    except Exception:  # not inside a replica
        return "default"


def _replica_id() -> str:
    """This Serve replica's id ("" outside a replica)."""
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # not inside a replica (a test building the class directly)
        return ""
