"""The central policy actor (cluster/policy_actor.py) in the session's Serve app (real SmolLM2 on CPU,
`policy.enabled` in tests/cluster/conftest.py): entropy requests' head statistics reach it and make table
versions; GET /v1/policy/heads (JSON) and /v1/policy/heads.png over HTTP; a killed actor (no restart)
does not stop serving, the shard falls back, logs once, and finds a new actor; a killed actor with
restarts comes back under its name. With the session's Ray but no Serve: the actor outlives the placement
group of the shard that made it (a redeploy removes the replicas' groups), a new deploy's settings replace
the actor of the old one (and the old deploy's shards do not flip it back), a slow actor does not slow a
shard's requests (the tiny Llama); and the actor class itself: two shard groups' statistics aggregate as
one, a profile of another model is refused at start."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from entropyinfer.cluster.config import PolicyActorConfig
from entropyinfer.cluster.events import Final, Request
from entropyinfer.cluster.launcher import APP_NAME, EmbeddedServer
from entropyinfer.cluster.policy_actor import (
    PolicyActor,
    PolicyClient,
    find_actor,
    get_or_create,
    settings,
)
from entropyinfer.cluster.shard_actor import ShardActor
from entropyinfer.policies.head_budgets import ProfileMismatchError, save_profile
from entropyinfer.policies.head_stats import HeadProfile, HeadStats, encode_stats
from entropyinfer.policies.segment_shares import POSITION_BINS, KeepStats, encode_keep_stats
from entropyinfer.shard.head_report import StatsSinks
from entropyinfer.shard.llm import LLM
from entropyinfer.shard.sampling import SamplingParams

from .conftest import API_KEY

pytestmark = [pytest.mark.serve]
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# ~900 SmolLM2 tokens: sparse segments under entropy_short (S=128, dense before 512 and the last)
DOCUMENT = " ".join(
    f"Entry {i}: the {c} lighthouse keeper counted {i * 7 % 31} ships before dawn."
    for i, c in zip(range(60), ["red", "green", "blue", "grey", "white"] * 12, strict=True)
)


def _complete(url: str, prompt: str = DOCUMENT, timeout: float = 120.0) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 1, "policy": "entropy", "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=timeout)


def _heads(url: str) -> dict[str, Any]:
    r = httpx.get(url + "/v1/policy/heads", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _ready(heads: dict[str, Any], requests: int) -> dict[str, Any] | None:
    ok = heads["actor"]["state"] == "ok" and heads["statistics"]["requests"] >= requests
    return heads if ok else None


def _until(predicate: Any, timeout: float = 30.0, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def test_entropy_requests_make_versions_and_the_heat_map_is_served(server: EmbeddedServer) -> None:
    url = server.url
    before = _heads(url)
    for _ in range(2):  # a version per 2 entropy requests (tests/cluster/conftest.py)
        assert _complete(url).status_code == 200
    seen = _until(lambda: _ready(_heads(url), 2), timeout=60)
    assert seen, (_heads(url)["actor"], _heads(url)["shards"])
    assert seen["model"] == "smollm2-135m" and (seen["num_layers"], seen["num_kv_heads"]) == (30, 3)
    assert seen["table"]["version"] >= 1 and len(seen["table"]["scales"]) == 30
    stats = seen["statistics"]
    assert stats["requests"] > before.get("statistics", {}).get("requests", 0)
    rigid = np.array(stats["rigid_frequency"], dtype=float)
    assert rigid.shape == (30, 3) and np.isnan(rigid[0]).all()  # layer 0 runs dense
    assert np.isfinite(rigid[1:]).all() and ((rigid[1:] >= 0) & (rigid[1:] <= 1)).all()
    assert stats["rigid_jaccard"] is not None and 0 <= stats["rigid_jaccard"] <= 1
    link = seen["shards"][0]
    assert link["state"] == "ok" and link["pushed"] >= 2 and link["dropped"] == 0
    r = httpx.get(url + "/v1/policy/heads.png", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", r.content[16:24])
    assert height == 30 * 12 + 16 and width == 3 * 3 * 12 + 4 * 8  # 3 panels of 30 x 3 cells
    assert httpx.get(url + "/v1/policy/heads.png").status_code == 401  # the key guards it too


def test_the_cli_plots_the_servers_heat_map_and_a_saved_profile(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    from entropyinfer.cli import main

    out = tmp_path / "heads.png"
    assert main(["policy", "plot", "--out", str(out), "--url", server.url, "--api-key", API_KEY]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rng = np.random.default_rng(3)
    profile = HeadProfile("m", 2, 2)
    for _ in range(3):
        profile.add(_stats(rng))
    saved = save_profile(tmp_path / "p.json", profile)
    offline = tmp_path / "offline.png"
    assert main(["policy", "plot", "--out", str(offline), "--profile", str(saved)]) == 0
    width, height = struct.unpack(">II", offline.read_bytes()[16:24])
    assert (width, height) == (3 * 2 * 12 + 4 * 8, 2 * 12 + 16)


def test_a_dead_actor_does_not_stop_serving_and_is_found_again(server: EmbeddedServer) -> None:
    import ray

    url = server.url
    assert _complete(url).status_code == 200
    _until(lambda: _heads(url)["actor"]["state"] == "ok")
    actor = find_actor(APP_NAME)
    assert actor is not None
    logged = _heads(url)["shards"][0]["logged"]  # earlier outages of this session's shard
    ray.kill(actor, no_restart=True)
    t0 = time.monotonic()
    assert _complete(url).status_code == 200  # serving goes on
    served_s = time.monotonic() - t0
    # the shard notices at its next pull (0.2 s), drops its table (per-request budgets) and logs it
    down = _until(lambda: (h := _heads(url))["shards"][0]["failures"] >= 1 and h, timeout=20)
    assert down, _heads(url)
    assert down["shards"][0]["logged"] == logged + 1
    # retry_s later the shard makes a new actor (get_if_exists) and links again
    back = _until(lambda: (h := _heads(url))["shards"][0]["state"] == "ok" and h, timeout=30)
    assert back and back["actor"]["state"] == "ok", _heads(url)
    assert back["shards"][0]["logged"] == logged + 1  # one outage, one log line
    assert served_s < 60


def test_a_killed_actor_is_restarted_by_ray_under_its_name(server: EmbeddedServer) -> None:
    import ray

    _until(lambda: _heads(server.url)["actor"]["state"] == "ok")
    actor = find_actor(APP_NAME)
    ray.kill(actor, no_restart=False)
    table = _until(lambda: _try(lambda: ray.get(actor.table.remote(), timeout=5)), timeout=60, every=0.5)
    assert table and table["model"] == "smollm2-135m"


def _try(fn: Any) -> Any:
    try:
        return fn()
    except Exception:
        return None


# -------------------------------------------------------------------- without Serve


def test_the_actor_outlives_the_placement_group_of_the_shard_that_made_it(server: EmbeddedServer) -> None:
    """A Serve replica's placement group captures its children, the shard actor and so (before) the policy
    actor it made: removing the group (a redeploy) killed the actor, which Ray could not restart (the
    group is gone): ActorUnavailableError for every caller, for good. It must be in no group."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0)
    class Shard:  # like the shard actor: in a placement group that captures child tasks
        def link(self, config: PolicyActorConfig, app: str) -> str:
            get_or_create(config, app, "m", 2, 2)
            return "linked"

    app, cfg = "test-placement-group", PolicyActorConfig(enabled=True)
    pg = placement_group([{"CPU": 0.01}])
    ray.get(pg.ready(), timeout=60)
    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
    shard = Shard.options(scheduling_strategy=strategy).remote()  # type: ignore[attr-defined]
    try:
        assert ray.get(shard.link.remote(cfg, app), timeout=60) == "linked"
        actor = find_actor(app)
        assert actor is not None and ray.get(actor.describe.remote(), timeout=60)["model"] == "m"
        remove_placement_group(pg)
        assert _until(lambda: _try(lambda: ray.get(shard.link.remote(cfg, app), timeout=5)) is None, 30)
        assert ray.get(actor.table.remote(), timeout=10)["model"] == "m"  # not killed with the group
    finally:
        actor = find_actor(app)
        if actor is not None:
            ray.kill(actor, no_restart=True)


