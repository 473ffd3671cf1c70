"""Chunked prefill attention (`SparsePrefill.chunk`, `DensePrefill.chunk`) equals one-shot prefill, and a
prefill resumed from another prompt's `state_at` equals the one-shot prefill of its own prompt (fp32, CPU,
the torch path; random q / k / v per layer, some KV heads near one-hot so that rigid-so-far heads occur)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from entropyinfer.policies.config import load_sparse_config
from entropyinfer.shard.attention import DensePrefill, build_prefill_attention
from entropyinfer.shard.sparse_attention import SparsePrefill

LAYERS = 3
CFG = dataclasses.replace(
    load_sparse_config("entropy_short"), segment_size=32, base_budget=64, threshold_len=64, fixed_budget=64
)
# (policy, config overrides)
RULES = [
    ("entropy", {"mode": "causal"}),
    ("entropy", {"mode": "spread", "min_budget": 16, "rigid_budget": 8}),
    ("fixed", {}),
    ("fixed", {"target_density": 0.6}),
    # blocks taken in query-ranking order (`kernels/query_ranking.py`): still one-shot's blocks in chunks
    ("entropy", {"mode": "causal", "ranking": "queries"}),
    ("fixed", {"ranking": "queries", "ranking_stride": 4}),
    ("dense", {}),
]


def layer_inputs(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(LAYERS):
        q = torch.randn(6, n, 32, generator=gen)
        k = torch.randn(2, n, 32, generator=gen)
        q[:3] *= 12.0  # KV head 0: sharp block distributions, entropies near 0 (rigid, at least for a while)
        k[0] *= 3.0
        out.append((q, k, torch.randn(2, n, 32, generator=gen)))
    return out


def one_shot(attn, inputs, n: int) -> list[torch.Tensor]:
    attn.begin(LAYERS, n)
    return [attn(li, q, k, v) for li, (q, k, v) in enumerate(inputs)]


def chunked(attn, inputs, n: int, bounds: list[int], resume=None) -> list[torch.Tensor]:
    """Chunks [bounds[i], bounds[i+1]) through every layer in turn; outputs of positions bounds[0]..n."""
    attn.begin(LAYERS, n)
    if resume is not None:
        attn.resume(resume)
    outs: list[list[torch.Tensor]] = [[] for _ in inputs]
    for q0, q1 in itertools.pairwise(bounds):
        for li, (q, k, v) in enumerate(inputs):
            outs[li].append(attn.chunk(li, q[:, q0:q1], k[:, :q1], v[:, :q1], q0, n))
    return [torch.cat(o, dim=1) for o in outs]


def same_stats(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            assert a[key] == pytest.approx(b[key], rel=1e-12), key
        else:
            assert a[key] == b[key], key


def same_plans(a, b) -> None:
    if isinstance(a, DensePrefill):
        return
    assert len(a.sparse_counts) == len(b.sparse_counts)
    for (c1, d1), (c2, d2) in zip(a.sparse_counts, b.sparse_counts, strict=True):
        assert torch.equal(c1, c2) and torch.equal(d1, d2)
    hkv = a.sparse_counts[0][0].shape[0] if a.sparse_counts else 2
    e1, e2 = a.head_entropy(hkv), b.head_entropy(hkv)
    assert (e1 is None) == (e2 is None)
    if e1 is not None:
        # the blocks are equal exactly (above); the mean entropy may differ in the last bit, as a sum over
        # segments split differently in memory can round differently
        torch.testing.assert_close(e1, e2, rtol=1e-6, atol=1e-6, equal_nan=True)


def build(policy: str, overrides: dict):
    return build_prefill_attention(policy, dataclasses.replace(CFG, **overrides))


@pytest.mark.parametrize(("policy", "overrides"), RULES)
@pytest.mark.parametrize(
    ("n", "bounds"),
    [
        (300, [0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 300]),  # one segment a chunk, ragged end
        (300, [0, 64, 96, 224, 300]),  # mixed chunk sizes
        (320, [0, 160, 320]),  # N a multiple of S: the last chunk is whole segments
        (300, [0, 300]),  # one chunk
        (90, [0, 32, 64, 90]),  # too short for a sparse segment: dense everywhere
        # the dense last segment [288, N) in pieces (`Scheduler._dense_cap`): a chunk ending inside it after
        # whole segments, pieces inside it, one starting on it
        (300, [0, 64, 96, 224, 290, 296, 300]),
        (320, [0, 160, 288, 291, 304, 320]),
        (300, [0, 288, 289, 300]),
    ],
)
def test_chunks_equal_one_shot(policy: str, overrides: dict, n: int, bounds: list[int]) -> None:
    """Same output, block counts (bit for bit) and statistics as one call over the whole prompt."""
    inputs = layer_inputs(n, seed=n)
    ref_attn, got_attn = build(policy, overrides), build(policy, overrides)
    assert got_attn.chunkable
    ref = one_shot(ref_attn, inputs, n)
    got = chunked(got_attn, inputs, n, bounds)
    for r, g in zip(ref, got, strict=True):
        # float32 attention of a one-query chunk runs another CPU kernel than a 300-query call: the outputs
        # differ in rounding (1.2e-5 seen on one machine, at values ~0.07); the block counts are bit-equal
        torch.testing.assert_close(g, r, rtol=1e-4, atol=3e-5)
    same_plans(ref_attn, got_attn)
    same_stats(ref_attn.stats(), got_attn.stats())
    if policy != "dense" and n > 200:
        stats = got_attn.stats()
        assert stats["density"] < 1.0 and "budget_tokens" in stats
        if policy == "fixed" and "target_density" in overrides:
            assert stats["fixed_budget"] % CFG.block_size == 0


@pytest.mark.parametrize(("policy", "overrides"), [r for r in RULES if r[0] != "dense"])
@pytest.mark.parametrize("bounds", [[0, 64, 300], [0, 96, 224, 300], [0, 288, 300]])
def test_dense_last_segment_run_apart_equals_the_kernel(
    policy: str, overrides: dict, bounds: list[int]
) -> None:
    """The prompt's last segment (dense) of a chunk at an offset, taken out of the sparse kernel and run by
    dense chunk attention (`dense_tail_min_prefix`, on by default from 8192 keys), gives the kernel's output
    and the same plans."""
    n = 300
    inputs = layer_inputs(n, seed=11)
    ref_attn, got_attn = build(policy, overrides), build(policy, overrides)
    ref_attn.dense_tail_min_prefix = n + 1  # never apart
    got_attn.dense_tail_min_prefix = 0  # always apart
    ref = chunked(ref_attn, inputs, n, bounds)
    got = chunked(got_attn, inputs, n, bounds)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    same_plans(ref_attn, got_attn)
    same_stats(ref_attn.stats(), got_attn.stats())


def test_causal_mode_has_rigid_so_far_heads_and_differs_from_per_head() -> None:
    """The sharp KV head is rigid in early segments only: causal gives it B0 there, per_head its
    recurrence."""
    n = 300
    inputs = layer_inputs(n, seed=5)
    causal = build("entropy", {"mode": "causal"})
    per_head = build("entropy", {"mode": "per_head"})
    one_shot(causal, inputs, n)
    one_shot(per_head, inputs, n)
    assert not per_head.chunkable and causal.chunkable
    c = torch.stack([x for x, _ in causal.sparse_counts])
    p = torch.stack([x for x, _ in per_head.sparse_counts])
    assert bool((c <= p).all())  # rigid so far keeps B0, the floor of the recurrence
    with pytest.raises(ValueError, match="one shot"):
        per_head.chunk(1, *inputs[1], 0, n)


@pytest.mark.parametrize(("policy", "overrides"), [r for r in RULES if "target_density" not in r[1]])
@pytest.mark.parametrize(
    ("cached", "n_writer", "n_reader"), [(4, 300, 400), (7, 256, 256 + 20), (2, 90, 300)]
)
def test_resume_from_a_cached_prefix_equals_one_shot(
    policy: str, overrides: dict, cached: int, n_writer: int, n_reader: int
) -> None:
    """Writer and reader share their first `cached` segments (same q / k / v there); the reader resumes
    from the writer's state and prefills only the rest: the blocks, outputs and stats of its one-shot
    prefill. The writer's cacheable boundary is before its last segment."""
    s_len = CFG.segment_size
    assert cached <= math.ceil(n_writer / s_len) - 1
    reader_in = layer_inputs(n_reader, seed=11)
    writer_in = [
        (q[:, :n_writer].clone(), k[:, :n_writer].clone(), v[:, :n_writer].clone()) for q, k, v in reader_in
    ]
    start = cached * s_len
    for q, k, _ in writer_in:  # the writer's text differs after the shared prefix
        q[:, start:] = torch.randn_like(q[:, start:])
        k[:, start:] = torch.randn_like(k[:, start:])
    writer = build(policy, overrides)
    chunked(writer, writer_in, n_writer, sorted({0, start, *range(0, n_writer, 64), n_writer}))
    assert writer.prefix_cacheable
    state = writer.state_at(start // writer.segment_size)  # dense: a "segment" is a token
    assert state.tokens == start
    if isinstance(writer, SparsePrefill):
        assert state.layers[0] is None and all(ls is not None for ls in state.layers[1:])
        assert all(
            ls.entropy.shape == (2, cached) and ls.entropy.device.type == "cpu" for ls in state.layers[1:]
        )  # type: ignore[union-attr]
    reader = build(policy, overrides)
    got = chunked(
        reader, reader_in, n_reader, sorted({start, *range(start, n_reader, 96), n_reader}), resume=state
    )
    ref_attn = build(policy, overrides)
    ref = one_shot(ref_attn, reader_in, n_reader)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r[:, start:], rtol=1e-5, atol=1e-5)
    same_plans(ref_attn, reader)
    same_stats(ref_attn.stats(), reader.stats())


