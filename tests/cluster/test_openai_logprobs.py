"""OpenAI logprobs, echo and n over real HTTP, read with the official `openai` client (which parses the
shapes): the values equal log_softmax of the model's own logits (an in-process dense prefill of the same
tokens), the prompt's log-likelihood over HTTP equals the in-process one, and n forks share the prompt."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import pytest
import torch

from entropyinfer.cluster import shard_actor
from entropyinfer.cluster.launcher import EmbeddedServer
from entropyinfer.shard.attention import build_prefill_attention
from entropyinfer.shard.llm import LLM
from entropyinfer.shard.sampling import SamplingParams

from .conftest import API_KEY

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.serve, pytest.mark.slow]

PROMPT = "The capital of France is"
TOL = 2e-3  # fp32 on CPU, the server's batched decode against one dense prefill
# the shard actor turns the engine's logprobs into the events' entries (cluster/logprobs.py)
shard_logprobs = pytest.mark.skipif(
    "output_entries" not in inspect.getsource(shard_actor),
    reason="cluster/shard_actor.py does not yet put cluster/logprobs.py's entries on Token and Final",
)


@pytest.fixture(scope="module")
def client(server: EmbeddedServer) -> Iterator[object]:
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    yield c
    c.close()


def log_softmax(llm: LLM, ids: list[int]) -> torch.Tensor:
    """[N, vocab]: row i is the distribution of token i + 1 given ids[: i + 1]."""
    cache = llm.engine.new_cache(1, len(ids))
    logits = llm.engine.prefill(
        torch.tensor(ids), cache, 0, build_prefill_attention("dense", llm.sparse_config), all_logits=True
    )
    return torch.log_softmax(logits.float(), dim=-1)


@shard_logprobs
def test_completion_logprobs_equal_log_softmax(client: object, smollm2: LLM) -> None:
    r = client.completions.create(  # type: ignore[attr-defined]
        model="smollm2-135m", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2
    )
    choice = r.choices[0]
    lp = choice.logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == choice.text and lp.text_offset[0] == 0
    ids = smollm2.encode(PROMPT)
    out = smollm2.generate(PROMPT, SamplingParams(max_tokens=4, logprobs=2))[0]
    ref = log_softmax(smollm2, ids + out.token_ids[:-1])[len(ids) - 1 :]
    for i, token in enumerate(out.token_ids):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i, token]), abs=TOL)
        top = lp.top_logprobs[i]
        assert len(top) == 2 and max(top.values()) == pytest.approx(float(ref[i].max()), abs=TOL)


@shard_logprobs
def test_chat_logprobs_streamed_equal_the_whole_answer(client: object) -> None:
    body = dict(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    whole = client.chat.completions.create(**body)  # type: ignore[attr-defined]
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - TOL for c in content)
    streamed = [
        c
        for chunk in client.chat.completions.create(stream=True, **body)  # type: ignore[attr-defined]
        for choice in chunk.choices
        if choice.logprobs is not None
        for c in choice.logprobs.content
    ]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=TOL)


@shard_logprobs
def test_echo_scores_the_prompt(client: object, smollm2: LLM) -> None:
    text = "Paris is the capital and largest city of France."
    r = client.completions.create(  # type: ignore[attr-defined]
        model="smollm2-135m", prompt=text, max_tokens=0, echo=True, logprobs=1
    )
    choice = r.choices[0]
    assert choice.text == text and r.usage.completion_tokens == 0
    lp = choice.logprobs.token_logprobs
    ids = smollm2.encode(text)
    assert len(lp) == len(ids) and lp[0] is None
    ref = log_softmax(smollm2, ids)[:-1].gather(1, torch.tensor(ids[1:])[:, None])
    assert sum(lp[1:]) == pytest.approx(float(ref.sum()), abs=TOL * len(ids))
    offline = smollm2.generate(text, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert offline.prompt_logprobs is not None
    want = sum(row[t] for row, t in zip(offline.prompt_logprobs[1:], ids[1:], strict=True) if row)
    assert sum(lp[1:]) == pytest.approx(want, abs=TOL * len(ids))


def test_n_choices_fork_the_prompt_and_follow_the_seed(client: object) -> None:
    prompt = "Write one word about the sea. " * 8  # several KV pages
    body = dict(model="smollm2-135m", prompt=prompt, max_tokens=6, temperature=1.0, seed=11, n=3)
    first = client.completions.create(**body)  # type: ignore[attr-defined]
    assert [c.index for c in first.choices] == [0, 1, 2]
    again = client.completions.create(**body)  # type: ignore[attr-defined]
    assert [c.text for c in again.choices] == [c.text for c in first.choices]
    assert len({c.text for c in first.choices}) > 1  # each its own seed stream
    per_choice = first.usage.prompt_tokens // 3
    # the forks take the first one's prompt pages from the prefix cache (all but its last page)
    assert first.usage.prompt_tokens_details.cached_tokens >= 2 * (per_choice - 16)
