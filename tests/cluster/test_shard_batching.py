"""Concurrent requests to one shard actor join one engine-core batch (tiny random model, CPU)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from entropyinfer import LLM, SamplingParams
from entropyinfer.cluster.events import Final, Request, Token
from entropyinfer.cluster.shard_actor import ShardActor


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path) -> LLM:
    return LLM(str(tiny_checkpoint), load_format="dummy", device="cpu", warm_up_kernels=False)


def test_concurrent_requests_decode_together_and_match_one_at_a_time(llm: LLM) -> None:
    shard = ShardActor.with_llm(llm)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [f"chat {i}: " + "hi " * (i + 2) for i in range(6)]
    most = [0]
    original = llm.step

    def step() -> None:  # record how many sequences each step decodes together
        most[0] = max(most[0], len(llm.core.scheduler.running))
        original()

    llm.step = step  # type: ignore[method-assign]

    async def one(i: int) -> tuple[Final, str]:
        final, text = None, ""
        async for ev in shard.run(Request(f"r{i}", prompts[i], params, None, stream=i % 2 == 0)):
            if isinstance(ev, Token):
                text += ev.text
            if isinstance(ev, Final):
                final = ev
        assert final is not None
        return final, text

    async def all_of_them() -> list[tuple[Final, str]]:
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    try:
        results = asyncio.run(all_of_them())
    finally:
        del llm.step
    alone = [llm.generate(p, params)[0] for p in prompts]
    for i, ((final, text), ref) in enumerate(zip(results, alone, strict=True)):
        assert final.text == ref.text and final.completion_tokens == len(ref.token_ids)
        if i % 2 == 0:
            assert text == ref.text
    assert most[0] >= 2, "the requests should have shared steps"
    assert llm.core.pages.used_pages == 0
