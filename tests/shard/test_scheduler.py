"""The scheduler's chunk sizes (tiny random model, CPU, fp32): beside decoding streams, a prompt's dense
attention over a long prefix is cut by its query-key pairs (`max_dense_prefill_pairs`): a sparse prompt's
last segment and a dense prompt in pieces that end on pages, each within the limit (or one page), with the
same tokens and blocks as the prompt alone; a prefill alone in its step still runs whole."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_prefix_cache import DOC, MODE, req, run, tiny

from entropyinfer import SamplingParams
from entropyinfer.shard.scheduler import Chunk

PAIRS = 6000  # a dense query at position ~400 reads ~400 keys: pieces of about 15 queries


def pairs(start: int, end: int, dense_from: int) -> int:
    a = max(start, dense_from)
    return sum(p + 1 for p in range(a, end))


@pytest.mark.parametrize("policy", ["entropy", "dense", "fixed"])
def test_dense_attention_is_cut_by_its_keys_beside_streams(tiny_checkpoint: Path, policy: str) -> None:
    llm = tiny(tiny_checkpoint, max_num_batched_tokens=256, enable_prefix_caching=False, mode=MODE,
               max_dense_prefill_pairs=PAIRS, kv_page_size=8)  # fmt: skip
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    alone = run(llm.core, [req(llm, "x", DOC, policy, params)])["x"].output
    assert alone.stats["prefill_chunks"] == 1  # alone in its steps: whole, whatever its pairs

    core = llm.core
    chunks: list[Chunk] = []
    schedule = core.scheduler.schedule

    def recording():  # the real schedule, its document chunks noted
        step = schedule()
        chunks.extend(c for c in step.prefill if c.seq.request_id == "doc")
        return step

    core.scheduler.schedule = recording  # type: ignore[method-assign]
    chats = [req(llm, f"chat{i}", f"hello {i}", "dense", SamplingParams(max_tokens=60, ignore_eos=True))
             for i in range(2)]  # fmt: skip
    for r in chats:
        core.add_request(r)
    core.step()  # the chats decode while the document prefills
    doc = run(core, [req(llm, "doc", DOC, policy, params)])["doc"].output

    n, ps = len(doc.prompt_token_ids), 8
    dense_from = chunks[0].seq.dense_from
    assert dense_from == (0 if policy == "dense" else (n - 1) // 64 * 64)
    assert [c.start for c in chunks] == [0] + [c.end for c in chunks[:-1]] and chunks[-1].end == n
    tail = [c for c in chunks if c.end > dense_from]
    assert len(tail) > 2  # the dense part ran in pieces
    for c in tail:
        assert c.end == n or c.end % ps == 0
        assert pairs(c.start, c.end, dense_from) <= PAIRS or c.end - max(c.start, dense_from) <= ps
    for c in chunks:
        if c.end <= dense_from:  # sparse segments: whole ones
            assert c.end % 64 == 0
        elif c.start < dense_from:  # sparse segments and dense ones: only with the whole dense part
            assert c.end == n and pairs(c.start, c.end, dense_from) <= PAIRS
    assert doc.token_ids == alone.token_ids
    assert doc.stats["density"] == pytest.approx(alone.stats["density"])
    if policy != "dense":
        assert doc.stats["density"] < 1.0


def test_no_limit_runs_the_token_budget(tiny_checkpoint: Path) -> None:
    llm = tiny(tiny_checkpoint, max_num_batched_tokens=256, enable_prefix_caching=False, mode=MODE,
               max_dense_prefill_pairs=None, kv_page_size=8)  # fmt: skip
    core = llm.core
    sizes: list[int] = []
    schedule = core.scheduler.schedule

    def recording():
        step = schedule()
        sizes.extend(c.end - c.start for c in step.prefill if c.seq.request_id == "doc")
        return step

    core.scheduler.schedule = recording  # type: ignore[method-assign]
    core.add_request(req(llm, "chat", "hello", "dense", SamplingParams(max_tokens=60, ignore_eos=True)))
    core.step()
    run(core, [req(llm, "doc", DOC, "dense", SamplingParams(max_tokens=2, ignore_eos=True))])
    assert sizes[0] == 248  # the budget less the decoding chat, cut to pages


def test_questions_of_a_cached_document_are_short_and_start_together(tiny_checkpoint: Path) -> None:
    """A prompt is long by what it has left to prefill: with every question of a document over the
    threshold, the first prefills the document and the cached others start in one step, not one per step
    (`max_long_partial_prefills=1`)."""
    from entropyinfer.shard.engine_core import Finished, TokenDelta

    llm = tiny(tiny_checkpoint, long_prefill_token_threshold=200, max_long_partial_prefills=1, mode=MODE)
    core = llm.core
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for i in range(4):
        core.add_request(req(llm, f"q{i}", DOC + f" Q{i}: what is key {i}?", "dense", params))
    first_step: dict[str, int] = {}
    cached: dict[str, int] = {}
    step = 0
    while core.has_unfinished():
        for e in core.step():
            if isinstance(e, TokenDelta):
                first_step.setdefault(e.request_id, step)
            elif isinstance(e, Finished):
                cached[e.request_id] = e.output.stats["cached_tokens"]
        step += 1
    assert len(llm.encode(DOC)) > 200 and cached["q0"] == 0
    assert all(cached[f"q{i}"] >= len(llm.encode(DOC)) - 16 for i in range(1, 4))
    assert len({first_step[f"q{i}"] for i in range(1, 4)}) == 1  # the three cached questions together
    assert first_step["q1"] > first_step["q0"]