def test_a_new_deploys_settings_replace_the_actor_and_the_old_deploy_does_not_flip_it(
    server: EmbeddedServer,
) -> None:
    import ray

    app = "test-redeploy"
    old = PolicyActorConfig(enabled=True, every_requests=5, pull_interval_s=0.05, retry_s=0.3)
    new = replace(old, density_target=0.3, every_requests=7, profile_path="/nonexistent/heads.json")

    def shard(cfg: PolicyActorConfig) -> PolicyClient:
        return PolicyClient(cfg, "m", 2, 2, lambda: get_or_create(cfg, app, "m", 2, 2))

    clients = [shard(old)]  # the running deploy's shard
    try:
        assert _until(lambda: clients[0].state == "ok", timeout=60)
        first = find_actor(app)
        assert first is not None
        clients.append(shard(new))  # the new deploy's shard: replaces the actor at its first link
        assert _until(lambda: clients[1].state == "ok", timeout=60)
        actor = find_actor(app)
        assert actor is not None and actor._actor_id != first._actor_id
        assert ray.get(actor.describe.remote(), timeout=10)["settings"] == settings(new)
        assert clients[1].counters["replaced"] == 1
        # the old deploy's shard loses its actor, relinks to the new one by name, and keeps it
        assert _until(lambda: clients[0].counters["failures"] >= 1 and clients[0].state == "ok", 30)
        clients.append(shard(new))  # another shard of the new deploy: same settings, same actor
        assert _until(lambda: clients[2].state == "ok", timeout=60)
        assert clients[0].counters["replaced"] == clients[2].counters["replaced"] == 0
        now = find_actor(app)
        assert now is not None and now._actor_id == actor._actor_id
        assert ray.get(now.describe.remote(), timeout=10)["settings"] == settings(new)
    finally:
        for client in clients:
            client.close()
        actor = find_actor(app)
        if actor is not None:
            ray.kill(actor, no_restart=True)


