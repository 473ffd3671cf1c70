"""The shard actor around the real SmolLM2 (no Ray): its typed events, its rejections, and its cancel
bookkeeping (a cancel before, during and after a request)."""

from __future__ import annotations

import asyncio
import time

import pytest

from entropyinfer.cluster import shard_actor
from entropyinfer.cluster.events import Accepted, Error, Event, Final, Progress, Request, Token
from entropyinfer.cluster.shard_actor import ShardActor
from entropyinfer.shard.llm import LLM
from entropyinfer.shard.sampling import SamplingParams

PROMPT = "The capital of France is"
STORY = "Once upon a time, in a land far away,"  # greedy SmolLM2 writes all 64 tokens: a long generation


@pytest.fixture(scope="module")
def shard(smollm2: LLM) -> ShardActor:
    return ShardActor.with_llm(smollm2, "smollm2-135m")


def _request(request_id: str, prompt: str = PROMPT, max_tokens: int = 4, **kw: object) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens), **kw)  # type: ignore[arg-type]


async def _events(shard: ShardActor, request: Request) -> list[Event]:
    return [ev async for ev in shard.run(request)]


async def _idle(shard: ShardActor, cancelled: int = 0) -> dict[str, int]:
    """The shard's counters once nothing runs and the model saw `cancelled` cancels (its thread may take
    a moment to see one); as last seen after 10 s."""
    for _ in range(1000):
        stats = await shard.stats()
        if stats["busy"] == 0 and stats["running"] == 0 and stats["cancelled"] >= cancelled:
            break
        await asyncio.sleep(0.01)
    return dict(stats)


def test_a_request_is_accepted_then_progresses_then_ends_with_the_models_answer(
    shard: ShardActor, smollm2: LLM
) -> None:
    events = asyncio.run(_events(shard, _request("plain-1")))
    expected = smollm2.generate(PROMPT, SamplingParams(max_tokens=4))[0]
    n = smollm2.count_tokens(PROMPT)
    assert events[0] == Accepted(n)
    assert all(isinstance(e, Progress) and e.total == n for e in events[1:-1])
    final = events[-1]
    assert isinstance(final, Final) and final.text == expected.text and final.prompt_tokens == n
    assert final.finish_reason == expected.finish_reason and final.completion_tokens == len(
        expected.token_ids
    )
    assert final.stats["policy"] == "dense" and final.stats["prompt_tokens"] == n


def test_a_streaming_request_sends_its_tokens(shard: ShardActor, smollm2: LLM) -> None:
    events = asyncio.run(_events(shard, _request("stream-1", max_tokens=6, stream=True)))
    final = events[-1]
    tokens = [e for e in events if isinstance(e, Token)]
    expected = smollm2.generate(PROMPT, SamplingParams(max_tokens=6))[0]
    assert isinstance(final, Final) and final.text == expected.text and len(tokens) >= 1
    assert "".join(t.text for t in tokens) == final.text
    assert [t.token_id for t in tokens] == expected.token_ids[: len(tokens)]


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (_request("long-1", "word " * 9000), ("prompt_too_long", None)),
        (_request("policy-1", policy="magic"), ("unknown_policy", "policy")),
        (_request("empty-1", ""), ("invalid_request", "prompt")),
    ],
    ids=["prompt-too-long", "unknown-policy", "empty-prompt"],
)
def test_a_bad_request_is_answered_with_a_typed_error_and_leaves_nothing_running(
    shard: ShardActor, request_: Request, expected: tuple[str, str | None]
) -> None:
    async def scenario() -> tuple[list[Event], dict[str, int]]:
        return await _events(shard, request_), await _idle(shard)

    events, stats = asyncio.run(scenario())
    assert len(events) == 1 and isinstance(events[0], Error), events
    assert (events[0].type, events[0].field) == expected and events[0].message
    assert stats["busy"] == 0 and stats["running"] == 0


