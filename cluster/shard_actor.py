"""The shard actor: rank 0 of an engine replica, in bundle 0 of its placement group; holds the `LLM`.

With `tensor_parallel_size=k` it owns the group: the engine core runs here (rank 0) and ranks 1..k-1 run
where `ranks()` starts them (`shard_group.RayRanks`: Ray actors in bundles 1..k-1). A rank that dies fails
the requests in flight with `ShardGroupError` (a 503 for HTTP clients); the step loop then closes the
group and builds a new one (also when a rank dies while idle: it checks every IDLE_CHECK_S), and `stats()`
reports each rank's health and the failed rank (`GroupHealth`).

`run(request)` answers an `events.Request` with typed events (cluster/events.py). The request is
validated at once (policy, prompt length; its `SamplingParams` was validated where it was built) and
answered with `Accepted`, or with an `Error` naming the field to fix; it then joins the engine core's
batch: the step loop (`StepLoop`) runs on the shard's one model thread, adds new requests between steps
and steps the core (shard/engine_core.py) while any request is unfinished, so concurrent requests decode
together and no Ray call happens per step. Events: `Progress` while it prefills (repeated every
KEEPALIVE_S as a keepalive), `Token` for streaming requests, `Final` last.

`cancel(request_id)` sets the request's cancel event; the engine checks it between prefill chunks and
decode steps, and the request ends with a `Final` whose finish_reason is "cancelled". A cancel for a
request this shard is not running is kept EARLY_CANCEL_TTL_S (actor tasks of an async actor may start out
of order, so it can come before its request) and then dropped: cancels of finished or rejected requests
leave nothing behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

from entropyinfer.cluster.events import Accepted, Error, Event, Final, Progress, Prompt, Request, Token
from entropyinfer.cluster.logprobs import Entry, output_entries, token_entry
from entropyinfer.errors import PromptTooLongError

if TYPE_CHECKING:
    from entropyinfer.cluster.config import PolicyActorConfig
    from entropyinfer.cluster.policy_actor import PolicyClient
    from entropyinfer.cluster.shard_group import GroupHealth, ShardGroup
    from entropyinfer.shard.config import LLMConfig
    from entropyinfer.shard.engine_core import EngineEvent
    from entropyinfer.shard.llm import LLM, RequestOutput
    from entropyinfer.shard.parallel.launch import Ranks
    from entropyinfer.shard.sequence import SequenceRequest

Sink = Callable[["EngineEvent | BaseException"], None]

log = logging.getLogger(__name__)

KEEPALIVE_S = 1.0
PROGRESS_EVERY_S = 0.2
EARLY_CANCEL_TTL_S = 60.0  # how long a cancel for a request not (yet) running here is remembered
EARLY_CANCEL_MAX = 10_000  # and how many at most
IDLE_CHECK_S = 1.0  # an idle tensor-parallel group checks its ranks this often (a dead one: rebuild)
REBUILD_RETRY_S = 5.0  # after a failed rebuild, the idle loop waits this long before the next try


class ShardInfo(TypedDict):
    model: str
    max_context: int
    device: str
    load_s: float
    rank: int
    tensor_parallel_size: int


class ShardStats(TypedDict):
    busy: int  # requests in flight (validating or running)
    running: int  # requests holding a cancel event here
    cancelled: int  # requests the model stopped early because they were cancelled
    early_cancels: int  # cancels remembered for requests not (yet) running here
    # the core's `counts()`: running, waiting, swapped, preempted, kv_pages_used/total, prefix_cache_*
    engine_core: dict[str, float]
    group: GroupHealth
    policy: NotRequired[dict[str, Any]]  # the policy actor link (`PolicyClient.stats`), when enabled


class ShardActor:
    """Wrapped with `ray.remote` by the engine deployment (this module does not import Ray)."""

    def __init__(
        self,
        config: LLMConfig,
        rank: int = 0,
        world_size: int = 1,
        cpu_threads: int | None = None,
        ranks: Callable[[], Ranks] | None = None,
        policy: PolicyActorConfig | None = None,
        app_name: str = "",
    ) -> None:
        """`ranks`: makes where ranks 1.. of a tensor-parallel `config` run (called again for each rebuilt
        group); None: processes of this machine (`LocalRanks`). `policy` (enabled): link this shard to the
        application `app_name`'s policy actor (cluster/policy_actor.py)."""
        import torch

        from entropyinfer.shard.llm import LLM

        self.rank = rank
        self.world_size = world_size
        if config.model.device in (None, "cpu") and not torch.cuda.is_available():
            torch.set_num_threads(int(cpu_threads or os.cpu_count() or 1))
        t0 = time.perf_counter()
        if config.parallel.world_size > 1:
            from entropyinfer.cluster.shard_group import ShardGroup

            group = ShardGroup(config, ranks)
            self._setup(group.build(), config.model.model, time.perf_counter() - t0, group)
        else:
            self._setup(LLM.from_config(config), config.model.model, time.perf_counter() - t0)
        if policy is not None and policy.enabled:
            self.link_policy(policy, app_name)
        from entropyinfer.shard.parallel.launch import freeze_start_up_objects

        freeze_start_up_objects()  # this actor serves this engine for its whole life

    @classmethod
    def with_llm(cls, llm: LLM, model_name: str = "test", rank: int = 0, world_size: int = 1) -> ShardActor:
        """A shard around an already built LLM: for tests and for embedding without Ray."""
        shard = cls.__new__(cls)
        shard.rank, shard.world_size = rank, world_size
        shard._setup(llm, model_name, 0.0)
        return shard

    def _setup(self, llm: LLM, model_name: str, load_s: float, group: ShardGroup | None = None) -> None:
        self.llm = llm
        self.load_s = load_s
        self.model_name = model_name
        self._group = group
        self._steps = StepLoop(llm, self._rebuild if group is not None else None)
        self._cancels: dict[str, threading.Event] = {}  # requests running here
        self._early_cancels: OrderedDict[str, float] = OrderedDict()  # request id -> monotonic time
        self._busy = 0
        self._cancelled = 0  # requests the model stopped early because they were cancelled
        self._policy: PolicyClient | None = None

    def link_policy(self, config: PolicyActorConfig, app_name: str, connect: Any = None) -> None:
        """Push this shard's head statistics to the policy actor and pin its tables (in the background;
        `connect` makes the actor handle, default the application's named actor)."""
        from entropyinfer.cluster.policy_actor import PolicyClient, get_or_create

        arch, name = self.llm.core.full_arch, self.model_name
        if connect is None:
            connect = lambda: get_or_create(config, app_name, name, arch.num_layers, arch.num_kv_heads)  # noqa: E731
        self._policy = PolicyClient(config, name, arch.num_layers, arch.num_kv_heads, connect)
        self._install_sinks()

    def _install_sinks(self) -> None:
        """The policy client's statistics sinks on the current engine core (again after a rebuild)."""
        if self._policy is not None:
            from entropyinfer.shard.head_report import StatsSinks

            self.llm.core.sinks = StatsSinks(self.model_name, self._policy.sink, self._policy.sink_kept)

    async def ready(self) -> ShardInfo:
        return {
            "model": self.model_name,
            "max_context": int(self.llm.max_context),
            "device": str(self.llm.device),
            "load_s": self.load_s,
            "rank": self.rank,
            "tensor_parallel_size": self.llm.config.parallel.tensor_parallel_size,
        }

    async def health(self) -> int:
        """Answers while a request runs (the model has its own thread); returns requests in flight."""
        return self._busy

    async def stats(self) -> ShardStats:
        """Counters for health checks and tests: requests in flight and running, cancels."""
        out: ShardStats = {
            "busy": self._busy,
            "running": len(self._cancels),
            "cancelled": self._cancelled,
            "early_cancels": len(self._early_cancels),
            "engine_core": dict(self.llm.core.counts()),
            "group": self.group_health(),
        }
        if self._policy is not None:
            out["policy"] = self._policy.stats()
        return out

    def group_health(self) -> GroupHealth:
        """The group's shape, each rank's health (rank 0: this actor) and its last failure."""
        from entropyinfer.cluster.shard_group import ShardGroup

        return (self._group or ShardGroup(self.llm.config)).health(self.llm)

    def _rebuild(self, reason: str) -> LLM:
        """On the model thread, after the group failed: close it, build a new one (raises if that fails)."""
        assert self._group is not None
        from entropyinfer.shard.parallel.launch import freeze_start_up_objects

        self.llm = self._group.rebuild(self.llm, reason)
        self._install_sinks()  # the new group's engine core starts without them
        freeze_start_up_objects()  # the old group's frozen cycles collected, the new one's frozen
        return self.llm

    async def count_tokens(self, prompts: list[Prompt]) -> list[int]:
        return await asyncio.to_thread(lambda: [self.llm.count_tokens(p) for p in prompts])

    async def cancel(self, request_id: str) -> bool:
        """Cancel a request; True if it was running here. A cancel for a request not running here (not
        started yet, or already over) is remembered for EARLY_CANCEL_TTL_S, then dropped."""
        event = self._cancels.get(request_id)
        if event is not None:
            event.set()
            return True
        self._prune_early_cancels()
        self._early_cancels[request_id] = time.monotonic()
        self._early_cancels.move_to_end(request_id)
        while len(self._early_cancels) > EARLY_CANCEL_MAX:
            self._early_cancels.popitem(last=False)
        return False

    def _prune_early_cancels(self) -> None:
        horizon = time.monotonic() - EARLY_CANCEL_TTL_S
        while self._early_cancels:
            oldest, at = next(iter(self._early_cancels.items()))
            if at >= horizon:
                break
            del self._early_cancels[oldest]

    async def run(self, request: Request) -> AsyncIterator[Event]:
        """The events of one request (see cluster/events.py); closing the stream early cancels it."""
        cancel = self._cancels.setdefault(request.request_id, threading.Event())
        self._prune_early_cancels()
        if self._early_cancels.pop(request.request_id, None) is not None:
            cancel.set()  # its cancel came first
        try:
            async for event in self._run(cancel, request):
                yield event
        finally:
            self._cancels.pop(request.request_id, None)

    async def _run(self, cancel: threading.Event, request: Request) -> AsyncIterator[Event]:
        from entropyinfer.policies.registry import get_policy

        prompt, params, policy = request.prompt, request.sampling, request.policy
        try:
            if policy is not None:
                get_policy(policy)
            n = await asyncio.to_thread(self.llm.count_tokens, prompt)
            if n + params.max_tokens > self.llm.max_context:
                raise PromptTooLongError(
                    f"the prompt has {n} tokens; with max_tokens={params.max_tokens} that exceeds the "
                    f"model's context of {self.llm.max_context} tokens: shorten it or lower max_tokens"
                )
        except Exception as e:
            rejected = Error.from_exception(e)
            if rejected is None:
                raise
            yield rejected
            return
        yield Accepted(n)

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event | BaseException | None] = asyncio.Queue()

        def put(item: Event | BaseException | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        last_progress = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if done >= total or now - last_progress[0] >= PROGRESS_EVERY_S:
                last_progress[0] = now
                put(Progress(done, total))

        def sink(item: EngineEvent | BaseException) -> None:
            from entropyinfer.shard.engine_core import Finished, TokenDelta

            if isinstance(item, TokenDelta):
                if request.stream and (item.text or item.logprobs is not None):
                    put(Token(item.text, item.token_id, token_entry(self.llm.tokenizer, item, params)))
                return
            if isinstance(item, Finished):
                if item.output.finish_reason == "cancelled":
                    self._cancelled += 1
                    put(Final("", "cancelled", 0, n))
                else:
                    put(_final(item.output, n, output_entries(self.llm.tokenizer, item.output, params)))
            else:
                put(Error.from_exception(item) or item)
            put(None)

        try:
            seq_request = await asyncio.to_thread(
                self.llm.request,
                request.request_id,
                prompt,
                params,
                policy,
                None,
                None if request.stream else progress,
                cancel,
            )
        except Exception as e:
            rejected = Error.from_exception(e)
            if rejected is None:
                raise
            yield rejected
            return
        if self._policy is not None:  # the actor's current tables, pinned for this request (never waits)
            table, shares = self._policy.table(), self._policy.shares()
            seq_request = dataclasses.replace(seq_request, head_budgets=table, keep_shares=shares)
        self._busy += 1
        self._steps.submit(seq_request, sink)
        finished = False
        last = Progress(0, n)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield last  # keepalive: the job worker heartbeats on progress events
                    continue
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Progress):
                    last = item
                elif isinstance(item, (Final, Error)):
                    finished = True
                    last = Progress(n, n)
                yield item
        finally:
            if not finished:
                cancel.set()  # the consumer went away: stop the model at its next check
            self._busy -= 1


