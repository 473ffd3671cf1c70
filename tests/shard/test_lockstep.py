"""The engine core on a tensor-parallel group in lockstep (gloo, CPU): `LLM(..., tensor_parallel_size=k)`
runs rank 0 here and ranks 1..k-1 in worker processes, and gives one rank's tokens.

On the tiny random Llama (4 query / 2 KV heads): 8 concurrent requests at TP=2 equal TP=1 for dense,
entropy (default mode) with latent compression and entropy head capacities, and SnapKV (tokens, density,
KV kept and capacities); TP=4 replicates KV heads and equals TP=1 for dense; prefix caching still hits
(dense and causal entropy); a cancelled request leaves nothing on any rank; a killed worker fails the
request in flight with `ShardGroupError` within seconds, and every later one at once; preemption (swap of
compressed sequences, recompute of the others) gives the same tokens. The plan codec round-trips. Slow:
SmolLM2 at TP=3 equals one rank; the ranks as Ray actors (`cluster/shard_group.py: RayRanks`) equal one.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from entropyinfer import LLM, SamplingParams
from entropyinfer.errors import ConfigError
from entropyinfer.policies.config import SparsePrefillConfig
from entropyinfer.shard.parallel.executor import PrefillCall
from entropyinfer.shard.parallel.lockstep import ShardGroupError
from entropyinfer.shard.parallel.messages import Decode, ObsAcquire, Prefill, Share, StepPlan, decode, encode

PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)
SPARSE = dict(segment_size=64, block_size=8, threshold_len=64, base_budget=32, fixed_budget=32)
KV = dict(kv_capacity=32, kv_window=8, kv_gap=4, kv_head_capacity="entropy")
DOC = "".join(f"line {i}: the value of key {i * 7 % 13} is {i * 31 % 97}. " for i in range(9))  # ~320 chars
PROMPTS = [f"request {i}: " + "abc " * (3 * i + 1) for i in range(7)] + [DOC]
COMPARED = (
    "density",
    "rigid_fraction",
    "kv_tokens_kept",
    "kv_tokens_kept_total",
    "kv_bytes",
    "kv_compressions",
)


def tiny(folder: Path, tp: int = 1, **kw: object) -> LLM:
    return LLM(
        str(folder), load_format="dummy", device="cpu", warm_up_kernels=False, kv_page_size=8,
        tensor_parallel_size=tp, **{**SPARSE, **KV, **kw},
    )  # fmt: skip


class Groups:
    """One tensor-parallel LLM alive at a time (torch.distributed's default group is per process)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.key, self.llm = folder, (0, ()), None

    def get(self, tp: int, **kw: object) -> LLM:
        key = (tp, tuple(sorted(kw.items())))
        if self.llm is None or self.key != key or self.llm.executor is None or self.llm.executor.broken:
            self.close()
            self.llm, self.key = tiny(self.folder, tp, **kw), key
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


@pytest.fixture(scope="module")
def groups(tiny_checkpoint: Path) -> Iterator[Groups]:
    g = Groups(tiny_checkpoint)
    yield g
    g.close()


@pytest.fixture(scope="module")
def one(tiny_checkpoint: Path) -> LLM:
    return tiny(tiny_checkpoint)


def assert_same(got: list, ref: list, what: str) -> None:
    assert [o.token_ids for o in got] == [o.token_ids for o in ref], what
    for g, r in zip(got, ref, strict=True):
        for key in COMPARED:
            if key in r.stats:
                assert g.stats[key] == pytest.approx(r.stats[key], rel=1e-6, abs=1e-9), f"{what}: {key}"
        assert g.stats.get("kv_head_capacities") == r.stats.get("kv_head_capacities"), what


@pytest.mark.parametrize(
    ("tp", "policy"), [(2, "dense"), (2, "entropy"), (2, "snapkv"), (4, "dense"), (4, "snapkv")]
)
def test_eight_concurrent_requests_equal_one_rank(groups: Groups, one: LLM, tp: int, policy: str) -> None:
    llm = groups.get(tp)
    got, ref = llm.generate(PROMPTS, PARAMS, policy=policy), one.generate(PROMPTS, PARAMS, policy=policy)
    assert_same(got, ref, f"tp={tp} {policy}")
    if policy != "dense":
        assert got[-1].stats["kv_compressions"] == 1
    if policy == "entropy":
        assert got[-1].stats["density"] < 1.0 and "kv_head_capacities" in got[-1].stats
    assert llm.core.pages.used_pages == 0 and not llm.core.has_unfinished()
    assert all(h[0] == h[2] == 0 for h in llm.executor.probe())  # no rank keeps request state


@pytest.mark.parametrize(("tp", "policy"), [(2, "dense"), (2, "entropy"), (4, "dense")])
def test_prefix_cache_hits_under_tp(groups: Groups, one: LLM, tp: int, policy: str) -> None:
    llm, options = groups.get(tp), ({"mode": "causal"} if policy == "entropy" else None)
    questions = [DOC + f"\nQ{i}: what is key {i}?" for i in range(3)]
    for target in (llm, one):
        target.generate(questions[0], PARAMS, policy=policy, policy_options=options)  # writes the cache
    got = llm.generate(questions[1:], PARAMS, policy=policy, policy_options=options)
    ref = one.generate(questions[1:], PARAMS, policy=policy, policy_options=options)
    assert all(o.stats["cached_tokens"] > 0 for o in got)
    assert_same(got, ref, f"tp={tp} {policy} prefix cache")


def test_preemption_by_swap_and_recompute_under_tp(groups: Groups, tiny_checkpoint: Path) -> None:
    # 12 pages of 8 tokens for 3 requests of ~70 + 40 tokens: compressed ones are swapped out (every rank
    # copies its own heads' KV to host memory and back), uncompressed ones recomputed
    small = dict(num_kv_pages=12, kv_capacity=16, kv_window=8, kv_gap=-1, kv_head_capacity="uniform")
    llm, ref = groups.get(2, **small), tiny(tiny_checkpoint, **small)
    runs = {
        "snapkv": (
            [f"swap {i} " + "w" * 60 for i in range(3)],
            SamplingParams(max_tokens=40, ignore_eos=True),
        ),
        "dense": (
            [f"{i} page test " + "q" * 25 for i in range(3)],
            SamplingParams(max_tokens=12, ignore_eos=True),
        ),
    }
    for policy, (prompts, params) in runs.items():
        got, want = llm.generate(prompts, params, policy=policy), ref.generate(prompts, params, policy=policy)
        assert [o.token_ids for o in got] == [o.token_ids for o in want], policy
        assert sum(o.stats["preemptions"] for o in got) >= 1, policy
    assert llm.core.pages.free_pages == 12
    assert all(h[0] == h[2] == 0 for h in llm.executor.probe())


def test_cancel_frees_pages_on_every_rank(groups: Groups) -> None:
    llm = groups.get(2)
    long = SamplingParams(max_tokens=100, ignore_eos=True)
    stream = llm.stream(DOC, long, policy="entropy")
    for _ in range(6):  # past the latent compression (kv_gap=4): its pages and window row are held
        next(stream)
    assert llm.core.pages.used_pages > 0
    stream.close()  # the caller goes away: the request is aborted
    assert llm.core.pages.used_pages == 0 and not llm.core.has_unfinished()
    held = llm.executor.probe()  # the next plan carries the drop: no rank keeps the request's state
    assert [h[0] for h in held] == [0, 0] and [h[2] for h in held] == [0, 0]


def test_a_killed_worker_fails_the_request_with_a_clear_error(groups: Groups) -> None:
    llm = groups.get(2)
    assert llm.executor is not None
    stream = llm.stream(DOC, SamplingParams(max_tokens=500, ignore_eos=True))
    next(stream)
    os.kill(llm.executor.ranks.processes[0].pid, signal.SIGKILL)
    t0 = time.perf_counter()
    with pytest.raises(ShardGroupError, match="rank 1 exited"):
        for _ in stream:
            pass
    assert time.perf_counter() - t0 < 10
    with pytest.raises(ShardGroupError, match="broken"):  # later requests fail at once, no hang
        llm.generate("again", PARAMS)
    groups.close()


def test_a_size_that_does_not_split_the_heads_fails_before_any_process_starts(tiny_checkpoint: Path) -> None:
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=3 .*sizes that work: 1, 2, 4"):
        tiny(tiny_checkpoint, 3)


def test_plans_round_trip_without_pickle() -> None:
    call = PrefillCall(
        "r", torch.arange(5), 0, 5, torch.zeros(2, 3, dtype=torch.long), "entropy",
        SparsePrefillConfig(segment_size=64), True, (b"name", 3), 2,
    )  # fmt: skip
    tables = torch.arange(24, dtype=torch.int32).view(3, 2, 4)
    step = Decode(
        torch.arange(3), torch.arange(3), tables, torch.ones(2, 3, 2, dtype=torch.int32), None, None, 7
    )
    plan = StepPlan([ObsAcquire(8, 1), Share("r", 2, [b"x"], [2]), Prefill(call), step])
    back = decode(encode(plan))
    assert isinstance(back, StepPlan) and back.ops[:2] == plan.ops[:2]
    got = back.ops[2].call
    assert got.resume == (b"name", 3) and got.sparse == call.sparse and torch.equal(got.tokens, call.tokens)
    assert torch.equal(back.ops[3].tables, tables) and back.ops[3].steps_left == 7


def test_smollm2_tp3_generate_equals_one_rank(smollm2: LLM, groups: Groups) -> None:
    groups.close()
    prompts = ["The capital of France is", [{"role": "user", "content": "Name three colours."}]]
    params = SamplingParams(max_tokens=8)
    with LLM("smollm2-135m", device="cpu", tensor_parallel_size=3) as three:
        got = three.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in smollm2.generate(prompts, params)]


@pytest.mark.slow
def test_ray_ranks_equal_one_rank(groups: Groups, one: LLM, tiny_checkpoint: Path) -> None:
    ray = pytest.importorskip("ray")
    from entropyinfer.cluster.shard_group import RayRanks
    from entropyinfer.shard.config import LLMConfig

    groups.close()
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    keywords = dict(
        model=str(tiny_checkpoint), load_format="dummy", device="cpu", warm_up_kernels=False, kv_page_size=8,
        tensor_parallel_size=2, **SPARSE, **KV,
    )  # fmt: skip
    try:
        with LLM.from_config(LLMConfig.from_keywords(keywords), ranks=RayRanks(cpus_per_rank=0.5)) as llm:
            for policy in ("dense", "entropy"):
                got = llm.generate(PROMPTS, PARAMS, policy=policy)
                assert_same(got, one.generate(PROMPTS, PARAMS, policy=policy), f"ray {policy}")
    finally:
        if started:
            ray.shutdown()