def test_a_cancel_for_an_unknown_request_leaves_no_event_behind(
    shard: ShardActor, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        before = (await shard.stats())["early_cancels"]
        assert isinstance((await _events(shard, _request("done-1", max_tokens=1)))[-1], Final)
        assert await shard.cancel("done-1") is False  # the engine's cancel after the request ended
        assert isinstance((await _events(shard, _request("rejected-1", "word " * 9000)))[-1], Error)
        assert await shard.cancel("rejected-1") is False
        stats = await shard.stats()
        assert stats["running"] == 0 and stats["busy"] == 0 and stats["early_cancels"] == before + 2
        monkeypatch.setattr(shard_actor, "EARLY_CANCEL_TTL_S", 0.0)
        await asyncio.sleep(0.01)
        assert await shard.cancel("another") is False  # pruned on the way: only this one is kept
        assert (await shard.stats())["early_cancels"] == 1

    asyncio.run(scenario())


def test_early_cancels_are_bounded(smollm2: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shard_actor, "EARLY_CANCEL_MAX", 5)
    shard = ShardActor.with_llm(smollm2)

    async def scenario() -> dict[str, object]:
        for i in range(50):
            await shard.cancel(f"r{i}")
        stats = dict(await shard.stats())
        stats.pop("engine_core")
        assert stats.pop("group")["rebuilds"] == 0  # one rank, never rebuilt
        return stats

    assert asyncio.run(scenario()) == {"busy": 0, "running": 0, "cancelled": 0, "early_cancels": 5}


def test_a_cancel_that_arrives_before_its_request_is_honoured(smollm2: LLM) -> None:
    shard = ShardActor.with_llm(smollm2)

    async def scenario() -> list[Event]:
        assert await shard.cancel("early-1") is False
        return await _events(shard, _request("early-1", STORY, max_tokens=64))

    events = asyncio.run(scenario())
    n = smollm2.count_tokens(STORY)
    assert events[0] == Accepted(n) and events[-1] == Final("", "cancelled", 0, n)
    stats = asyncio.run(shard.stats())
    assert {k: stats[k] for k in ("busy", "running", "cancelled", "early_cancels")} == {  # type: ignore[literal-required]
        "busy": 0, "running": 0, "cancelled": 1, "early_cancels": 0
    }  # fmt: skip
    assert stats["engine_core"]["running"] == 0 and stats["engine_core"]["kv_pages_used"] == 0


def test_a_cancel_during_the_request_stops_the_model(smollm2: LLM) -> None:
    shard = ShardActor.with_llm(smollm2)

    async def scenario() -> tuple[list[Event], float]:
        events: list[Event] = []
        t0 = 0.0
        async for ev in shard.run(_request("running-1", STORY, max_tokens=64, stream=True)):
            events.append(ev)
            if isinstance(ev, Token) and t0 == 0.0:
                t0 = time.monotonic()
                assert await shard.cancel("running-1") is True
        return events, time.monotonic() - t0

    events, elapsed = asyncio.run(scenario())
    final = events[-1]
    assert isinstance(final, Final) and final.cancelled and elapsed < 5.0
    assert sum(isinstance(e, Token) for e in events) < 64  # stopped, not run to its 64 tokens
    stats = asyncio.run(shard.stats())
    assert {k: stats[k] for k in ("busy", "running", "cancelled", "early_cancels")} == {  # type: ignore[literal-required]
        "busy": 0, "running": 0, "cancelled": 1, "early_cancels": 0
    }  # fmt: skip
    assert stats["engine_core"]["running"] == 0 and stats["engine_core"]["kv_pages_used"] == 0


def test_leaving_the_stream_early_stops_the_model(smollm2: LLM) -> None:
    """What the engine replica does when its consumer goes away: close the shard's stream."""
    shard = ShardActor.with_llm(smollm2)

    async def scenario() -> dict[str, int]:
        stream = shard.run(_request("left-1", STORY, max_tokens=64, stream=True))
        async for ev in stream:
            if isinstance(ev, Token):
                break
        await stream.aclose()
        return await _idle(shard, cancelled=1)

    stats = dict(asyncio.run(scenario()))
    assert stats.pop("engine_core")["kv_pages_used"] == 0  # the cancelled request's pages are back
    assert stats.pop("group")["failed_ranks"] == []
    assert stats == {"busy": 0, "running": 0, "cancelled": 1, "early_cancels": 0}