class StepLoop:
    """The model thread: adds submitted requests to the engine core between steps and steps it while any
    of its requests is unfinished, handing each request's events to its sink (on this thread); sleeps
    when there is nothing to do. An error in a step ends every request in flight with that error.
    With `rebuild`, a tensor-parallel group that is down (after a failed step, or a rank found dead while
    idle) is replaced by `rebuild(reason)`'s; requests submitted meanwhile wait for the new group."""

    def __init__(self, llm: LLM, rebuild: Callable[[str], LLM] | None = None) -> None:
        self.llm = llm
        self._rebuild = rebuild
        self._retry_at = 0.0
        self._cond = threading.Condition()
        self._new: list[tuple[SequenceRequest, Sink]] = []
        self._sinks: dict[str, Sink] = {}
        self._thread = threading.Thread(target=self._loop, name="model", daemon=True)
        self._thread.start()

    def submit(self, request: SequenceRequest, sink: Sink) -> None:
        with self._cond:
            self._new.append((request, sink))
            self._cond.notify()

    def _loop(self) -> None:
        from entropyinfer.shard.engine_core import Finished

        while True:
            idle_down: str | None = None
            with self._cond:
                while not self._new and not self._sinks and idle_down is None:
                    woken = self._cond.wait(IDLE_CHECK_S if self._rebuild is not None else None)
                    if not woken and time.monotonic() >= self._retry_at:
                        idle_down = self._group_down()
                new, self._new = self._new, []
            if idle_down is not None and not new:
                self._restart(idle_down)
                continue
            for request, sink in new:
                try:
                    self.llm.submit(request)
                except BaseException as e:
                    sink(e)
                    continue
                self._sinks[request.request_id] = sink
            try:
                self.llm.step()
            except BaseException as e:
                log.exception("engine step failed")
                for rid, sink in self._sinks.items():
                    self.llm.core.abort(rid)
                    self.llm.take_events(rid)
                    sink(e)
                self._sinks.clear()
                down = self._group_down()
                if down is not None:
                    self._restart(down)
                continue
            for rid, sink in list(self._sinks.items()):
                for event in self.llm.take_events(rid):
                    sink(event)
                    if isinstance(event, Finished):
                        del self._sinks[rid]

    def _group_down(self) -> str | None:
        """Why this loop's tensor-parallel group cannot run any more (None: it can, or there is none)."""
        executor = self.llm.executor
        if self._rebuild is None or executor is None:
            return None
        if executor.broken is not None or executor.closed:
            return executor.broken or "the group was closed"
        return executor.live() if executor.live is not None else None

    def _restart(self, reason: str) -> None:
        assert self._rebuild is not None
        try:
            self.llm = self._rebuild(reason)
            self._retry_at = 0.0
        except Exception:
            log.exception("rebuilding the tensor-parallel group failed; the next request tries again")
            self._retry_at = time.monotonic() + REBUILD_RETRY_S


def _final(out: RequestOutput, prompt_tokens: int, logprobs: dict[str, list[Entry] | None]) -> Final:
    stats = {k: v for k, v in dict(out.stats).items() if isinstance(v, (int, float, str, bool)) or v is None}
    return Final(out.text, out.finish_reason, len(out.token_ids), prompt_tokens, stats, **logprobs)
