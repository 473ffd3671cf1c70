"""Overlapped decode (`shard/decode_overlap.py`) on a tiny random model (CPU, fp32): with `async_decode`
on, a step is launched before the previous one is read back, and every request's tokens, text, finish
reason and pages are those of the synchronous core: in a batch that changes every step, with stop tokens,
`max_tokens`, sampled and logprobs requests beside greedy ones, a cancel, and preemption.

On the CPU a device copy is synchronous, so only the bookkeeping is tested there; the same tests run on CUDA
(CUDA graphs), where the next step really is queued behind the one whose ids it reads. In fp32 there too: a
stopped sequence can stay one step longer in an overlapped batch, so the other rows run at another batch
size, and in bf16 that moved a near-tie greedy token of another row (an H200 run of the preemption test)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from entropyinfer import LLM, SamplingParams
from entropyinfer.shard.engine_core import EngineCore, Finished, TokenDelta
from entropyinfer.shard.sequence import RequestOutput, SequenceRequest, SequenceStatus

PROMPTS = [f"overlap {i}: " + "abc " * (2 * i + 1) for i in range(6)]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=CUDA)])
def llms(request: pytest.FixtureRequest, tiny_checkpoint: Path) -> dict[bool, LLM]:
    kw = dict(load_format="dummy", warm_up_kernels=False, num_kv_pages=24, kv_page_size=8)
    kw["device"], kw["dtype"] = request.param, "float32"
    return {on: LLM(str(tiny_checkpoint), async_decode=on, **kw) for on in (False, True)}  # type: ignore[arg-type]


def seq_request(llm: LLM, rid: str, prompt: str, params: SamplingParams, **kw: object) -> SequenceRequest:
    ids = llm.encode(prompt)
    return SequenceRequest(rid, prompt, ids, params, "dense", llm.config.sparse, None, **kw)  # type: ignore[arg-type]


Arrivals = dict[int, list[tuple[str, str, SamplingParams]]]


def run(
    llm: LLM, arrivals: Arrivals, cancel_at: dict[int, threading.Event] | None = None
) -> tuple[dict[str, RequestOutput], dict[str, list[int]], int]:
    """Requests added at given steps; their outputs, streamed token ids, and the most pages ever used."""
    core: EngineCore = llm.core
    outs: dict[str, RequestOutput] = {}
    streamed: dict[str, list[int]] = {}
    step, most = 0, 0
    while step in arrivals or core.has_unfinished() or any(k > step for k in arrivals):
        for rid, prompt, params in arrivals.get(step, []):
            core.add_request(seq_request(llm, rid, prompt, params))
        if cancel_at and step in cancel_at:
            cancel_at[step].set()
        for e in core.step():
            if isinstance(e, TokenDelta):
                streamed.setdefault(e.request_id, []).append(e.token_id)
            elif isinstance(e, Finished):
                outs[e.request_id] = e.output
        most = max(most, core.pages.used_pages)
        step += 1
    assert core.pages.used_pages == 0
    return outs, streamed, most


def greedy(n: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)  # type: ignore[arg-type]


def test_a_changing_batch_gives_the_synchronous_tokens(llms: dict[bool, LLM]) -> None:
    arrivals: Arrivals = {
        0: [("a", PROMPTS[0], greedy(20)), ("b", PROMPTS[1], greedy(7))],
        3: [("c", PROMPTS[2], greedy(12))],
        5: [("d", PROMPTS[3], SamplingParams(max_tokens=9, temperature=0.8, seed=3, ignore_eos=True))],
        6: [("e", PROMPTS[4], greedy(10, logprobs=2))],
        9: [("f", PROMPTS[5], greedy(1)), ("g", PROMPTS[5], greedy(2))],
    }
    before = llms[True].core.overlapped_steps
    sync, sync_stream, _ = run(llms[False], arrivals)
    over, over_stream, _ = run(llms[True], arrivals)
    assert llms[True].core.overlapped_steps - before >= 4  # it did overlap (not while d or e run)
    assert llms[False].core.overlapped_steps == 0
    for rid, out in sync.items():
        got = over[rid]
        want = (out.token_ids, out.text, out.finish_reason)
        assert (got.token_ids, got.text, got.finish_reason) == want, rid
        assert over_stream[rid] == got.token_ids == sync_stream[rid]
    assert over["e"].logprobs == sync["e"].logprobs


def test_a_stop_token_ends_the_sequence_at_the_same_token(llms: dict[bool, LLM]) -> None:
    ref = llms[False].generate(PROMPTS[2], greedy(16))[0].token_ids
    stop = ref[6]  # a token it generates mid-way: the next step is in flight when it is read back
    params = SamplingParams(max_tokens=16, stop_token_ids=[stop], ignore_eos=True)
    arrivals: Arrivals = {0: [("s", PROMPTS[2], params), ("long", PROMPTS[0], greedy(18))]}
    sync, _, _ = run(llms[False], arrivals)
    over, _, _ = run(llms[True], arrivals)
    assert over["s"].finish_reason == "stop" and over["s"].token_ids == ref[: ref.index(stop) + 1]
    assert {k: o.token_ids for k, o in over.items()} == {k: o.token_ids for k, o in sync.items()}
    # the token computed after the stop (the next step was in flight) is not counted in the KV it kept
    for key in ("kv_tokens_kept", "kv_bytes"):
        assert over["s"].stats[key] == sync["s"].stats[key], key


def test_a_cancel_mid_stream_frees_the_pages_and_spares_the_others(llms: dict[bool, LLM]) -> None:
    outs = {}
    for on in (False, True):
        cancel = threading.Event()
        arrivals: Arrivals = {0: [("x", PROMPTS[1], greedy(12)), ("y", PROMPTS[3], greedy(12))]}
        core = llms[on].core
        core.add_request(seq_request(llms[on], "z", PROMPTS[4], greedy(30), cancel=cancel))
        outs[on], _, _ = run(llms[on], arrivals, {5: cancel})
    for on in (False, True):
        assert outs[on]["z"].finish_reason == "cancelled"
    assert outs[True]["x"].token_ids == outs[False]["x"].token_ids
    assert outs[True]["y"].token_ids == outs[False]["y"].token_ids
    assert len(outs[True]["z"].token_ids) >= len(outs[False]["z"].token_ids) - 1


def test_preemption_under_overlap_resumes_with_the_same_output(llms: dict[bool, LLM]) -> None:
    # 24 pages of 8 tokens: three requests of ~30 prompt + 40 new tokens cannot all stay resident
    arrivals: Arrivals = {0: [(str(i), f"preempt {i} " + "q" * 20, greedy(40)) for i in range(3)]}
    sync, _, _ = run(llms[False], arrivals)
    before = llms[True].core.scheduler.num_preempted
    over, _, _ = run(llms[True], arrivals)
    assert llms[True].core.scheduler.num_preempted > before
    assert {k: o.token_ids for k, o in over.items()} == {k: o.token_ids for k, o in sync.items()}


def test_a_sequence_preempted_then_stopped_by_its_token_in_flight_is_not_prefilled(
    llms: dict[bool, LLM],
) -> None:
    """A sequence in flight is preempted (recompute) and admitted again in the same step; the token that
    lands then is a stop token, so the prefill chunk scheduled for it must not run (its pages are gone)."""
    core = llms[True].core
    for variant in range(24):
        prompts = [
            (str(i), f"victim {variant} {i} " + "qrst"[(variant + i) % 4] * (18 + variant % 5))
            for i in range(3)
        ]
        for rid, prompt in prompts:
            core.add_request(seq_request(llms[True], rid, prompt, greedy(40)))
        victim = None
        while core.has_unfinished():
            flight = {s.request_id for s in core._flight.seqs} if core._flight is not None else set()
            before = {rid: s.preemptions for rid, s in core.seqs.items()}
            core.step()
            for rid, seq in core.seqs.items():  # preempted while in flight, admitted again in the same step
                again = (
                    seq.preemptions > before.get(rid, 0)
                    and rid in flight
                    and seq.status is SequenceStatus.RUNNING
                )
                tok = seq.output_ids[-1] if seq.output_ids else None  # the in-flight token: it landed
                if victim is None and again and tok not in seq.output_ids[:-1]:
                    victim = (rid, tok, len(seq.output_ids))
        if victim is not None:
            break
    assert victim is not None, "no variant gave a preemption of a sequence in flight"
    rid, tok, n = victim
    arrivals: Arrivals = {0: []}
    for i, prompt in prompts:
        stops = [tok] if i == rid else []
        arrivals[0].append((i, prompt, SamplingParams(max_tokens=40, ignore_eos=True, stop_token_ids=stops)))
    sync, _, _ = run(llms[False], arrivals)
    preempted = core.scheduler.num_preempted
    over, _, _ = run(llms[True], arrivals)
    assert core.scheduler.num_preempted > preempted  # the scenario happened again
    assert over[rid].finish_reason == "stop" and len(over[rid].token_ids) == n
    assert {k: o.token_ids for k, o in over.items()} == {k: o.token_ids for k, o in sync.items()}
