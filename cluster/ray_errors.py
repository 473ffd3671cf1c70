"""What a Ray failure means for a request: the original exception inside Ray's wrappers, and whether the
engine is unavailable (a 503 for a client, a retry later for a job). Used by the HTTP routes and the job
worker alike, so neither depends on the other. A tensor-parallel group that lost a rank (`ShardGroupError`)
is an outage too: the shard actor rebuilds its group, and the next request runs on the new one."""

from __future__ import annotations

from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from entropyinfer.errors import ShardGroupError

__all__ = ["engine_unavailable", "unwrap"]


def unwrap(exc: BaseException) -> BaseException:
    """The original exception inside Ray's wrappers (a replica or actor re-raises what it got)."""
    seen = 0
    while isinstance(exc, RayTaskError) and seen < 8:
        cause = getattr(exc, "cause", None)
        if cause is None:
            break
        exc, seen = cause, seen + 1
    return exc


def engine_unavailable(exc: BaseException) -> bool:
    """The engine could not take the request now (replica or actor gone or restarting, a rank of its
    tensor-parallel group gone, back-pressure): a 503 for a client, a retry later for a job."""
    exc = unwrap(exc)
    unavailable = (RayActorError, ShardGroupError, serve.exceptions.BackPressureError)
    return isinstance(exc, unavailable) or type(exc).__name__ in (
        "DeploymentUnavailableError",
        "ReplicaUnavailableError",
        "ActorUnavailableError",
    )
