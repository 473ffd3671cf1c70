"""The Serve application builder: `entropyinfer.cluster.app:build_app` in configs/serve.yaml.

    serve run configs/serve.yaml          # or: serve deploy configs/serve.yaml, entropyinfer serve

`build_app(args)` receives the application's `args` (typed by `ServeAppConfig`; unknown keys raise
ConfigError with their dotted name) and returns Ingress (cluster/ingress.py, FastAPI) -> Engine
(cluster/replica.py: rank 0's shard actor and its tensor-parallel ranks in the replica's placement group,
one bundle per rank, packed on one node unless `engine.placement_strategy` says otherwise). The ingress
replicas run on the head node, where the SQLite job store lives (`ray_actor_options` of the Ingress
deployment).
"""

from __future__ import annotations

from typing import cast

from ray.serve import Application, Deployment

from entropyinfer.cluster.config import ServeAppConfig, app_config
from entropyinfer.cluster.ingress import Ingress
from entropyinfer.cluster.replica import EngineReplica, resolve_accelerator, shard_bundles


def build_app(args: dict[str, object] | ServeAppConfig | None = None) -> Application:
    config = app_config(args)
    accelerator = resolve_accelerator(config.engine)
    engine = (
        cast(Deployment, EngineReplica)
        .options(
            num_replicas=config.engine.num_replicas,
            max_ongoing_requests=config.engine.max_ongoing_requests,
            placement_group_bundles=shard_bundles(config.engine, accelerator),
            placement_group_strategy=config.engine.placement_strategy,
            health_check_timeout_s=60.0,
            health_check_period_s=config.engine.health_check_period_s,
        )
        .bind(config, accelerator)
    )
    return (
        cast(Deployment, Ingress)
        .options(
            num_replicas=config.ingress.num_replicas,
            max_ongoing_requests=config.ingress.max_ongoing_requests,
        )
        .bind(engine, config)
    )
