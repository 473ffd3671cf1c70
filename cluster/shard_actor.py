"""The shard actor: one per GPU (or CPU bundle) of an engine replica's placement group; holds the `LLM`.

Requests are validated at once (sampling values, policy, prompt length) and answered with an
`accepted` event, then run one at a time on a single model thread, so a bad request fails fast even while
the shard is busy. Events (plain dicts, see `EngineRunner` in jobs.py):

    {"type": "accepted", "prompt_tokens": int}
    {"type": "progress", "done": int, "total": int}   # prefill tokens; repeated as a keepalive in decode
    {"type": "token", "text": str, "token_id": int}    # streaming requests only
    {"type": "final", "text": str, "finish_reason": str, "completion_tokens": int, "stats": dict}

`cancel(request_id)` sets the request's cancel event; the engine checks it between prefill chunks and
decode steps, and the request ends with a final event whose finish_reason is "cancelled". A cancel for a
request this shard is not running is kept EARLY_CANCEL_TTL_S (actor tasks of an async actor may start out
of order, so it can come before its request) and then dropped: cancels of finished or rejected requests
leave nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from entropyinfer.errors import PromptTooLongError

log = logging.getLogger(__name__)

Prompt = str | list[dict[str, str]]
KEEPALIVE_S = 1.0
PROGRESS_EVERY_S = 0.2
EARLY_CANCEL_TTL_S = 60.0  # how long a cancel for a request not (yet) running here is remembered
EARLY_CANCEL_MAX = 10_000  # and how many at most


class ShardActor:
    """Wrapped with `ray.remote` by the engine deployment (this module does not import Ray)."""

    def __init__(self, engine: dict[str, Any], rank: int = 0, world_size: int = 1) -> None:
        import torch

        from entropyinfer import LLM

        self.rank = rank
        self.world_size = world_size
        device = engine.get("device")
        if device in (None, "cpu") and not torch.cuda.is_available():
            torch.set_num_threads(int(engine.get("cpu_threads") or os.cpu_count() or 1))
        t0 = time.perf_counter()
        llm = LLM(
            model=engine["model"],
            policy=engine["policy"],
            device=device,
            dtype=engine.get("dtype"),
            policy_config=engine.get("policy_config"),
            load_format=engine.get("load_format", "auto"),
            **dict(engine.get("overrides") or {}),
        )
        self._setup(llm, engine["model"], time.perf_counter() - t0)

    @classmethod
    def with_llm(cls, llm: Any, model_name: str = "test", rank: int = 0, world_size: int = 1) -> ShardActor:
        """A shard around an already built LLM (or a stand-in with count_tokens, max_context, generate,
        stream): for tests and for embedding without Ray."""
        shard = cls.__new__(cls)
        shard.rank, shard.world_size = rank, world_size
        shard._setup(llm, model_name, 0.0)
        return shard

    def _setup(self, llm: Any, model_name: str, load_s: float) -> None:
        self.llm = llm
        self.load_s = load_s
        self.model_name = model_name
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._cancels: dict[str, threading.Event] = {}  # requests running here
        self._early_cancels: OrderedDict[str, float] = OrderedDict()  # request id -> monotonic time
        self._busy = 0
        self._cancelled = 0  # requests the model stopped early because they were cancelled

    async def ready(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "max_context": int(self.llm.max_context),
            "device": str(getattr(self.llm, "device", "")),
            "load_s": self.load_s,
            "rank": self.rank,
        }

    async def health(self) -> int:
        """Answers while a request runs (the model has its own thread); returns requests in flight."""
        return self._busy

    async def stats(self) -> dict[str, int]:
        """Counters for health checks and tests: requests in flight and running, cancels."""
        return {
            "busy": self._busy,
            "running": len(self._cancels),
            "cancelled": self._cancelled,
            "early_cancels": len(self._early_cancels),
        }

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

    async def run(
        self, request_id: str, prompt: Prompt, sampling: dict[str, Any], policy: str | None, stream: bool
    ) -> AsyncIterator[dict[str, Any]]:
        cancel = self._cancels.setdefault(request_id, threading.Event())
        self._prune_early_cancels()
        if self._early_cancels.pop(request_id, None) is not None:
            cancel.set()  # its cancel came first
        try:
            async for event in self._run(cancel, prompt, sampling, policy, stream):
                yield event
        finally:
            self._cancels.pop(request_id, None)

    async def _run(
        self,
        cancel: threading.Event,
        prompt: Prompt,
        sampling: dict[str, Any],
        policy: str | None,
        stream: bool,
    ) -> AsyncIterator[dict[str, Any]]:
        from entropyinfer import SamplingParams
        from entropyinfer.errors import RequestCancelled
        from entropyinfer.shard.attention import check_policy

        params = SamplingParams(**sampling)  # InvalidRequestError names the field
        if policy is not None:
            check_policy(policy)
        n = await asyncio.to_thread(self.llm.count_tokens, prompt)
        if n + params.max_tokens > self.llm.max_context:
            raise PromptTooLongError(
                f"the prompt has {n} tokens; with max_tokens={params.max_tokens} that exceeds the model's "
                f"context of {self.llm.max_context} tokens: shorten it or lower max_tokens"
            )
        yield {"type": "accepted", "prompt_tokens": n}

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def put(kind: str, item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, item))

        last_progress = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if done >= total or now - last_progress[0] >= PROGRESS_EVERY_S:
                last_progress[0] = now
                put("event", {"type": "progress", "done": done, "total": total})

        def work() -> None:
            try:
                if cancel.is_set():
                    raise RequestCancelled("cancelled before it started")
                if stream:
                    for ev in self.llm.stream(prompt, params, policy=policy, cancel=cancel):
                        if ev.text:
                            put("event", {"type": "token", "text": ev.text, "token_id": ev.token_id})
                        if ev.output is not None:
                            put("event", _final(ev.output))
                else:
                    out = self.llm.generate(prompt, params, policy=policy, progress=progress, cancel=cancel)[
                        0
                    ]
                    put("event", _final(out))
            except RequestCancelled:
                self._cancelled += 1
                put("event", {"type": "final", "text": "", "finish_reason": "cancelled", "stats": {}})
            except BaseException as e:
                put("error", e)
            finally:
                put("done", None)

        self._busy += 1
        future = loop.run_in_executor(self._model_thread, work)
        finished = False
        last: dict[str, Any] = {"type": "progress", "done": 0, "total": n}
        try:
            while True:
                try:
                    kind, item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield last  # keepalive: the job worker heartbeats on progress events
                    continue
                if kind == "done":
                    break
                if kind == "error":
                    raise item
                if item["type"] == "progress":
                    last = item
                if item["type"] == "final":
                    finished = True
                    last = {"type": "progress", "done": n, "total": n}
                yield item
        finally:
            if not finished:
                cancel.set()  # the consumer went away: stop the model at its next check
            self._busy -= 1
            if not future.done():
                future.add_done_callback(lambda f: f.exception())


def _final(out: Any) -> dict[str, Any]:
    stats = {k: v for k, v in dict(out.stats).items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {
        "type": "final",
        "text": out.text,
        "finish_reason": out.finish_reason,
        "completion_tokens": len(out.token_ids),
        "stats": stats,
    }
