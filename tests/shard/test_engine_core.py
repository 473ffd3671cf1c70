"""The engine core on a tiny random model (CPU, fp32): continuous batching equals one at a time, each
request keeps its own policy, page exhaustion queues, preemption resumes with the same output, cancel and
finish free pages at once, and incremental detokenization equals decoding every id."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from entropyinfer import LLM, PromptTooLongError, RequestCancelled, SamplingParams
from entropyinfer.shard.engine_core import Finished, TokenDelta
from entropyinfer.shard.sequence import IncrementalDetokenizer, SequenceRequest

PROMPTS = [f"request {i}: " + "abc " * (3 * i + 1) for i in range(8)]
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)
# short-context sparse settings, so a 300-token prompt has sparse segments
SPARSE = dict(segment_size=64, block_size=8, threshold_len=64, base_budget=32, fixed_budget=32)


@pytest.fixture(scope="module")
def folder(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


def tiny(folder: Path, **kw: object) -> LLM:
    return LLM(str(folder), load_format="dummy", device="cpu", warm_up_kernels=False, **SPARSE, **kw)


@pytest.mark.parametrize("policy", ["dense", "entropy"])
def test_eight_concurrent_requests_equal_each_alone(folder: Path, policy: str) -> None:
    llm = tiny(folder, kv_capacity=32, kv_window=8, kv_gap=4)
    prompts = [*PROMPTS[:7], "x" * 300]
    batch = llm.generate(prompts, PARAMS, policy=policy)
    alone = [llm.generate(p, PARAMS, policy=policy)[0] for p in prompts]
    assert [o.token_ids for o in batch] == [o.token_ids for o in alone]
    assert [o.text for o in batch] == [o.text for o in alone]
    if policy == "entropy":
        assert batch[-1].stats["kv_compressions"] == 1 and batch[-1].stats["density"] < 1.0
    assert llm.core.pages.used_pages == 0 and not llm.core.has_unfinished()


def test_a_mixed_policy_batch_gives_each_request_its_own_policy(folder: Path) -> None:
    llm = tiny(folder, kv_capacity=32, kv_window=8, kv_gap=4)
    prompt, policies = "y" * 300, ["dense", "entropy", "fixed", "snapkv"]
    alone = {p: llm.generate(prompt, PARAMS, policy=p)[0] for p in policies}
    core, outs = llm.core, {}
    for p in policies:
        core.add_request(request(llm, p, prompt, policy=p))
    while core.has_unfinished():
        outs.update({e.request_id: e.output for e in core.step() if isinstance(e, Finished)})
    for p in policies:
        assert outs[p].token_ids == alone[p].token_ids, p
        assert outs[p].stats["policy"] == p
        assert outs[p].stats["kv_compression"] == alone[p].stats["kv_compression"]
    assert outs["dense"].stats["density"] == 1.0 > outs["fixed"].stats["density"]


def request(llm: LLM, rid: str, prompt: str, policy: str = "dense", **kw: object) -> SequenceRequest:
    params = kw.pop("params", PARAMS)
    assert isinstance(params, SamplingParams)
    ids = llm.encode(prompt)
    return SequenceRequest(rid, prompt, ids, params, policy, llm.config.sparse, llm.kv_config(policy), **kw)  # type: ignore[arg-type]


def test_page_exhaustion_queues_and_preemption_resumes_with_the_same_output(folder: Path) -> None:
    # 10 pages of 8 tokens: one request of ~40 prompt + 12 new tokens needs 7, so they wait or preempt
    llm = tiny(folder, num_kv_pages=10, kv_page_size=8)
    prompts = [f"page test {i} " + "q" * 25 for i in range(3)]
    alone = [llm.generate(p, PARAMS)[0] for p in prompts]
    core = llm.core
    for i, p in enumerate(prompts):
        core.add_request(request(llm, str(i), p))
    outs, most_running = {}, 0
    while core.has_unfinished():
        outs.update({e.request_id: e.output for e in core.step() if isinstance(e, Finished)})
        most_running = max(most_running, len(core.scheduler.running))
        assert core.pages.free_pages >= 0
    assert [outs[str(i)].token_ids for i in range(3)] == [o.token_ids for o in alone]
    assert most_running <= 2 and core.scheduler.num_preempted >= 1
    assert sum(o.stats["preemptions"] for o in outs.values()) == core.scheduler.num_preempted
    assert core.pages.free_pages == 10
    with pytest.raises(PromptTooLongError, match="KV pages"):
        core.add_request(request(llm, "huge", "z" * 200))


def test_a_compressed_sequence_is_swapped_out_and_back(folder: Path) -> None:
    llm = tiny(folder, num_kv_pages=12, kv_page_size=8, kv_capacity=16, kv_window=8, kv_gap=-1)
    prompts = [f"swap {i} " + "w" * 60 for i in range(3)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    alone = [llm.generate(p, params, policy="snapkv")[0] for p in prompts]
    core = llm.core
    for i, p in enumerate(prompts):
        core.add_request(request(llm, str(i), p, policy="snapkv", params=params))
    outs, swapped = {}, 0
    while core.has_unfinished():
        outs.update({e.request_id: e.output for e in core.step() if isinstance(e, Finished)})
        swapped = max(swapped, len(core.scheduler.swapped))
    assert [outs[str(i)].token_ids for i in range(3)] == [o.token_ids for o in alone]
    assert swapped >= 1 and core.pages.free_pages == 12


def test_cancel_and_finish_free_pages_at_once(folder: Path) -> None:
    llm = tiny(folder)
    core = llm.core
    cancel = threading.Event()
    core.add_request(request(llm, "a", PROMPTS[3], cancel=cancel))
    core.add_request(request(llm, "b", PROMPTS[4], params=SamplingParams(max_tokens=2, ignore_eos=True)))
    core.step()  # both prefilled
    held = core.pages.used_pages
    assert held > 0
    events = core.step()  # b's second token: b finishes and frees its pages in the same step
    assert any(isinstance(e, Finished) and e.request_id == "b" for e in events)
    assert 0 < core.pages.used_pages < held
    cancel.set()
    events = core.step()
    assert [e.output.finish_reason for e in events if isinstance(e, Finished)] == ["cancelled"]
    assert core.pages.used_pages == 0 and not core.has_unfinished()
    assert core.abort("a") is None
    stop = threading.Event()
    stop.set()
    with pytest.raises(RequestCancelled):
        llm.generate(PROMPTS[:2], PARAMS, cancel=stop)
    assert core.pages.used_pages == 0


def test_interleaved_streams_advance_one_core(folder: Path) -> None:
    llm = tiny(folder)
    a, b = llm.stream(PROMPTS[1], PARAMS), llm.stream(PROMPTS[2], PARAMS)
    got: dict[str, list[int]] = {"a": [], "b": []}
    for ev_a, ev_b in zip(a, b, strict=True):
        got["a"].append(ev_a.token_id)
        got["b"].append(ev_b.token_id)
    assert got["a"] == llm.generate(PROMPTS[1], PARAMS)[0].token_ids
    assert got["b"] == llm.generate(PROMPTS[2], PARAMS)[0].token_ids


def test_incremental_detokenization_equals_decoding_all_ids(folder: Path) -> None:
    llm = tiny(folder)
    tok = llm.tokenizer
    text = "naïve café — 日本語 😀 done."
    ids = [*tok.encode(text, add_special_tokens=False), 257, *tok.encode(" ok", add_special_tokens=False)]
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) + detok.flush() == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)  # multi-byte characters come out whole
    cut = ids[: len(tok.encode("naïve caf", add_special_tokens=False)) + 1]  # ends inside "é"
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push(i) for i in cut) + detok.flush() == tok.decode(cut, skip_special_tokens=True)


def test_stop_strings_are_held_back_and_cut(folder: Path) -> None:
    llm = tiny(folder)
    free = llm.generate(PROMPTS[0], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    stop = free.text[5:8]
    assert stop
    streamed = []
    out = None
    for ev in llm.stream(PROMPTS[0], SamplingParams(max_tokens=16, ignore_eos=True, stop=[stop])):
        streamed.append(ev.text)
        out = ev.output
    assert out is not None and out.finish_reason == "stop"
    assert out.text == free.text[: free.text.index(stop)] == "".join(streamed)


def test_token_events_come_before_finished(folder: Path) -> None:
    llm = tiny(folder)
    core = llm.core
    core.add_request(request(llm, "r", PROMPTS[0], params=SamplingParams(max_tokens=3, ignore_eos=True)))
    events = []
    while core.has_unfinished():
        events += core.step()
    assert [type(e) for e in events] == [TokenDelta] * 3 + [Finished]


def test_pages_freed_by_compression_serve_another_request(folder: Path) -> None:
    # 40 pages of 8 tokens; each 200-token prompt takes 26: both fit at once only after SnapKV compressed
    # the first one (right after its prefill) down to its 16-token capacity per head
    llm = tiny(folder, num_kv_pages=40, kv_page_size=8, kv_capacity=16, kv_window=8, kv_gap=-1)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    core = llm.core
    core.add_request(request(llm, "a", "a" * 200, policy="snapkv", params=params))
    core.add_request(request(llm, "b", "b" * 200, policy="snapkv", params=params))
    outs, together = {}, 0
    while core.has_unfinished():
        outs.update({e.request_id: e.output for e in core.step() if isinstance(e, Finished)})
        together = max(together, sum(not s.prefilling for s in core.scheduler.running))
    assert together == 2  # b was admitted while a decoded, into the pages a's compression freed
    assert outs["a"].stats["kv_pages_freed"] >= 20
    alone = llm.generate("b" * 200, params, policy="snapkv")[0]
    assert outs["b"].token_ids == alone.token_ids
    assert core.pages.used_pages == 0


def test_a_decode_step_copies_its_inputs_once_and_block_tables_only_at_page_boundaries(folder: Path) -> None:
    """The GPU path's host-to-device traffic, counted on the CPU: one copy of the packed inputs per decode
    step (`StepInputs`), a block-table write only when a sequence gains a page, and the padded step's table
    buffer reloaded only when the batch's tables changed; the tokens are those of a plain run."""
    from entropyinfer.shard.step_inputs import StepInputs

    llm = tiny(folder, kv_page_size=8)
    prompts, params = [PROMPTS[1], PROMPTS[5]], SamplingParams(max_tokens=24, ignore_eos=True)
    alone = [llm.generate(p, params)[0].token_ids for p in prompts]
    core = llm.core
    core.inputs = StepInputs(core.device, copies=True)  # a separate "device" buffer even on the CPU
    core.decoder.pad_on_cpu = True  # the graphs' padded buffers, run eagerly
    for i, p in enumerate(prompts):
        core.add_request(request(llm, str(i), p, params=params))
    seqs, outs, decode_steps = dict(core.seqs), {}, 0
    first: dict[str, tuple[int, int]] = {}  # (writes, pages) when first seen decoding
    while core.has_unfinished():
        uploads, steps = core.inputs.uploads, {r: s.decode_steps for r, s in seqs.items()}
        outs.update({e.request_id: e.output for e in core.step() if isinstance(e, Finished)})
        decoded = any(s.decode_steps > steps[r] for r, s in seqs.items())
        assert core.inputs.uploads - uploads == int(decoded)
        decode_steps += decoded
        for r, s in seqs.items():
            if s.table_cache is not None and s.decode_steps:
                writes, pages = first.setdefault(r, (s.table_cache.writes, len(s.block_table[0])))
                assert s.table_cache.writes - writes == len(s.block_table[0]) - pages  # a write per new page
    assert [outs[str(i)].token_ids for i in range(2)] == alone
    loads = sum(step.table_loads for step in core.decoder._steps.values())
    assert decode_steps >= 23 and 1 <= loads <= 10 < decode_steps  # 24 tokens of pages of 8: a few changes