def test_kept_positions_reach_the_actor_and_its_segment_shares_come_back(server: EmbeddedServer) -> None:
    """A shard's kept-position statistics (fire and forget) make the actor's segment shares, which the
    client pulls in the background and hands out for pinning (the learned SP split)."""
    import ray

    app = "test-shares"
    cfg = PolicyActorConfig(
        enabled=True, every_requests=2, every_s=0.0, warmup_requests=2, pull_interval_s=0.05
    )
    client = PolicyClient(cfg, "m", 2, 2, lambda: get_or_create(cfg, app, "m", 2, 2))
    try:
        assert _until(lambda: client.state == "ok", timeout=60)
        assert client.shares() is not None and client.shares().version == 0  # type: ignore[union-attr]
        for _ in range(2):
            client.sink_kept("r", _kept([0.75, 0.25]))
        shares = _until(lambda: (t := client.shares()) is not None and t.version >= 1 and t, timeout=30)
        assert shares, client.stats()
        np.testing.assert_allclose(shares.bins[..., :2], np.broadcast_to([0.75, 0.25], (2, 2, 2)), rtol=1e-6)
        assert client.table() is not None and client.table().version == 0  # type: ignore[union-attr]
    finally:
        client.close()
        actor = find_actor(app)
        if actor is not None:
            ray.kill(actor, no_restart=True)


@pytest.fixture(scope="module")
def tiny_shard(tiny_checkpoint: Path) -> ShardActor:
    llm = LLM(
        str(tiny_checkpoint), load_format="dummy", device="cpu", warm_up_kernels=False, policy="entropy"
    )
    return ShardActor.with_llm(llm, "tiny")


