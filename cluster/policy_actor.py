"""The central policy actor: one named, detached Ray actor per Serve application (ARCHITECTURE.md).

    shard actor --push(HeadStats msgpack), fire and forget--> PolicyActor --table()--> shard (background)
    shard actor --push_kept(KeepStats msgpack), likewise--> PolicyActor --shares()--> shard (background)

`PolicyActor` holds one model's `Rebalancer` (`policies/head_budgets.py`): every request's head statistics
go into its `HeadProfile`, and a new `HeadBudgetTable` is made at most once per `every_requests` requests
and `every_s` seconds; with `profile_path` the profile is loaded at start (warm start; a profile of another
model fails the actor's start with `ProfileMismatchError`, which every caller then sees) and saved with each
new version. Beside it a `ShareLearner` (`policies/segment_shares.py`) averages where each sequence's first
compression kept prompt positions and makes versioned `SegmentShares` (the learned split of an SP
sequence's compression capacity; same rate limit; saved in the profile file too).
It is named ``entropyinfer-policy-<app>`` in the ``entropyinfer`` namespace, detached (it
outlives the replicas that made it) and restarted by Ray when it dies (``max_restarts=-1``; the restarted
one warm-starts from the profile file). It is scheduled outside every placement group (``"DEFAULT"``): the
shard that makes it runs in its Serve replica's placement group, which captures child actors, and Ray kills
the actors of a removed placement group and can never restart them there; so before, a redeploy of the app
(the replicas' groups removed) left the actor RESTARTING for good (``ActorUnavailableError`` for every
caller, its name still taken).

One actor serves one configuration: `describe` returns what it was made with (the model and `settings`).
A shard's first link (once per shard process: at a deploy) compares it with its own config and replaces an
actor made with other settings (killed, made anew under the name), so a redeploy with a new density target,
rate limit or profile path takes effect; later relinks (after a failure) take the actor as it is, so the
replicas of an older deploy that still run during a rolling update never flip it back.

`PolicyClient` is the shard's side (rank 0's shard actor owns one). Nothing on the request path waits on
the actor: the engine core's sink (`sink`) only queues the encoded stats (bounded; beyond `max_pending` new
ones are dropped and counted), and a background thread sends them (``push.remote``, never awaited; the
refs are pruned without waiting) and pulls the current table every `pull_interval_s`, with `timeout_s`.
`table()` returns the cached table, pinned per request by the shard. When the actor is dead, missing or
slower than `timeout_s`, the client drops its table (requests fall back to the per-request budgets of the
entropy rule), logs it once, and looks the actor up again after `retry_s` (get_if_exists: a dead one is
made anew). The first call on each new link waits up to `connect_timeout_s` (a new actor's worker can
take seconds to start on a busy machine; before, each 2 s timeout was a failure and a retry); the first
link also replaces an actor of other settings.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from pathlib import Path
from typing import Any

import ray

from entropyinfer.cluster.config import PolicyActorConfig
from entropyinfer.policies.head_budgets import (
    HeadBudgetTable,
    Rebalancer,
    load_profile,
    load_shares,
    save_profile,
)
from entropyinfer.policies.head_stats import HeadProfile, HeadStats, decode_stats, encode_stats
from entropyinfer.policies.segment_shares import (
    KeepStats,
    SegmentShares,
    ShareLearner,
    decode_keep_stats,
    encode_keep_stats,
)

__all__ = [
    "NAMESPACE",
    "PolicyActor",
    "PolicyClient",
    "actor_name",
    "description",
    "find_actor",
    "get_or_create",
    "settings",
]

log = logging.getLogger(__name__)

NAMESPACE = "entropyinfer"


def actor_name(app_name: str) -> str:
    return f"entropyinfer-policy-{app_name}"


def settings(config: PolicyActorConfig) -> dict[str, Any]:
    """The fields of `config` the actor itself uses (the rest are the shards' link settings)."""
    c = config
    return {
        "rebalance_heads": c.rebalance_heads,
        "density_target": c.density_target,
        "every_requests": c.every_requests,
        "every_s": c.every_s,
        "warmup_requests": c.warmup_requests,
        "profile_path": c.profile_path,
    }


def description(config: PolicyActorConfig, model: str, num_layers: int, num_kv_heads: int) -> dict[str, Any]:
    """What an actor made with these arguments answers to `describe` (a shard compares the two)."""
    shape = {"num_layers": num_layers, "num_kv_heads": num_kv_heads}
    return {"model": model, **shape, "settings": settings(config)}


class PolicyActor:
    """Wrapped with `ray.remote` by `get_or_create`. One model; calls run one at a time."""

    def __init__(self, config: PolicyActorConfig, model: str, num_layers: int, num_kv_heads: int) -> None:
        self.config = config
        self.identity = (model, num_layers, num_kv_heads)
        profile, table = HeadProfile(model, num_layers, num_kv_heads), None
        path = Path(config.profile_path).expanduser() if config.profile_path else None
        if path is not None and path.exists():
            profile, table = load_profile(path, model, num_layers, num_kv_heads)  # ProfileMismatchError
            log.info("policy actor: warm start from %s (%d requests)", path, profile.total_requests)
        self.path = path
        self.rebalancer = Rebalancer(profile, config.rebalance, table)
        c = config  # where compression keeps positions: the learned split of SP capacity
        self.learner = ShareLearner(
            model, num_layers, num_kv_heads, c.every_requests, c.every_s, c.warmup_requests
        )
        saved = load_shares(path) if path is not None and path.exists() else None
        if saved is not None:
            try:
                self.learner.restore(saved)
            except (ValueError, KeyError, TypeError) as e:  # the head profile stays; shares start anew
                log.warning("policy actor: saved segment shares not usable (%s); learning them anew", e)
        self.rejected = 0  # pushes of another model or shape, or undecodable

    def push(self, blob: bytes) -> int:
        """One request's `HeadStats` (msgpack); returns the current table version."""
        try:
            stats = decode_stats(blob)
            table = self.rebalancer.observe(stats)
        except ValueError:
            self.rejected += 1
            log.warning("policy actor: rejected head statistics (another model, shape or wire version)")
            return self.rebalancer.current.version
        if table is not None:
            self.save()
        return self.rebalancer.current.version

    def push_kept(self, blob: bytes) -> int:
        """One sequence's `KeepStats` (msgpack); returns the current segment-shares version."""
        try:
            made = self.learner.observe(decode_keep_stats(blob))
        except (ValueError, TypeError):
            self.rejected += 1
            log.warning("policy actor: rejected keep statistics (another model, shape or wire version)")
            return self.learner.current.version
        if made is not None:
            self.save()
        return self.learner.current.version

    def shares(self) -> dict[str, Any]:
        """The current `SegmentShares` (version 0: none yet)."""
        return self.learner.current.to_dict()

    def merge(self, profile: dict[str, Any]) -> int:
        """Another group's whole profile (`HeadProfile.to_dict`); returns the current table version."""
        if self.rebalancer.merge(HeadProfile.from_dict(profile)) is not None:
            self.save()
        return self.rebalancer.current.version

    def table(self) -> dict[str, Any]:
        return self.rebalancer.current.to_dict()

    def profile(self) -> dict[str, Any]:
        return self.rebalancer.profile.to_dict()

    def describe(self) -> dict[str, Any]:
        """The model and settings this actor was made with (`description`)."""
        return description(self.config, *self.identity)

    def snapshot(self) -> dict[str, Any]:
        """What `GET /v1/policy/heads` shows: the table, the statistics per (layer, head), the settings."""
        model, layers, heads = self.identity
        return {
            "model": model,
            "num_layers": layers,
            "num_kv_heads": heads,
            "table": self.table(),
            "statistics": self.rebalancer.profile.summary(),
            "segment_shares": {
                "version": self.learner.current.version,
                "compressions": self.learner.requests,
                "bins": self.learner.mean().tolist(),
            },
            "rejected": self.rejected,
            "config": settings(self.config),
        }

    def save(self) -> str | None:
        """Write the profile and table to `profile_path` (None: not configured)."""
        if self.path is None:
            return None
        rb = self.rebalancer
        return str(save_profile(self.path, rb.profile, rb.current, self.learner.to_dict()))


def get_or_create(
    config: PolicyActorConfig, app_name: str, model: str, num_layers: int, num_kv_heads: int
) -> Any:
    """The application's policy actor, made if it does not exist (named, detached, restarted by Ray, in no
    placement group: see the module docstring)."""
    remote: Any = ray.remote(PolicyActor)
    return remote.options(
        name=actor_name(app_name),
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        num_cpus=0,
        scheduling_strategy="DEFAULT",
    ).remote(config, model, num_layers, num_kv_heads)


def find_actor(app_name: str) -> Any | None:
    """The application's policy actor, or None if none was made (the shards make it)."""
    try:
        return ray.get_actor(actor_name(app_name), namespace=NAMESPACE)
    except ValueError:
        return None


class PolicyClient:
    """A shard's link to the policy actor: a queue of stats to push and the cached table (see the module
    docstring). `connect` makes (or finds) the actor; tests pass their own."""

    def __init__(
        self, config: PolicyActorConfig, model: str, num_layers: int, num_kv_heads: int, connect: Any
    ) -> None:
        self.config, self.model = config, model
        self.shape = (num_layers, num_kv_heads)
        self._connect = connect  # () -> actor handle
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque()  # (actor method, blob)
        self._pending: list[Any] = []
        self._table: HeadBudgetTable | None = None
        self._shares: SegmentShares | None = None
        self._handle: Any = None
        self._linked = False  # the first link checked the actor's settings (see `_link`)
        self._retry_at = 0.0
        self._next_pull = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.state = "starting"  # "ok" | "unavailable"
        names = ("queued", "pushed", "dropped", "failures", "logged", "pulls", "replaced", "share_failures")
        self.counters = dict.fromkeys(names, 0)
        self._thread = threading.Thread(target=self._loop, name="policy-client", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the request path (never waits)
    def table(self) -> HeadBudgetTable | None:
        """The table to pin for a new request (None: the entropy rule's own budgets)."""
        return self._table

    def shares(self) -> SegmentShares | None:
        """The segment shares to pin for a new request (None: the exact split)."""
        return self._shares

    def sink(self, request_id: str, stats: HeadStats) -> None:
        """The engine core's head statistics sink (model thread): encode and queue, at once."""
        self._enqueue("push", encode_stats(stats))

    def sink_kept(self, request_id: str, stats: KeepStats) -> None:
        """The engine core's sink of where compression kept positions (model thread): likewise."""
        self._enqueue("push_kept", encode_keep_stats(stats))

    def _enqueue(self, method: str, blob: bytes) -> None:
        with self._lock:
            if len(self._queue) + len(self._pending) >= self.config.max_pending:
                self.counters["dropped"] += 1
                return
            self._queue.append((method, blob))
            self.counters["queued"] += 1
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        table = self._table
        return {
            "state": self.state,
            "table_version": 0 if table is None else table.version,
            "shares_version": 0 if self._shares is None else self._shares.version,
            "pending": len(self._queue) + len(self._pending),
            **self.counters,
        }

    def close(self) -> None:
        self._stop.set()
        self._wake.set()

    # ------------------------------------------------------------------ the background thread
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.pull_interval_s)
            self._wake.clear()
            if self._stop.is_set() or time.monotonic() < self._retry_at:
                continue
            try:
                self._tick()
            except Exception as e:  # dead, missing, slow, or a profile of another model
                self._down(e)

    def _tick(self) -> None:
        fresh = self._handle is None  # a (re)made actor's worker may take seconds to start: wait longer
        if fresh:
            self._handle = self._connect() if self._linked else self._link()
        handle = self._handle
        if self._pending:  # prune finished pushes without waiting; a failed one raises here
            done, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
            ray.get(done, timeout=self.config.timeout_s)
        while True:
            with self._lock:
                if not self._queue:
                    break
                method, blob = self._queue.popleft()
            try:
                remote = getattr(handle, method)
            except AttributeError:  # an actor of an older entropyinfer, without `push_kept`
                self.counters["dropped"] += 1
                continue
            self._pending.append(remote.remote(blob))  # fire and forget
            self.counters["pushed"] += 1
        now = time.monotonic()
        if now >= self._next_pull or fresh:
            self._next_pull = now + self.config.pull_interval_s
            c = self.config
            wait = c.connect_timeout_s if fresh else c.timeout_s
            table = HeadBudgetTable.from_dict(ray.get(handle.table.remote(), timeout=wait))
            self.counters["pulls"] += 1
            if (table.model, table.shape) == (self.model, self.shape):
                self._table = table
            self._pull_shares(handle, wait)
            if self.state != "ok":
                if self.state == "unavailable":
                    log.warning("policy actor is back: head budget tables again (v%d)", table.version)
                self.state = "ok"

    def _pull_shares(self, handle: Any, wait: float) -> None:
        """The segment shares; a failure here (an older actor without them, a bad table) only means the
        exact SP split, never the loss of the head table."""
        try:
            shares = SegmentShares.from_dict(ray.get(handle.shares.remote(), timeout=wait))
        except Exception:
            self._shares = None
            self.counters["share_failures"] += 1
            return
        if (shares.model, shares.shape) == (self.model, self.shape):
            self._shares = shares

    def _link(self) -> Any:
        """The first link: the actor if it was made with this shard's model and settings, else a new one
        (the old one killed; `connect` again until the name holds another actor)."""
        handle = self._connect()
        want = description(self.config, self.model, *self.shape)
        try:
            have = ray.get(handle.describe.remote(), timeout=self.config.connect_timeout_s)
        except AttributeError:  # an actor of an older entropyinfer, without `describe`
            have = None
        if have != want:
            log.warning("policy actor made with %s; replacing it with one made with %s", have, want)
            old = handle._actor_id
            ray.kill(handle, no_restart=True)
            deadline = time.monotonic() + self.config.connect_timeout_s
            while (handle := self._connect())._actor_id == old:
                if time.monotonic() > deadline:
                    raise TimeoutError("the replaced policy actor still holds its name")
                time.sleep(0.1)
            self.counters["replaced"] += 1
        self._linked = True
        return handle

    def _down(self, error: Exception) -> None:
        self.counters["failures"] += 1
        self._table, self._shares, self._handle, self._pending = None, None, None, []
        self._retry_at = time.monotonic() + self.config.retry_s
        if self.state != "unavailable":
            self.state = "unavailable"
            self.counters["logged"] += 1
            log.warning(
                "policy actor unavailable (%s: %s); requests fall back to per-request budgets, retrying "
                "every %.0fs",
                type(error).__name__,
                str(error).splitlines()[0][:300] if str(error) else "",
                self.config.retry_s,
            )
