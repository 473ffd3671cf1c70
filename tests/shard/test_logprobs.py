"""Logprobs in the engine core on a tiny random model (CPU, fp32): the sampled token's and the top-k
alternatives' logprobs per generated token, and every prompt token's given its prefix, equal log_softmax of
the model's own logits over the whole sequence (a dense one-shot reference prefill)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from entropyinfer import LLM, SamplingParams
from entropyinfer.errors import InvalidRequestError
from entropyinfer.shard.attention import build_prefill_attention
from entropyinfer.shard.sampling import MAX_LOGPROBS, top_logprobs

PROMPT = "the quick brown fox " * 6
TOL = 1e-4


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path) -> LLM:
    return LLM(str(tiny_checkpoint), load_format="dummy", device="cpu", warm_up_kernels=False)


def reference(llm: LLM, ids: list[int]) -> torch.Tensor:
    """log_softmax of the logits at every position of `ids` [N, vocab] (one dense prefill)."""
    cache = llm.engine.new_cache(1, len(ids))
    attention = build_prefill_attention("dense", llm.sparse_config)
    logits = llm.engine.prefill(torch.tensor(ids), cache, 0, attention, all_logits=True)
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generated_token_logprobs_equal_log_softmax(llm: LLM, temperature: float) -> None:
    params = SamplingParams(max_tokens=6, temperature=temperature, seed=3, ignore_eos=True, logprobs=3)
    out = llm.generate(PROMPT, params)[0]
    ids = llm.encode(PROMPT)
    ref = reference(llm, ids + out.token_ids[:-1])[len(ids) - 1 :]
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 6
    for i, (token, row) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        assert abs(row[token] - float(ref[i, token])) < TOL
        top = top_logprobs(row, 3)
        want = torch.topk(ref[i], 3)
        assert [t for t, _ in top] == want.indices.tolist()
        assert [lp for _, lp in top] == pytest.approx(want.values.tolist(), abs=TOL)
        assert len(row) in (3, 4) and (len(row) == 3) == (token in want.indices.tolist())
    if temperature == 0.0:  # greedy picks the most likely token
        assert all(max(r, key=r.__getitem__) == t for t, r in zip(out.token_ids, out.logprobs, strict=True))
    streamed = [e.logprobs for e in llm.stream(PROMPT, params)]  # (its prompt now from the prefix cache)
    assert [sorted(r or {}) for r in streamed] == [sorted(r) for r in out.logprobs]
    for got, want_row in zip(streamed, out.logprobs, strict=True):
        assert got is not None and all(abs(got[t] - lp) < TOL for t, lp in want_row.items())


def test_prompt_logprobs_cover_every_prompt_token_even_when_cached(llm: LLM) -> None:
    ids = llm.encode(PROMPT)
    ref = reference(llm, ids)
    llm.generate(PROMPT, SamplingParams(max_tokens=1))  # its pages are now in the prefix cache
    params = SamplingParams(max_tokens=1, prompt_logprobs=2)
    out = llm.generate(PROMPT, params)[0]
    assert out.logprobs is None and out.prompt_logprobs is not None
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    assert out.stats.get("cached_tokens", 0) == 0  # every prompt token computed
    for i, row in enumerate(out.prompt_logprobs[1:]):
        assert row is not None
        assert abs(row[ids[i + 1]] - float(ref[i, ids[i + 1]])) < TOL
        assert [t for t, _ in top_logprobs(row, 2)] == torch.topk(ref[i], 2).indices.tolist()
    total = sum(r[t] for r, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True) if r is not None)
    assert total == pytest.approx(float(ref[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum()), abs=1e-3)
    assert llm.core.pages.used_pages == 0


def test_n_sequences_fork_the_prompt_each_with_its_own_seed(llm: LLM) -> None:
    prompt = "a fork of the same prompt " * 12  # several KV pages
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=5, ignore_eos=True, n=3)
    outs = llm.generate([prompt, PROMPT], params)
    assert len(outs) == 6 and [o.prompt for o in outs] == [prompt] * 3 + [PROMPT] * 3
    alone = [llm.generate(prompt, SamplingParams(max_tokens=5, temperature=1.0, seed=s, ignore_eos=True))[0]
             for s in (5, 6, 7)]  # fmt: skip
    assert [o.token_ids for o in outs[:3]] == [o.token_ids for o in alone]
    page = llm.core.pages.page_size
    n = len(llm.encode(prompt))
    assert outs[0].stats.get("cached_tokens", 0) == 0  # the first prefills it ...
    assert all(o.stats["cached_tokens"] >= (n - 1) // page * page - page for o in outs[1:3])  # ... once
    with pytest.raises(InvalidRequestError):
        next(iter(llm.stream(prompt, params)))


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs", "n"])
def test_limits_are_checked(field: str) -> None:
    bad = {"logprobs": MAX_LOGPROBS + 1, "prompt_logprobs": -1, "n": 0}[field]
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams.from_dict({field: bad})
    assert e.value.field == field
    assert SamplingParams(logprobs=0, prompt_logprobs=MAX_LOGPROBS, n=2).to_dict()["n"] == 2