def _timed_requests(shard: ShardActor, tag: str, count: int = 3) -> list[float]:
    async def one(i: int) -> float:
        t0 = time.perf_counter()
        prompt = "".join(chr(97 + (j * 5 + i) % 26) for j in range(860))
        events = [e async for e in shard.run(Request(f"{tag}-{i}", prompt, SamplingParams(max_tokens=2)))]
        assert isinstance(events[-1], Final) and events[-1].completion_tokens == 2
        return time.perf_counter() - t0

    return [asyncio.run(one(i)) for i in range(count)]


def test_a_slow_actor_does_not_slow_a_shards_requests(
    server: EmbeddedServer, tiny_shard: ShardActor, caplog: pytest.LogCaptureFixture
) -> None:
    import ray

    @ray.remote(num_cpus=0)
    class SlowPolicy:
        def describe(self) -> dict[str, Any]:
            time.sleep(30)
            return {}

        def push(self, blob: bytes) -> int:
            time.sleep(30)
            return 0

        def table(self) -> dict[str, Any]:
            time.sleep(30)
            return {}

    baseline = _timed_requests(tiny_shard, "base")
    slow = SlowPolicy.remote()  # type: ignore[attr-defined]
    cfg = PolicyActorConfig(
        enabled=True, pull_interval_s=0.05, timeout_s=0.3, connect_timeout_s=0.3, retry_s=600.0
    )
    with caplog.at_level(logging.WARNING, logger="entropyinfer.cluster.policy_actor"):
        tiny_shard.link_policy(cfg, "unused", connect=lambda: slow)
        client = tiny_shard._policy
        assert client is not None
        try:
            linked = _timed_requests(tiny_shard, "slow", count=4)
            assert _until(lambda: client.state == "unavailable", timeout=10)
            after = _timed_requests(tiny_shard, "after")
        finally:
            client.close()
            tiny_shard._policy, tiny_shard.llm.core.sinks = None, StatsSinks()
            ray.kill(slow)
    assert max(linked + after) < 2 * max(baseline) + 1.0, (baseline, linked, after)
    assert client.counters["queued"] >= 4 and client.table() is None
    assert sum("policy actor unavailable" in r.getMessage() for r in caplog.records) == 1


# -------------------------------------------------------------------- the actor class itself (no Ray)


def _stats(rng: np.random.Generator, model: str = "m") -> HeadStats:
    dense = np.array([True] * 4 + [False] * 3 + [True])
    profiled = np.array([False, True])
    entropy = rng.uniform(0.1, 3.0, (2, 2, 8)).astype(np.float32)
    counts = rng.integers(2, 30, (2, 2, 8)).astype(np.int32)
    captured = rng.uniform(0.2, 1.0, (2, 2, 8)).astype(np.float32)
    rigid = rng.random((2, 2)) < 0.5
    return HeadStats(model, 1000, 128, 8, profiled, entropy, counts, captured, rigid, dense)


def test_two_shard_groups_statistics_aggregate_in_the_actor_as_one() -> None:
    cfg = PolicyActorConfig(enabled=True, every_requests=100)
    rng = np.random.default_rng(0)
    requests = [_stats(rng) for _ in range(8)]
    one, group_a, group_b = (PolicyActor(cfg, "m", 2, 2) for _ in range(3))
    for i, st in enumerate(requests):
        one.push(encode_stats(st))
        (group_a if i % 2 else group_b).push(encode_stats(st))
    group_a.merge(group_b.profile())
    a, b = group_a.snapshot()["statistics"], one.snapshot()["statistics"]
    for key in ("entropy_mean", "entropy_var", "rigid_frequency", "captured_mean", "budget_mean"):
        np.testing.assert_allclose(
            np.array(a[key], dtype=float), np.array(b[key], dtype=float), rtol=1e-5, equal_nan=True
        )
    assert a["requests"] == b["requests"] == 8
    assert one.push(encode_stats(_stats(rng, model="other"))) == 0 and one.rejected == 1