def test_state_is_refused_where_it_cannot_be_exact() -> None:
    n = 300
    inputs = layer_inputs(n, seed=3)
    solved = build("fixed", {"target_density": 0.6})  # its budget depends on the prompt's length
    chunked(solved, inputs, n, [0, 128, 300])
    assert solved.chunkable and not solved.prefix_cacheable
    with pytest.raises(ValueError, match="cannot be reused"):
        solved.state_at(2)
    causal = build("entropy", {"mode": "causal"})
    chunked(causal, inputs, n, [0, 128, 300])
    state = causal.state_at(4)
    spread = build("entropy", {"mode": "spread"})
    spread.begin(LAYERS, 400)
    with pytest.raises(ValueError, match="cannot resume"):
        spread.resume(state)  # another config
    other = build("entropy", {"mode": "causal"})
    other.begin(LAYERS, 400)
    other.resume(state)
    with pytest.raises(ValueError, match="segments so far"):
        q, k, v = inputs[1]
        other.chunk(1, q[:, :32], k[:, :32], v[:, :32], 0, 400)  # not where the state ends
    with pytest.raises(ValueError, match="multiples of S"):
        causal.chunk(1, inputs[1][0][:, 10:40], inputs[1][1][:, :40], inputs[1][2][:, :40], 10, n)
    half = build("entropy", {"mode": "causal"})
    chunked(half, inputs, n, [0, 128])
    with pytest.raises(ValueError, match="fewer than"):
        half.state_at(5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dense_chunks_on_gpu(dtype: torch.dtype) -> None:
    """The fused kernels' log-sum-exp merge (cuDNN / flash / efficient, whichever runs) equals one call."""
    from entropyinfer.shard.dense_attention import dense_causal_attention, dense_chunk_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    n = 4096 + 77
    q = torch.randn(32, n, 128, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(8, n, 128, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(8, n, 128, device="cuda", dtype=dtype, generator=gen)
    ref = dense_causal_attention(q, k, v).float()
    for q0, q1 in [(0, 1024), (1024, 3072), (3072, n)]:
        got = dense_chunk_attention(q[:, q0:q1], k[:, :q1], v[:, :q1], q0).float()
        torch.testing.assert_close(got, ref[:, q0:q1], rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["causal", "spread"])
def test_sparse_chunks_on_gpu(mode: str) -> None:
    """The Triton path in bf16: chunked counts agree with one-shot on at least 99% of (layer, KV head,
    segment) (tile results need not be bit-identical across launches), outputs close; the dense last
    segment in two pieces."""
    cfg = dataclasses.replace(load_sparse_config("entropy_long"), mode=mode)
    n, s_len = 16 * 512 + 300, cfg.segment_size
    gen = torch.Generator(device="cuda").manual_seed(1)
    inputs = [
        tuple(torch.randn(h, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (32, 8, 8))
        for _ in range(LAYERS)
    ]
    ref_attn = build_prefill_attention("entropy", cfg)
    ref = one_shot(ref_attn, inputs, n)
    got_attn = build_prefill_attention("entropy", cfg)
    got = chunked(got_attn, inputs, n, [0, 4 * s_len, 9 * s_len, 10 * s_len, 16 * s_len, 16 * s_len + 128, n])
    c1 = torch.stack([c for c, _ in ref_attn.sparse_counts])
    c2 = torch.stack([c for c, _ in got_attn.sparse_counts])
    assert float((c1 == c2).float().mean()) >= 0.99
    for r, g in zip(ref, got, strict=True):
        assert float((r.float() - g.float()).abs().mean()) < 1e-2
    assert abs(ref_attn.stats()["density"] - got_attn.stats()["density"]) < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chunks_of_any_size_and_offset_compile_nothing_new_on_gpu() -> None:
    """After one chunked prefill, another prompt of the same length in chunks of other sizes and offsets
    (row strides of 1, of multiples of 16 and not, pieces of the last segment) compiles no Triton kernel: a
    compile costs 0.4-0.6 s in the middle of a serving step. Segments of 128 tokens, as in every preset
    (the profiling kernels' row strides are a chunk's segments times the key blocks, a multiple of 16 from
    S = 128 on)."""
    import triton

    cfg = dataclasses.replace(CFG, segment_size=128, threshold_len=256, base_budget=256, fixed_budget=256)
    n = 34 * 128 + 44  # the last segment [4352, 4396)
    gen = torch.Generator(device="cuda").manual_seed(3)
    inputs = [
        tuple(torch.randn(h, n, 32, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (6, 2, 2))
        for _ in range(LAYERS)
    ]
    chunked(build_prefill_attention("entropy", cfg), inputs, n, [0, 384, 2048, 4352, 4368, n])
    torch.cuda.synchronize()
    compiled: list[str] = []
    knobs = triton.knobs.runtime
    before = knobs.jit_post_compile_hook
    knobs.jit_post_compile_hook = lambda *a, **kw: compiled.append(str(kw.get("repr"))[:300]) and None
    bounds = [0, 256, 384, 512, 2176, 2304, 4224, 4352, 4360, n]
    try:
        chunked(build_prefill_attention("entropy", cfg), inputs, n, bounds)
        torch.cuda.synchronize()
    finally:
        knobs.jit_post_compile_hook = before
    assert compiled == []


class _Recorder(SparsePrefill):
    """A one-shot SparsePrefill that keeps every layer's q / k / v (to replay them chunk by chunk)."""

    def __init__(self, policy, config) -> None:
        super().__init__(policy, config)
        self.inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.inputs.append((q.clone(), k.clone(), v.clone()))
        return super().__call__(layer, q, k, v)


def test_chunks_equal_one_shot_on_the_real_model(smollm2) -> None:
    """SmolLM2's own q / k / v of a 2k-token prose prompt (causal mode, entropy_short): chunk by chunk, the
    block counts of every (layer, KV head, segment), the stats and the outputs are one-shot's; a reader that
    resumes after 9 segments from a writer that stopped at 10 gets them too."""
    from entropyinfer.evaluation.corpus import prose_text

    ids = smollm2.tokenizer.encode(prose_text(), add_special_tokens=False)[: 16 * 128 + 77]
    n, cfg = len(ids), dataclasses.replace(smollm2.sparse_config, mode="causal")
    rec = _Recorder("entropy", cfg)
    cache = smollm2.engine.new_cache(1, n)
    with torch.inference_mode():
        smollm2.engine.prefill(torch.tensor(ids), cache, 0, rec)
    layers = len(rec.inputs)
    ref_out = [
        rec.chunk(li, q, k, v, 0, n) for li, (q, k, v) in enumerate(rec.inputs)
    ]  # already profiled: reset
    s = cfg.segment_size
    with torch.inference_mode():
        got = SparsePrefill("entropy", cfg)
        got.begin(layers, n)
        outs: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        for q0, q1 in itertools.pairwise([0, 4 * s, 5 * s, 9 * s, 13 * s, n]):
            for li, (q, k, v) in enumerate(rec.inputs):
                outs[li].append(got.chunk(li, q[:, q0:q1], k[:, :q1], v[:, :q1], q0, n))
        for r, o in zip(ref_out, outs, strict=True):
            torch.testing.assert_close(torch.cat(o, dim=1), r, rtol=1e-4, atol=1e-4)
        same_plans(rec, got)
        same_stats(rec.stats(), got.stats())
        assert 0.0 < got.stats()["density"] < 1.0
        reader = SparsePrefill("entropy", cfg)
        reader.begin(layers, n)
        reader.resume(got.state_at(9))
        for q0, q1 in itertools.pairwise([9 * s, 12 * s, n]):
            for li, (q, k, v) in enumerate(rec.inputs):
                reader.chunk(li, q[:, q0:q1], k[:, :q1], v[:, :q1], q0, n)
        same_plans(rec, reader)
        same_stats(rec.stats(), reader.stats())
