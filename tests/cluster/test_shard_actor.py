"""The shard actor's request bookkeeping (cancel before, during and after a request) with a stand-in LLM:
no Ray, no model."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from entropyinfer.cluster import shard_actor
from entropyinfer.cluster.shard_actor import ShardActor
from entropyinfer.errors import PromptTooLongError, RequestCancelled


@dataclass
class _Out:
    text: str
    finish_reason: str
    token_ids: list[int]
    stats: dict[str, Any] = field(default_factory=dict)


class SlowLLM:
    """Decodes `steps` steps of `step_s` seconds, checking the cancel event between them."""

    max_context = 100

    def __init__(self, steps: int = 200, step_s: float = 0.01) -> None:
        self.steps = steps
        self.step_s = step_s
        self.started = threading.Event()

    def count_tokens(self, prompt: Any) -> int:
        return 10

    def generate(
        self, prompt: Any, params: Any, policy: Any = None, progress: Any = None, cancel: Any = None
    ) -> list[_Out]:
        self.started.set()
        for _ in range(self.steps):
            if cancel is not None and cancel.is_set():
                raise RequestCancelled("request cancelled during decode")
            time.sleep(self.step_s)
        return [_Out("done", "length", [1] * self.steps)]


async def _events(shard: ShardActor, request_id: str, max_tokens: int = 8) -> list[dict[str, Any]]:
    return [ev async for ev in shard.run(request_id, "hi", {"max_tokens": max_tokens}, None, False)]


def test_a_cancel_for_an_unknown_request_leaves_no_event_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    shard = ShardActor.with_llm(SlowLLM(steps=1))

    async def scenario() -> None:
        assert [e["type"] for e in await _events(shard, "done-1")][-1] == "final"
        assert await shard.cancel("done-1") is False  # the engine's cancel after the request ended
        with pytest.raises(PromptTooLongError):
            await _events(shard, "rejected-1", max_tokens=500)
        assert await shard.cancel("rejected-1") is False
        stats = await shard.stats()
        assert stats["running"] == 0 and stats["busy"] == 0 and stats["early_cancels"] == 2
        monkeypatch.setattr(shard_actor, "EARLY_CANCEL_TTL_S", 0.0)
        await asyncio.sleep(0.01)
        assert await shard.cancel("another") is False  # pruned on the way: only this one is kept
        assert (await shard.stats())["early_cancels"] == 1

    asyncio.run(scenario())
    assert shard._cancels == {}


def test_early_cancels_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shard_actor, "EARLY_CANCEL_MAX", 5)
    shard = ShardActor.with_llm(SlowLLM(steps=1))

    async def scenario() -> None:
        for i in range(50):
            await shard.cancel(f"r{i}")

    asyncio.run(scenario())
    assert list(shard._early_cancels) == [f"r{i}" for i in range(45, 50)] and shard._cancels == {}


def test_a_cancel_that_arrives_before_its_request_is_honoured() -> None:
    llm = SlowLLM()
    shard = ShardActor.with_llm(llm)

    async def scenario() -> list[dict[str, Any]]:
        assert await shard.cancel("early-1") is False
        return await _events(shard, "early-1")

    events = asyncio.run(scenario())
    assert events[-1]["finish_reason"] == "cancelled" and not llm.started.is_set()
    assert shard._early_cancels == {} and shard._cancels == {} and shard._cancelled == 1


def test_a_cancel_during_the_request_stops_the_model() -> None:
    llm = SlowLLM(steps=1000)
    shard = ShardActor.with_llm(llm)

    async def scenario() -> tuple[list[dict[str, Any]], float]:
        task = asyncio.create_task(_events(shard, "running-1"))
        while not llm.started.is_set():
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        assert await shard.cancel("running-1") is True
        events = await asyncio.wait_for(task, 5.0)
        return events, time.monotonic() - t0

    events, elapsed = asyncio.run(scenario())
    assert events[-1]["finish_reason"] == "cancelled" and elapsed < 2.0  # not the 10 s of 1000 steps
    assert asyncio.run(shard.stats()) == {"busy": 0, "running": 0, "cancelled": 1, "early_cancels": 0}