def _kept(row: list[float], model: str = "m") -> KeepStats:
    fractions = np.zeros((2, 2, POSITION_BINS), dtype=np.float32)
    fractions[..., : len(row)] = row
    return KeepStats(model, fractions, np.ones((2, 2), dtype=np.float32))


def test_kept_statistics_make_rate_limited_segment_shares_saved_for_a_warm_start(tmp_path: Path) -> None:
    path = tmp_path / "heads.json"
    cfg = PolicyActorConfig(
        enabled=True, every_requests=2, every_s=0.0, warmup_requests=3, profile_path=str(path)
    )
    actor = PolicyActor(cfg, "m", 2, 2)  # no head rebalancing, yet segment shares: not in the cache key
    versions = [
        actor.push_kept(encode_keep_stats(_kept([1.0, 0.0] if i % 2 else [0.0, 1.0]))) for i in range(5)
    ]
    assert versions == [0, 0, 1, 1, 2]
    shares = actor.shares()
    assert shares["version"] == 2 and np.allclose(np.array(shares["bins"])[..., :2], [0.4, 0.6])
    assert actor.push_kept(encode_keep_stats(_kept([1.0], model="other"))) == 2 and actor.rejected == 1
    assert actor.push_kept(b"not msgpack of keep stats") == 2 and actor.rejected == 2
    snap = actor.snapshot()["segment_shares"]
    assert snap["version"] == 2 and snap["compressions"] == 5
    assert actor.table()["version"] == 0  # head tables untouched
    again = PolicyActor(cfg, "m", 2, 2)  # saved with each shares version: a restart continues from it
    assert again.shares() == shares and again.learner.requests == 5
    body = json.loads(path.read_text())
    body["segment_shares"]["sums"] = [[1.0]]  # unusable shares: the actor starts, the head profile kept
    path.write_text(json.dumps(body))
    fresh = PolicyActor(cfg, "m", 2, 2)
    assert fresh.shares()["version"] == 0 and fresh.snapshot()["statistics"]["requests"] == 0


def test_the_actor_warm_starts_from_its_profile_and_refuses_another_models(tmp_path: Path) -> None:
    path = tmp_path / "heads.json"
    cfg = PolicyActorConfig(
        enabled=True, rebalance_heads=True, every_requests=2, every_s=0, warmup_requests=2,
        profile_path=str(path),
    )  # fmt: skip
    actor = PolicyActor(cfg, "m", 2, 2)
    rng = np.random.default_rng(1)
    for _ in range(4):
        actor.push(encode_stats(_stats(rng)))
    assert path.exists() and actor.table()["version"] == 2  # saved with each version
    again = PolicyActor(cfg, "m", 2, 2)
    assert again.table() == actor.table() and again.snapshot()["statistics"]["requests"] == 4
    with pytest.raises(ProfileMismatchError, match=r"'m'.*'smollm2-135m'"):
        PolicyActor(cfg, "smollm2-135m", 2, 2)
    save_profile(path, HeadProfile("m", 3, 2))
    with pytest.raises(ProfileMismatchError, match="3 layers"):
        PolicyActor(cfg, "m", 2, 2)


def test_policy_client_stats_without_an_actor_never_block() -> None:
    """The request path of the client (sink, table) returns at once even before any actor exists."""

    def never() -> Any:
        raise RuntimeError("no actor")

    cfg = PolicyActorConfig(enabled=True, max_pending=2, pull_interval_s=0.05, retry_s=600.0)
    client = PolicyClient(cfg, "m", 2, 2, never)
    try:
        t0 = time.perf_counter()
        for _ in range(5):
            client.sink("r", _stats(np.random.default_rng(2)))
            assert client.table() is None
        assert time.perf_counter() - t0 < 0.5
        assert _until(lambda: client.state == "unavailable", timeout=5)
        assert client.counters["dropped"] >= 3 and client.counters["logged"] == 1
    finally:
        client.close()
