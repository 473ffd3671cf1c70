"""Chunked prefill and automatic prefix caching in the engine core (tiny random model, CPU, fp32).

Chunked equals one-shot; a prefix-cache hit equals a miss (dense and causal entropy, with and without
latent compression); questions about one document submitted together prefill it once (in-flight sharing);
shared pages are reference-counted, evicted least recently used, and never leak."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from entropyinfer import LLM, SamplingParams
from entropyinfer.shard.engine_core import EngineCore, Finished
from entropyinfer.shard.prefix_cache import page_names
from entropyinfer.shard.sequence import SequenceRequest

PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)
# short-context sparse settings: a 400-token prompt has sparse segments of 64 tokens (the tokenizer of the
# tiny checkpoint is byte-level: one character, one token)
SPARSE = dict(segment_size=64, block_size=8, threshold_len=64, base_budget=32, fixed_budget=32)
MODE = "causal"
DOC = "".join(f"line {i}: the value of key {i * 7 % 13} is {i * 31 % 97}. " for i in range(12))  # ~430 chars


def tiny(folder: Path, **kw: object) -> LLM:
    return LLM(str(folder), load_format="dummy", device="cpu", warm_up_kernels=False, **SPARSE, **kw)


def run(core: EngineCore, requests: list[SequenceRequest]) -> dict[str, Finished]:
    for r in requests:
        core.add_request(r)
    done: dict[str, Finished] = {}
    while core.has_unfinished():
        done.update({e.request_id: e for e in core.step() if isinstance(e, Finished)})
    return done


def req(
    llm: LLM, rid: str, text: str, policy: str = "dense", params: SamplingParams = PARAMS
) -> SequenceRequest:
    return SequenceRequest(
        rid, text, llm.encode(text), params, policy, llm.config.sparse, llm.kv_config(policy)
    )


@pytest.fixture(scope="module")
def cached(tiny_checkpoint: Path) -> LLM:
    return tiny(tiny_checkpoint, kv_capacity=48, kv_window=8, kv_gap=4, mode=MODE)


@pytest.fixture(scope="module")
def uncached(tiny_checkpoint: Path) -> LLM:
    return tiny(
        tiny_checkpoint,
        kv_capacity=48,
        kv_window=8,
        kv_gap=4,
        mode=MODE,
        enable_prefix_caching=False,
    )


def test_page_names_chain_the_whole_prefix() -> None:
    a = page_names(list(range(40)), 16, ("dense",))
    b = page_names(list(range(40)), 16, ("dense",))
    c = page_names([99, *range(1, 40)], 16, ("dense",))
    d = page_names(list(range(40)), 16, ("sparse", "entropy"))
    assert len(a) == 2 and a == b
    assert c[0] != a[0] and c[1] != a[1]  # a changed first page renames every later page
    assert d[0] != a[0]  # another policy never shares


@pytest.mark.parametrize("policy", ["dense", "entropy", "fixed", "snapkv"])
def test_a_prefix_cache_hit_gives_the_same_tokens_as_a_miss(cached: LLM, uncached: LLM, policy: str) -> None:
    prompt = DOC + " Question: what is the value of key 3?"
    miss = run(uncached.core, [req(uncached, "m", prompt, policy)])["m"].output
    first = run(cached.core, [req(cached, "a", prompt, policy)])["a"].output
    again = run(cached.core, [req(cached, "b", prompt, policy)])["b"].output
    other = run(cached.core, [req(cached, "c", DOC + " Question: and key 5?", policy)])["c"].output
    other_miss = run(uncached.core, [req(uncached, "d", DOC + " Question: and key 5?", policy)])["d"].output
    assert miss.stats["cached_tokens"] == 0
    assert first.token_ids == miss.token_ids
    assert again.token_ids == miss.token_ids and other.token_ids == other_miss.token_ids
    assert again.stats["cached_tokens"] > 0 and other.stats["cached_tokens"] > 0
    if policy in ("entropy", "fixed"):  # a sparse reader resumes on a segment boundary
        assert again.stats["cached_tokens"] % 64 == 0
        assert again.stats["density"] == pytest.approx(miss.stats["density"])
    assert cached.core.pages.used_pages == 0


@pytest.mark.parametrize("policy", ["entropy", "fixed"])
def test_a_prompt_too_short_for_sparse_segments_shares_its_pages_with_longer_readers(
    cached: LLM, uncached: LLM, policy: str
) -> None:
    short, longer = DOC[:110], DOC[:110] + DOC[200:]  # 110 tokens run dense (threshold 64 + two segments)
    writer = run(cached.core, [req(cached, "w", short, policy)])["w"].output
    reader = run(cached.core, [req(cached, "r", longer, policy)])["r"].output
    miss = run(uncached.core, [req(uncached, "m", longer, policy)])["m"].output
    assert writer.stats["density"] == 1.0 and reader.stats["cached_tokens"] == 64
    assert reader.token_ids == miss.token_ids
    assert reader.stats["density"] == pytest.approx(miss.stats["density"]) and miss.stats["density"] < 1.0


def test_chunked_prefill_equals_one_shot_while_streams_decode(tiny_checkpoint: Path) -> None:
    llm = tiny(tiny_checkpoint, max_num_batched_tokens=96, enable_prefix_caching=False, mode=MODE)
    long_params = SamplingParams(max_tokens=6, ignore_eos=True)
    for policy in ("dense", "entropy"):
        alone = run(llm.core, [req(llm, "x", DOC, policy, long_params)])["x"].output
        assert alone.stats["prefill_chunks"] == 1  # alone in its steps: one chunk
        chats = [
            req(llm, f"chat{i}", f"hello {i}", "dense", SamplingParams(max_tokens=40, ignore_eos=True))
            for i in range(3)
        ]
        core = llm.core
        for r in chats:
            core.add_request(r)
        core.step()  # the chats are decoding when the document arrives
        done = run(core, [req(llm, "doc", DOC, policy, long_params)])
        doc = done["doc"].output
        assert doc.stats["prefill_chunks"] > 1  # the document shared each step with the chats
        assert doc.token_ids == alone.token_ids
        if policy == "entropy":
            assert doc.stats["density"] == pytest.approx(alone.stats["density"])
        assert all(done[f"chat{i}"].output.finish_reason == "length" for i in range(3))
    assert llm.core.pages.used_pages == 0


def test_questions_submitted_together_prefill_the_document_once(tiny_checkpoint: Path) -> None:
    llm = tiny(tiny_checkpoint)
    questions = [f" Q{i}: what is key {i}?" for i in range(4)]
    done = run(llm.core, [req(llm, str(i), DOC + q) for i, q in enumerate(questions)])
    outs = [done[str(i)].output for i in range(4)]
    prefilled = sum(o.stats["prompt_tokens"] - o.stats["cached_tokens"] for o in outs)
    doc_tokens = len(llm.encode(DOC))
    assert outs[0].stats["cached_tokens"] == 0
    assert all(o.stats["cached_tokens"] >= doc_tokens - 16 for o in outs[1:])
    assert prefilled < doc_tokens + 4 * 40  # the document once, plus each question's tail
    alone = [llm.generate(DOC + q, PARAMS, policy="dense")[0] for q in questions]
    assert [o.token_ids for o in outs] == [a.token_ids for a in alone]
    counts = llm.core.counts()
    assert counts["prefix_cache_hit_rate"] > 0.5 and counts["kv_pages_used"] == 0


def test_shared_pages_are_refcounted_evicted_lru_and_never_leak(tiny_checkpoint: Path) -> None:
    # 40 pages of 16 tokens: a ~430-token document takes 28, so a second document evicts the first
    llm = tiny(tiny_checkpoint, num_kv_pages=40)
    core, pages = llm.core, llm.core.pages
    cancel = threading.Event()
    a = req(llm, "a", DOC + " first")
    b = SequenceRequest(
        "b",
        DOC + " second",
        llm.encode(DOC + " second"),
        PARAMS,
        "dense",
        llm.config.sparse,
        None,
        cancel=cancel,
    )
    core.add_request(a)
    core.step()  # a prefilled: its pages are shared
    core.add_request(b)
    core.step()  # b reads a's pages
    seq_b = core.seqs["b"]
    shared = seq_b.cached_names[: seq_b.stats["cached_tokens"] // 16]  # then b shares its own pages
    assert shared and all(pages.cache.entries[n].ref == 2 for n in shared)
    cancel.set()
    run(core, [])
    assert all(pages.cache.entries[n].ref == 0 for n in shared)  # resident, nobody holds them
    assert pages.used_pages == 0 and pages.free_pages == 40
    other = "".join(reversed(DOC))
    out = run(core, [req(llm, "c", other)])["c"].output
    assert out.token_ids == llm.generate(other, PARAMS, policy="dense")[0].token_ids
    assert not all(n in pages.cache.entries for n in shared)  # the oldest pages were evicted for c
    assert pages.used_pages == 0 and pages.free_pages == 40


def test_prefix_caching_off_reports_no_cached_tokens(uncached: LLM) -> None:
    outs = uncached.generate([DOC + " a", DOC + " b"], PARAMS)
    assert [o.stats["cached_tokens"] for o in outs] == [0, 0]
    assert uncached.core.counts()["prefix_cache_pages"] == 0
