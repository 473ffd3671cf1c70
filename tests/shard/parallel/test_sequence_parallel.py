"""`LLM(..., sequence_parallel_size=k)` on CPU with gloo: the engine core on a tensor x sequence parallel
group in lockstep gives one rank's tokens.

A tiny random Llama with 8 query / 4 KV heads and 4096 positions (byte tokenizer: a character is a token).
Prompts of at least `sequence_parallel_min_tokens` prefill split over the SP ranks (their stats say
``sequence_parallel_size``), shorter ones run whole on every rank, and both decode in the same batches:
SP=2 equals one rank for dense and entropy (tokens; density within 0.01), TP=2 x SP=2 too; latent KV
compression over the segments keeps what one rank keeps (entropy head capacities, re-compression, SnapKV);
the learned split (exact until a table, then by its shares); an SP prompt is not prefix-cached; adaptive
capacities run without SP; a killed SP rank fails the request;
sizes that do not split the KV heads fail before any process starts. Slow: SmolLM2 (9 / 3 heads, uneven at
SP=2, with latent compression too); preempted SP sequences swapped (compressed) or recomputed; Ray ranks.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from entropyinfer import LLM, SamplingParams
from entropyinfer.errors import ConfigError, PromptTooLongError, ShardGroupError
from entropyinfer.policies.segment_shares import KeepStats, SegmentShares, ShareLearner
from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint
from entropyinfer.shard.head_report import StatsSinks

PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)
PARAMS_12 = SamplingParams(max_tokens=12, ignore_eos=True)
SPARSE = dict(segment_size=64, block_size=8, threshold_len=64, base_budget=32, fixed_budget=32)
WIDE = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=320, hidden_size=64,
    intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
    max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
)  # fmt: skip
MIN_TOKENS = 512
KV = dict(kv_compression="latent", kv_capacity=64, kv_window=8, kv_gap=4)
KV_STATS = ("kv_tokens_kept", "kv_tokens_kept_total", "kv_bytes", "kv_compressions", "kv_head_capacities")


def text(n: int, seed: int) -> str:
    return "".join(chr(97 + (seed * 7 + i * (seed + 3) + i // 11) % 26) for i in range(n))


PROMPTS = [text(2000, 1), text(40, 2), text(1333, 3), text(300, 4)]  # SP, whole, SP (padded), whole
SP_PROMPTS = [len(p) >= MIN_TOKENS for p in PROMPTS]


def tiny(folder: Path, tp: int = 1, sp: int = 1, policy: str = "dense", **kw: object) -> LLM:
    return LLM(
        str(folder), policy=policy, load_format="dummy", device="cpu", warm_up_kernels=False, kv_page_size=8,
        tensor_parallel_size=tp, sequence_parallel_size=sp,
        **{"kv_compression": "none", "sequence_parallel_min_tokens": MIN_TOKENS, **SPARSE, **kw},
    )  # fmt: skip


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dummy_checkpoint(tmp_path_factory.mktemp("wide"), WIDE)


class Group:
    """One parallel LLM alive at a time (torch.distributed's default group is per process)."""

    def __init__(self) -> None:
        self.llm: LLM | None = None

    def start(self, *args: object, **kw: object) -> LLM:
        self.close()
        self.llm = tiny(*args, **kw)  # type: ignore[arg-type]
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


@pytest.fixture(scope="module")
def group() -> Iterator[Group]:
    g = Group()
    yield g
    g.close()


def assert_same(got: list, ref: list, sp_rows: list[bool], sp: int) -> None:
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    for g, r, split in zip(got, ref, sp_rows, strict=True):
        assert g.stats["density"] == pytest.approx(r.stats["density"], abs=0.01)
        assert g.stats.get("sequence_parallel_size") == (sp if split else None)


@pytest.mark.parametrize("policy", ["dense", "entropy"])
def test_sp2_generate_equals_one_rank(wide: Path, group: Group, policy: str) -> None:
    ref = tiny(wide, policy=policy).generate(PROMPTS, PARAMS)
    llm = group.start(wide, 1, 2, policy)
    got = llm.generate(PROMPTS, PARAMS)
    assert_same(got, ref, SP_PROMPTS, 2)
    if policy == "entropy":
        assert any(o.stats["density"] < 0.9 for o in got), "the long prompts should run sparse"
        for o, split in zip(got, SP_PROMPTS, strict=True):  # each SP rank's work (2 + 2 KV heads)
            per = o.stats.get("density_per_sp_rank")
            assert (per is not None) == split and (not split or len(per) == 2)
            assert not split or sum(per) / 2 == pytest.approx(o.stats["density"], abs=1e-3)
    counts = llm.core.counts()
    assert counts["kv_pages_used"] == 0 and counts["running"] == 0
    held = llm.executor.probe() if llm.executor is not None else []  # prefix-cache states may stay
    assert len(held) == 2 and all(h[0] == h[2] == h[3] == 0 for h in held)  # every rank let go


def test_overlapped_decode_stays_off_with_several_ranks(wide: Path, group: Group) -> None:
    """`async_decode=True` on a group: sending each step's plan to the other ranks reads its inputs back, so
    nothing could overlap; the core decodes synchronously and gives one rank's tokens."""
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    one = tiny(wide, async_decode=True)
    assert one.core.overlap
    ref = one.generate(PROMPTS[1:2], params)
    llm = group.start(wide, 2, 1, async_decode=True)
    assert not llm.core.overlap
    assert [o.token_ids for o in llm.generate(PROMPTS[1:2], params)] == [o.token_ids for o in ref]
    assert llm.core.overlapped_steps == 0 and one.core.overlapped_steps > 0


def test_sp_ranks_keep_only_their_segments_pages(wide: Path, group: Group) -> None:
    """An SP prompt's block table holds one rank's span (about n / 2 at SP=2: each rank its segment, the
    last also the decode tokens), a short one the whole prompt; one rank's tokens. So a pool too small for
    the long prompt on one rank (140 pages of 8 tokens for 2000 tokens) serves it at SP=2."""
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    with pytest.raises(PromptTooLongError, match="KV pages"):
        tiny(wide, num_kv_pages=140).generate([PROMPTS[0]], params)
    one = tiny(wide)
    llm = group.start(wide, 1, 2, num_kv_pages=140)
    for prompt in (PROMPTS[0], PROMPTS[3]):
        n = llm.count_tokens(prompt)
        stream = llm.stream(prompt, params)
        next(stream)  # prefilled, decoding
        held = llm.core.counts()["kv_pages_used"]  # pages of 8 tokens
        if n >= MIN_TOKENS:  # the larger of a segment and the last one plus two decode tokens
            assert held <= -(-(n // 2 + 3) // 8) < -(-n // 8), (n, held)
        else:
            assert -(-(n + 1) // 8) <= held <= -(-(n + 2) // 8), (n, held)
        out = [e for e in stream][-1].output
        assert out.token_ids == one.generate([prompt], params)[0].token_ids
    assert llm.core.counts()["kv_pages_used"] == 0


def test_tp2_sp2_equals_one_rank(wide: Path, group: Group) -> None:
    ref = tiny(wide, policy="entropy").generate(PROMPTS, PARAMS)
    llm = group.start(wide, 2, 2, "entropy")
    got = llm.generate(PROMPTS, PARAMS)
    assert_same(got, ref, SP_PROMPTS, 2)
    for o in got:  # the TP ranks' densities average to the request's
        per = o.stats["density_per_tp_rank"]
        assert len(per) == 2 and sum(per) / 2 == pytest.approx(o.stats["density"], abs=1e-3)
    one = tiny(wide, policy="entropy", **KV, kv_head_capacity="entropy")  # and with latent compression
    llm.set_kv_compression("latent", capacity=64, window=8, gap=4, head_capacity="entropy")
    got, ref = llm.generate(PROMPTS, PARAMS), one.generate(PROMPTS, PARAMS)
    assert_same(got, ref, SP_PROMPTS, 2)
    for g, r in zip(got, ref, strict=True):
        assert g.stats["kv_compressions"] >= 1
        assert all(g.stats.get(key) == r.stats.get(key) for key in KV_STATS)


@pytest.mark.parametrize(
    ("policy", "kv"),
    [
        ("entropy", {**KV, "kv_head_capacity": "entropy"}),
        ("entropy", {**KV, "kv_head_capacity": "uniform", "kv_recompress_every": 3}),
        ("snapkv", {"kv_compression": "snapkv", "kv_capacity": 64, "kv_window": 8}),
    ],
    ids=["entropy-capacities", "recompress", "snapkv"],
)
def test_sp_kv_compression_keeps_what_one_rank_keeps(wide: Path, group: Group, policy: str, kv: dict) -> None:
    """Each segment keeps its share of the global top (C - W): the same tokens and kept counts as one rank."""
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ref = tiny(wide, policy=policy, **kv).generate(PROMPTS, params)
    got = group.start(wide, 1, 2, policy, **kv).generate(PROMPTS, params)
    assert_same(got, ref, SP_PROMPTS, 2)
    for g, r in zip(got, ref, strict=True):
        assert g.stats["kv_compressions"] >= 1
        for key in KV_STATS:
            assert g.stats.get(key) == r.stats.get(key), key


def run_pinned(llm: LLM, rid: str, prompt: str, shares: SegmentShares | None) -> tuple[dict, Any]:
    """One request with `shares` pinned: its tokens and stats, and rank 0's spans right after compression."""
    llm.submit(dataclasses.replace(llm.request(rid, prompt, PARAMS_12), keep_shares=shares))
    spans = None
    while True:
        llm.step()
        seq = llm.core.seqs.get(rid)
        if spans is None and seq is not None and seq.compressions:
            spans = llm.core.executor.runner.spans[rid].counts.clone()  # type: ignore[attr-defined]
        for ev in llm.take_events(rid):
            if hasattr(ev, "output"):
                return {"ids": ev.output.token_ids, **ev.output.stats}, spans


def test_sp_learned_split_runs_exact_until_a_table_then_by_its_shares(wide: Path, group: Group) -> None:
    """``kv_sp_split="learned"``: with no table the exact split runs (one rank's tokens and kept counts) and
    its plan's kept positions reach the kept-stats sink; with a table pinned that puts every kept position
    at the prompt's start, segment 0 keeps the whole prefix budget and segment 1 only the window, the same
    tokens kept in all; a learned plan is not reported (the table never learns from itself)."""
    kv = {**KV, "kv_sp_split": "learned"}
    ref = tiny(wide, policy="entropy", **KV).generate(PROMPTS[:1], PARAMS_12)[0]
    llm = group.start(wide, 1, 2, "entropy", **kv)
    seen: list[KeepStats] = []
    llm.core.sinks = StatsSinks("tiny", kept=lambda rid, s: seen.append(s))
    cold, spans = run_pinned(llm, "cold", PROMPTS[0], None)
    assert cold["ids"] == ref.token_ids and cold["sequence_parallel_size"] == 2
    assert cold["kv_tokens_kept"] == ref.stats["kv_tokens_kept"]
    assert len(seen) == 1 and seen[0].fractions.shape == (2, 4, 16) and seen[0].model == "tiny"
    assert (seen[0].weights == 1).all() and np.allclose(seen[0].fractions.sum(-1), 1, atol=1e-5)
    assert (spans[1] > KV["kv_window"]).any()  # the exact split kept prompt positions in segment 1 too
    learner = ShareLearner("tiny", 2, 4, every_requests=1, every_s=0.0, warmup_requests=1)
    learner.observe(seen[0])
    assert learner.current.version == 1
    bins = np.zeros((2, 4, 16), dtype=np.float32)
    bins[..., 0] = 1.0  # everything kept from the first sixteenth
    skewed = SegmentShares("tiny", 2, bins)
    warm, spans = run_pinned(llm, "warm", PROMPTS[0], skewed)
    assert warm["kv_tokens_kept"] == ref.stats["kv_tokens_kept"] and len(warm["ids"]) == 12
    assert (spans[1] == KV["kv_window"]).all() and (spans[0] == KV["kv_capacity"] - KV["kv_window"]).all()
    assert len(seen) == 1
    llm.core.sinks = StatsSinks()


@pytest.mark.slow  # 400 decode steps of three sequences, twice
def test_preemption_of_sp_sequences_by_swap_and_recompute(wide: Path, group: Group) -> None:
    """Too few pages for three SP prompts at once: compressed ones are swapped out (each rank copies its own
    span to host memory and back), uncompressed ones recomputed; one rank's tokens either way."""
    # 140 pages of 8 tokens: three 551-token prompts hold one rank's span each (max(S, L - S) tokens, 35
    # pages at first) and cannot all grow by 120 decode tokens (50 pages each); three compressed ones (16
    # kept tokens each) cannot all grow by 400
    small = dict(num_kv_pages=140, kv_compression="snapkv", kv_capacity=16, kv_window=8)
    llm, ref = group.start(wide, 1, 2, "snapkv", **small), tiny(wide, policy="snapkv", **small)
    runs = {
        "snapkv": (
            [text(530 + i, 10 + i) for i in range(3)],
            SamplingParams(max_tokens=400, ignore_eos=True),
        ),
        "dense": ([text(551, 20 + i) for i in range(3)], SamplingParams(max_tokens=120, ignore_eos=True)),
    }
    for policy, (prompts, params) in runs.items():
        if policy == "dense":  # uncompressed: recomputed when preempted
            llm.set_kv_compression("none")
            ref.set_kv_compression("none")
        got, want = llm.generate(prompts, params, policy=policy), ref.generate(prompts, params, policy=policy)
        assert [o.token_ids for o in got] == [o.token_ids for o in want], policy
        assert all(o.stats["sequence_parallel_size"] == 2 for o in got), policy
        assert sum(o.stats["preemptions"] for o in got) >= 1, policy
    assert llm.core.pages.free_pages == 140
    assert llm.executor is not None
    held = llm.executor.probe()  # one row per rank: nothing left of the finished requests
    assert len(held) == 2 and all(h[0] == h[2] == h[3] == 0 for h in held)


def test_sp_prompts_bypass_the_prefix_cache_and_adaptive_capacities_run_without_sp(
    wide: Path, group: Group
) -> None:
    one = tiny(wide, policy="entropy", **KV, kv_head_capacity="adaptive")
    llm = group.start(wide, 1, 2, "entropy", **KV, kv_head_capacity="adaptive")
    prompts = [PROMPTS[0], PROMPTS[0]]
    # adaptive capacities weigh every head's scores at once: such requests run without SP
    ref, got = one.generate(prompts, PARAMS), llm.generate(prompts, PARAMS)
    assert_same(got, ref, [False, False], 2)
    assert all(o.stats["kv_compressions"] >= 1 for o in got)
    # without compression the same prompt runs SP, twice, and never enters the prefix cache
    plain = SamplingParams(max_tokens=1)
    cached = llm.core.counts()["prefix_cache_pages"]  # shared by the compressed (not SP) requests above
    first, second = llm.generate([PROMPTS[0]], plain)[0], llm.generate([PROMPTS[0]], plain)[0]
    assert first.stats["sequence_parallel_size"] == second.stats["sequence_parallel_size"] == 2
    assert first.stats["cached_tokens"] == second.stats["cached_tokens"] == 0
    assert llm.core.counts()["prefix_cache_pages"] == cached
    ref_first, ref_second = one.generate([PROMPTS[0]], plain)[0], one.generate([PROMPTS[0]], plain)[0]
    assert ref_second.stats["cached_tokens"] > 0  # one rank would have taken it from the cache
    assert first.token_ids == second.token_ids == ref_first.token_ids == ref_second.token_ids


def test_a_killed_sp_rank_fails_the_request_with_a_clear_error(wide: Path, group: Group) -> None:
    llm = group.start(wide, 1, 2)
    assert llm.executor is not None
    stream = llm.stream(PROMPTS[0], SamplingParams(max_tokens=400, ignore_eos=True))
    next(stream)  # prefilled split over both ranks, decoding with the LSE merge
    os.kill(llm.executor.ranks.processes[0].pid, signal.SIGKILL)
    t0 = time.perf_counter()
    with pytest.raises(ShardGroupError, match="rank 1 exited"):
        for _ in stream:
            pass
    assert time.perf_counter() - t0 < 10
    group.close()


def test_sizes_that_do_not_split_the_kv_heads_fail_before_any_process_starts(wide: Path) -> None:
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=3 with tensor_parallel_size=2.*1\.\.2"):
        tiny(wide, 2, 3)
    with pytest.raises(ConfigError, match="sequence_parallel_min_tokens"):
        tiny(wide, 1, 2, sequence_parallel_min_tokens=0)


@pytest.mark.slow
def test_smollm2_sp2_equals_one_rank(group: Group) -> None:
    """SmolLM2 (9 / 3 heads: 2 + 1 KV heads per SP rank), a prompt of over 1024 tokens split in two and a
    short one: dense, then entropy with latent compression, on one group (and one reference LLM)."""
    group.close()
    doc = " ".join(
        f"Item {i}: the colour of box {i % 17} is {['red', 'blue', 'green'][i % 3]}." for i in range(120)
    )
    prompts = [doc + " Which colour is box 5?", "What is the capital of France?"]
    params = SamplingParams(max_tokens=12)
    kw = dict(policy_config="entropy_short", sequence_parallel_min_tokens=1024, kv_compression="none")
    one = LLM("smollm2-135m", device="cpu", **kw)
    assert len(one.encode(prompts[0])) >= 1024
    with LLM("smollm2-135m", device="cpu", sequence_parallel_size=2, **kw) as llm:
        for policy, kv in (("dense", None), ("entropy", dict(KV, kv_capacity=256))):
            if kv is not None:  # latent compression per segment from here on
                fields = {k.removeprefix("kv_"): v for k, v in kv.items() if k != "kv_compression"}
                for engine in (one, llm):
                    engine.set_kv_compression(str(kv["kv_compression"]), **fields)
            ref = one.generate(prompts, params, policy=policy)
            got = llm.generate(prompts, params, policy=policy)
            assert_same(got, ref, [True, False], 2)
            for g, r in zip(got, ref, strict=True):
                assert all(g.stats.get(key) == r.stats.get(key) for key in KV_STATS), policy
            if policy == "entropy":
                assert got[0].stats["kv_compressions"] >= 1 and got[0].stats["density"] < 1.0


@pytest.mark.slow
def test_ray_ranks_run_tp2_sp2(wide: Path, group: Group, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Serve path's ranks: Ray actors (`RayRanks`) for ranks 1..3 of TP=2 x SP=2."""
    ray = pytest.importorskip("ray")
    from entropyinfer.cluster.shard_group import RayRanks, ShardGroup
    from entropyinfer.shard.config import LLMConfig

    group.close()
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # unset: Ray starts the local cluster with token auth
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    keywords = dict(
        model=str(wide), policy="entropy", load_format="dummy", device="cpu", warm_up_kernels=False,
        kv_page_size=8, tensor_parallel_size=2, sequence_parallel_size=2, kv_compression="none",
        sequence_parallel_min_tokens=MIN_TOKENS, **SPARSE,
    )  # fmt: skip
    ref = tiny(wide, policy="entropy").generate(PROMPTS, PARAMS)
    try:
        # in the suite's shared Ray session the Serve app holds most CPUs: the 3 rank actors then ask for
        # a sliver (in the full suite 0.5 each never scheduled: 'ranks 1..3 did not join within 300 s')
        cpus = 0.5 if started else 0.01
        shards = ShardGroup(LLMConfig.from_keywords(keywords), lambda: RayRanks(cpus_per_rank=cpus))
        llm = shards.build()
        try:
            assert_same(llm.generate(PROMPTS, PARAMS), ref, SP_PROMPTS, 2)
            health = shards.health(llm)
            assert (health["tensor_parallel_size"], health["sequence_parallel_size"]) == (2, 2)
            assert [r["healthy"] for r in health["ranks"]] == [True] * 4
        finally:
            llm.close()
    finally:
        if started:
            ray.shutdown()
