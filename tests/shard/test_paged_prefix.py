"""A prefill chunk over keys in KV pages (`PagedPrefix`, `PrefillAttention.chunk_paged`) equals the chunk
over the same keys gathered: profiling from the pages' block representations and the paged sparse kernel
choose the same blocks and give the same output (the torch path on CPU: bit for bit), for every chunkable
rule, a chunk that resumes a cached prefix included; and the engine core (`LLM`) gives the same greedy
tokens and block counts with the paged reads forced on as with the gather."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from test_chunked_attention import LAYERS, RULES, build, layer_inputs, same_plans, same_stats

from entropyinfer.shard.paged_prefix import PagedPrefix


def pool_of(k: torch.Tensor, v: torch.Tensor, page_size: int, seed: int) -> PagedPrefix:
    """``k, v [Hkv, N, d]`` in a pool of shuffled pages (each head its own order, spare pages of noise);
    start / end and the chunk keys are filled in per chunk (`at`)."""
    hkv, n, d = k.shape
    per_head = -(-n // page_size)
    pages = hkv * per_head + 2
    gen = torch.Generator().manual_seed(seed)
    k_pages, v_pages = (torch.randn(pages, hkv, page_size, d, generator=gen) * 30 for _ in range(2))
    table = torch.randperm(pages, generator=gen)[: hkv * per_head].reshape(hkv, per_head)
    pad = per_head * page_size - n
    for h in range(hkv):
        for pool, x in ((k_pages, k), (v_pages, v)):
            pool[table[h], h] = torch.cat([x[h], x.new_zeros(pad, d)]).reshape(per_head, page_size, d)
    return PagedPrefix(k_pages, v_pages, table, k, v, 0, n, in_place=True)


def at(pool: PagedPrefix, q0: int, q1: int) -> PagedPrefix:
    ps = pool.k_pages.shape[2]
    return PagedPrefix(
        pool.k_pages, pool.v_pages, pool.table[:, : -(-q1 // ps)], pool.k_chunk[:, q0:q1],
        pool.v_chunk[:, q0:q1], q0, q1, in_place=True,
    )  # fmt: skip


@pytest.mark.parametrize(("policy", "overrides"), RULES)
@pytest.mark.parametrize(("n", "bounds", "page_size"), [
    (300, [0, 64, 96, 224, 300], 16), (320, [0, 32, 160, 320], 64),
    (300, [0, 96, 224, 290, 296, 300], 16),  # the dense last segment in pieces
])  # fmt: skip
def test_paged_chunks_equal_gathered_chunks(
    policy: str, overrides: dict, n: int, bounds: list[int], page_size: int
) -> None:
    inputs = layer_inputs(n, seed=n + page_size)
    pools = [pool_of(k, v, page_size, seed=li) for li, (_, k, v) in enumerate(inputs)]
    ref_attn, got_attn = build(policy, overrides), build(policy, overrides)
    ref_attn.begin(LAYERS, n)
    got_attn.begin(LAYERS, n)
    for q0, q1 in itertools.pairwise(bounds):
        for li, ((q, k, v), pool) in enumerate(zip(inputs, pools, strict=True)):
            want = ref_attn.chunk(li, q[:, q0:q1], k[:, :q1], v[:, :q1], q0, n)
            got = got_attn.chunk_paged(li, q[:, q0:q1], at(pool, q0, q1), q0, n)
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    same_plans(ref_attn, got_attn)
    same_stats(ref_attn.stats(), got_attn.stats())


def test_paged_chunk_resumes_a_cached_prefix() -> None:
    """A reader resuming another prompt's state at 4 segments reads its prefix (the writer's keys) from
    the pages: same output and blocks as the gathered reader."""
    n = 300
    inputs = layer_inputs(n, seed=11)
    writer = build("entropy", {"mode": "causal"})
    writer.begin(LAYERS, n)
    for li, (q, k, v) in enumerate(inputs):
        writer.chunk(li, q[:, :128], k[:, :128], v[:, :128], 0, n)
    state = writer.state_at(4)
    pools = [pool_of(k, v, 16, seed=li) for li, (_, k, v) in enumerate(inputs)]
    outs = []
    for paged in (False, True):
        reader = build("entropy", {"mode": "causal"})
        reader.begin(LAYERS, n)
        reader.resume(state)
        for li, ((q, k, v), pool) in enumerate(zip(inputs, pools, strict=True)):
            if paged:
                outs.append(reader.chunk_paged(li, q[:, 128:], at(pool, 128, n), 128, n))
            else:
                outs.append(reader.chunk(li, q[:, 128:], k, v, 128, n))
    for a, b in zip(outs[:LAYERS], outs[LAYERS:], strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_engine_core_tokens_with_paged_reads(tiny_checkpoint: Path) -> None:
    """The whole path (`Engine.prefill_pages` -> `chunk_paged`): a chunked entropy prefill with the paged
    reads forced on gives the gather's greedy tokens and density."""
    from entropyinfer import LLM, SamplingParams

    sparse = dict(segment_size=64, block_size=8, threshold_len=64, base_budget=32, fixed_budget=32)
    prompt = "a long document: " + " ".join(f"w{i % 37}" for i in range(220))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    results = []
    for in_place in (False, True):
        llm = LLM(
            str(tiny_checkpoint), load_format="dummy", device="cpu", policy="entropy", kv_page_size=16,
            max_num_batched_tokens=128, warm_up_kernels=False, enable_prefix_caching=False,
            paged_prefix_reads=in_place, **sparse,
        )  # fmt: skip
        results.append(llm.generate(prompt, params)[0])
    plain, paged = results
    assert len(plain.prompt_token_ids) > 4 * 128  # several chunks
    assert paged.token_ids == plain.token_ids
    assert paged.stats["density"] == plain.stats["density"] < 1.0


@pytest.mark.parametrize(("policy", "overrides"), [r for r in RULES if r[0] != "dense"])
def test_warm_up_paged_chunk_lays_out_pages_the_kernels_read(policy: str, overrides: dict) -> None:
    """The warm-up's second chunk over its in-order pages equals the one-shot prefill of those positions
    (a wrong pool layout would still compile the kernels, but read the wrong keys)."""
    from entropyinfer.shard.sparse_warm_up import warm_up_paged_chunk

    n = 300
    q, k, _ = layer_inputs(n, seed=5)[1]
    got = warm_up_paged_chunk(build(policy, overrides), q, k, page_size=16)
    ref = build(policy, overrides)
    ref.begin(2, n)
    whole = ref.chunk(1, q, k, k, 0, n)  # layer 1: sparse (layer 0 always runs dense)
    assert got.shape[1] == n - 128
    torch.testing.assert_close(got, whole[:, n - got.shape[1] :], rtol=1e-5, atol=1e-5)
