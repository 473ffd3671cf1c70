"""The engine deployment: one replica per model replica, owning a shard group.

Serve reserves a placement group per replica (`placement_group_bundles`: one bundle per GPU, or a CPU
bundle per shard where there is no GPU); the replica starts its shard actors inside it, one per bundle,
so the same code later runs tensor/sequence-parallel groups. With one shard, rank 0 does everything.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from entropyinfer.cluster.config import EngineConfig, ServeAppConfig, app_config
from entropyinfer.cluster.metrics import EngineMetrics
from entropyinfer.cluster.shard_actor import ShardActor

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 30.0
STATUS_TIMEOUT_S = 5.0


def resolve_accelerator(cfg: EngineConfig) -> str:
    """'gpu' or 'cpu' for `accelerator: auto`: GPUs iff the (already initialized) Ray cluster has some."""
    if cfg.accelerator != "auto":
        return cfg.accelerator
    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
        return "gpu"
    return "cpu"


def shard_bundles(cfg: EngineConfig, accelerator: str) -> list[dict[str, float]]:
    """One placement-group bundle per shard: a GPU each on GPU clusters, CPU only otherwise."""
    bundle: dict[str, float] = {"CPU": cfg.cpus_per_shard}
    if accelerator == "gpu":
        bundle["GPU"] = 1.0
    return [dict(bundle) for _ in range(cfg.num_shards)]


@serve.deployment(name="Engine", ray_actor_options={"num_cpus": 0})
class EngineDeployment:
    def __init__(self, args: dict[str, Any], accelerator: str) -> None:
        self.config: ServeAppConfig = app_config(args)
        cfg = self.config.engine
        self.accelerator = accelerator
        pg = get_current_placement_group()
        remote_shard: Any = ray.remote(ShardActor)
        engine_args = cfg.shard_args()
        self.shards: list[Any] = []
        for rank in range(cfg.num_shards):
            strategy = (
                PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=rank)
                if pg is not None
                else None
            )
            self.shards.append(
                remote_shard.options(
                    num_cpus=cfg.cpus_per_shard,
                    num_gpus=1 if accelerator == "gpu" else 0,
                    scheduling_strategy=strategy,
                    max_concurrency=64,
                ).remote(engine_args, rank, cfg.num_shards)
            )
        infos = ray.get([s.ready.remote() for s in self.shards], timeout=cfg.load_timeout_s)
        self.info_ = {
            **infos[0],
            "policy": cfg.policy,
            "policies": list(cfg.policies),
            "accelerator": accelerator,
            "load_format": cfg.load_format,
        }
        self.metrics = EngineMetrics()
        log.info("engine replica ready: %s", self.info_)

    async def info(self) -> dict[str, Any]:
        return dict(self.info_)

    async def status(self) -> dict[str, Any]:
        """Live state for /healthz (raises if a shard does not answer within STATUS_TIMEOUT_S): the info,
        requests in flight in this replica, and each shard's counters (busy, cancelled, ...)."""
        shards = await asyncio.wait_for(
            asyncio.gather(*(s.stats.remote() for s in self.shards)), STATUS_TIMEOUT_S
        )
        return {**self.info_, "in_flight": self.metrics.in_flight_count, "shards": list(shards)}

    async def count_tokens(self, prompts: list[Any]) -> list[int]:
        return list(await self.shards[0].count_tokens.remote(prompts))

    async def run(
        self, prompt: Any, sampling: dict[str, Any], policy: str | None, stream: bool
    ) -> AsyncIterator[dict[str, Any]]:
        """Events of one request (see shard_actor.py); closing the stream early cancels it."""
        request_id = uuid.uuid4().hex
        shard = self.shards[0]
        finished = False
        t0 = time.perf_counter()
        self.metrics.inflight(+1)
        try:
            gen = shard.run.options(num_returns="streaming").remote(
                request_id, prompt, sampling, policy, stream
            )
            async for ref in gen:
                try:
                    event = await ref
                except Exception:
                    finished = True  # the shard rejected or ended the request itself: nothing to cancel
                    raise
                if event["type"] == "final":
                    finished = True
                    self.metrics.record(event, policy or self.config.engine.policy, time.perf_counter() - t0)
                yield event
        finally:
            self.metrics.inflight(-1)
            if not finished:
                shard.cancel.remote(request_id)  # fire and forget: we may be inside a cancellation

    async def generate(self, prompt: Any, sampling: dict[str, Any], policy: str | None) -> dict[str, Any]:
        """The final event of a non-streaming request (plus its prompt_tokens)."""
        prompt_tokens = 0
        async for event in self.run(prompt, sampling, policy, False):
            if event["type"] == "accepted":
                prompt_tokens = event["prompt_tokens"]
            elif event["type"] == "final":
                return {**event, "prompt_tokens": prompt_tokens}
        raise RuntimeError("the shard ended the request without a result")

    async def check_health(self) -> None:
        await asyncio.wait_for(asyncio.gather(*(s.health.remote() for s in self.shards)), HEALTH_TIMEOUT_S)
