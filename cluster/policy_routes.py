"""The policy actor's HTTP routes: `GET /v1/policy/heads` (the current head budget table, the statistics
per (layer, KV head) and each shard's link to the actor, JSON) and `GET /v1/policy/heads.png` (the heat map
of rigidity, entropy and budget: `policies/head_heatmap.py`). `PolicyRoutes` is a part of the `Ingress`
deployment (cluster/ingress.py), registered on the shared `app` (cluster/ingress_base.py); the actor is
found by the application's name (cluster/policy_actor.py). Both are a 404 when the policy actor is
disabled. While it does not exist yet (the first shard makes it), is dead, or does not answer in time, the
JSON says so (``actor: {"state": "unavailable", "error": ...}``, still with the shards' links) and the
PNG is a 503.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at runtime.
import asyncio
from typing import Any

from fastapi.responses import Response

from entropyinfer.cluster.http_errors import HTTPError
from entropyinfer.cluster.ingress_base import IngressBase, app
from entropyinfer.cluster.policy_actor import find_actor
from entropyinfer.cluster.replica import app_name
from entropyinfer.policies.head_heatmap import PANELS, profile_heatmap

POLICY_TIMEOUT_S = 5.0


class PolicyRoutes(IngressBase):
    """`/v1/policy/heads` and `/v1/policy/heads.png`."""

    async def _policy_snapshot(self) -> dict[str, Any]:
        if not self.config.policy.enabled:
            raise HTTPError(404, "the policy actor is disabled (policy.enabled: false)", "not_found")
        actor = await asyncio.to_thread(find_actor, app_name())
        if actor is None:
            raise HTTPError(503, "the policy actor has not started yet; retry later", "unavailable")
        try:
            return dict(await asyncio.wait_for(actor.snapshot.remote(), POLICY_TIMEOUT_S))
        except asyncio.TimeoutError:
            raise HTTPError(
                503, f"the policy actor did not answer within {POLICY_TIMEOUT_S:g}s", "unavailable"
            ) from None
        except Exception as e:  # dead, or failed to start (e.g. a profile of another model)
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise HTTPError(503, f"the policy actor is unavailable: {first[:500]}", "unavailable") from None

    async def _shard_links(self) -> list[Any]:
        try:
            status = await asyncio.wait_for(self.engine.status.remote(), POLICY_TIMEOUT_S)
        except Exception:
            return []
        return [s.get("policy") for s in status.get("shards", [])]

    @app.get("/v1/policy/heads")
    async def policy_heads(self) -> dict[str, Any]:
        shards = asyncio.ensure_future(self._shard_links())
        try:
            snapshot = await self._policy_snapshot()
            snapshot["actor"] = {"state": "ok"}
        except HTTPError as e:
            if e.status == 404:
                shards.cancel()
                raise
            snapshot = {"actor": {"state": "unavailable", "error": e.message}, "table": None}
        snapshot["shards"] = await shards
        snapshot["png_panels"] = list(PANELS)
        return snapshot

    @app.get("/v1/policy/heads.png")
    async def policy_heads_png(self) -> Response:
        snapshot = await self._policy_snapshot()
        png = await asyncio.to_thread(profile_heatmap, snapshot)
        headers = {"X-Panels": ",".join(PANELS), "X-Table-Version": str(snapshot["table"]["version"])}
        return Response(png, media_type="image/png", headers=headers)
