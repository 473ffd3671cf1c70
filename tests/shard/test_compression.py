"""Decode-time KV compression on the engine (`shard/compression.py`, compact cache, decode over it).

A tiny random Llama (fp32, CPU; q/k weights scaled up so that attention is peaked, not uniform) checks:
compaction against a per-head gather reference, decode after compression against attention over the full
cache masked to the kept positions, re-compression in place, SnapKV vs latent differing only in when they
compress, and that the full cache's memory is released.
"""

from __future__ import annotations

import pytest
import torch

from entropyinfer.policies.kv_compression import KVCompressionConfig, plan_keep
from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.attention import DensePrefill
from entropyinfer.shard.compression import DecodeCompressor, ObservationWindow, compact_slots, compress
from entropyinfer.shard.engine import Engine, GraphedDecode
from entropyinfer.shard.kv_cache import CompactKVCache, KVCache
from entropyinfer.shard.weights import random_model

ARCH = ModelArch.from_hf_config(
    dict(
        model_type="llama",
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def engine() -> Engine:
    model = random_model(ARCH, CPU, torch.float32, seed=3)
    with torch.no_grad():
        for layer in model.layers:
            qk_rows = (ARCH.num_heads + ARCH.num_kv_heads) * ARCH.head_dim  # q and k of the fused q|k|v
            layer.self_attn.qkv_proj.weight[:qk_rows].mul_(12)
    return Engine(model)


def prefill(engine, prompts, capacity, obs):
    cache = engine.new_cache(len(prompts), capacity)
    logits = [engine.prefill(p, cache, i, DensePrefill(), observe=obs) for i, p in enumerate(prompts)]
    return cache, torch.stack(logits)


# ------------------------------------------------------------------------------------------- compaction
def test_compaction_equals_a_per_head_gather_reference():
    torch.manual_seed(0)
    b, cap, w = 2, 40, 4
    cfg = KVCompressionConfig(window=w, gap=-1, capacity=12)
    cache = KVCache(ARCH, b, cap, CPU, torch.float32)
    cache.data.normal_()
    cache.lengths.copy_(torch.tensor([[30, 30], [21, 21]], dtype=torch.int32))
    obs = ObservationWindow(ARCH, b, w, w, CPU, torch.float32)
    obs.q.normal_()
    capacities = torch.tensor([[[12, 16], [8, 12]], [[20, 4], [12, 40]]])  # [L, B, Hkv], per-head
    slots = compact_slots(cache.lengths[None], capacities, steps_left=3, recompress_every=0)
    assert slots == 21 + 3  # largest min(capacity, length) plus room
    assert compact_slots(cache.lengths[None], capacities, steps_left=30, recompress_every=4) == 40 + 4
    out = compress(cache, obs, cfg, capacities, steps=0, slots=slots, arch=ARCH)
    g, d = ARCH.group_size, ARCH.head_dim
    for li in range(ARCH.num_layers):
        q = obs.ordered(li, 0)
        for s in range(b):
            for h in range(ARCH.num_kv_heads):
                n, c = int(cache.lengths[s, h]), int(capacities[li, s, h])
                plan = plan_keep(
                    q[s, h * g : (h + 1) * g][None], cache.k(li)[s, h, :n][None], torch.tensor([n]),
                    torch.tensor([c]), cfg, slots=n,
                )  # fmt: skip
                idx = plan.indices[0, : int(plan.counts[0])]
                assert int(out.lengths[li, s, h]) == len(idx) == min(c, n)
                assert out.positions[li, s, h, : len(idx)].tolist() == idx.tolist()
                assert torch.equal(out.k(li)[s, h, : len(idx)], cache.k(li)[s, h, idx])
                assert torch.equal(out.v(li)[s, h, : len(idx)], cache.v(li)[s, h, idx])
    # re-compression in place: the same buffer, gathered by the plan over the compact entries
    before = out.data.clone(), out.positions.clone(), out.lengths.clone()
    smaller = torch.full_like(capacities, 6)
    again = compress(out, obs, cfg, smaller, steps=0, slots=0, arch=ARCH)
    assert again is out
    for li in range(ARCH.num_layers):
        q = obs.ordered(li, 0)
        for s in range(b):
            for h in range(ARCH.num_kv_heads):
                n = int(before[2][li, s, h])
                plan = plan_keep(
                    q[s, h * g : (h + 1) * g][None], before[0][li, 0, s, h, :n][None], torch.tensor([n]),
                    torch.tensor([6]), cfg, slots=n,
                )  # fmt: skip
                idx = plan.indices[0, : int(plan.counts[0])]
                assert int(out.lengths[li, s, h]) == min(6, n)
                assert torch.equal(out.k(li)[s, h, : len(idx)], before[0][li, 0, s, h, idx])
                assert out.positions[li, s, h, : len(idx)].tolist() == before[1][li, s, h, idx].tolist()
    assert d == out.data.shape[-1]


# ---------------------------------------------------------------------------- decode against a reference
@torch.inference_mode()
def masked_decode_step(engine, tokens, positions, cache: KVCache, keep: torch.Tensor) -> torch.Tensor:
    """The decode step over the full cache, each (layer, sequence, KV head) attending only where `keep`
    ([L, B, Hkv, capacity]) is True; the new token is written at its position and kept."""
    arch = engine.arch
    b, g, d = tokens.shape[0], arch.group_size, arch.head_dim
    h = engine.model.model.embed_tokens(tokens)[:, None]
    cos, sin = engine.model.rotary(positions[:, None], engine.dtype)
    rows = torch.arange(b)
    keep[:, rows, :, positions] = True
    for li, layer in enumerate(engine.model.layers):
        q, k, v = layer.attention_inputs(h, cos, sin)
        cache.k(li)[rows, :, positions] = k[:, :, 0]
        cache.v(li)[rows, :, positions] = v[:, :, 0]
        qf = q[:, :, 0].float().view(b, arch.num_kv_heads, g, d)
        scores = torch.einsum("bhgd,bhld->bhgl", qf, cache.k(li).float()) * d**-0.5
        scores = scores.masked_fill(~keep[li][:, :, None, :], float("-inf"))
        o = torch.einsum("bhgl,bhld->bhgd", torch.softmax(scores, dim=-1), cache.v(li).float())
        h = layer.finish(h, o.reshape(b, 1, arch.num_heads * d).to(engine.dtype))
    return engine.model.logits(h[:, 0])


def keep_mask(compact: CompactKVCache, capacity: int) -> torch.Tensor:
    nl, b, hkv = compact.lengths.shape
    keep = torch.zeros(nl, b, hkv, capacity, dtype=torch.bool)
    for li in range(nl):
        for s in range(b):
            for h in range(hkv):
                n = int(compact.lengths[li, s, h])
                keep[li, s, h, compact.positions[li, s, h, :n].long()] = True
    return keep


def test_decode_after_compression_equals_masked_full_attention(engine):
    torch.manual_seed(1)
    w, steps = 4, 6
    cfg = KVCompressionConfig(window=w, gap=-1, capacity=10, recompress_every=3)
    prompts = [torch.randint(0, ARCH.vocab_size, (n,)) for n in (37, 23)]
    cap = 37 + steps + 1
    obs = ObservationWindow(ARCH, 2, w, cfg.prompt_queries, CPU, torch.float32)
    full, _ = prefill(engine, prompts, cap, obs)
    ref = KVCache(ARCH, 2, cap, CPU, torch.float32)
    ref.data.copy_(full.data)
    compressor = DecodeCompressor(ARCH, cfg, 2, steps, CPU, torch.float32)
    assert compressor.due(0)
    compact = compressor.run(full, 0)
    assert full.nbytes == 0 and compact.capacity == 10 + 3
    assert compact.lengths.tolist() == [[[10, 10], [10, 10]]] * 2
    keep = keep_mask(compact, cap)
    positions = torch.tensor([37, 23])
    for step in range(steps):
        if compressor.due(step):
            assert compressor.run(compact, step) is compact  # in place, with the generated queries
            keep = keep_mask(compact, cap)
            assert (compact.lengths == 10).all()
        tokens = torch.randint(0, ARCH.vocab_size, (2,))
        got = engine.decode_step(tokens, positions, compact, compressor.obs)
        want = masked_decode_step(engine, tokens, positions, ref, keep)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        positions = positions + 1
    assert compressor.compressions == 2
    # the true positions of the appended tokens are recorded
    n = int(compact.lengths[0, 0, 0])
    assert compact.positions[0, 0, 0, n - 3 : n].tolist() == [40, 41, 42]


@pytest.mark.parametrize("mode", ["adaptive", "adaptive_layers"])
def test_adaptive_capacities_from_the_window_scores(engine, mode):
    """Capacities from the compression's own scores (AdaKV): the same total tokens as uniform, per layer
    (adaptive) or over the layers (adaptive_layers), each sequence's split the policy's `adaptive_capacities`
    of its scores, positions the plan at those capacities, and decode over the result equals attention over
    the full cache masked to the kept positions."""
    from entropyinfer.policies.kv_compression import adaptive_capacities, score_keys

    torch.manual_seed(5)
    w, steps, c = 4, 3, 10
    cfg = KVCompressionConfig(window=w, gap=2, capacity=c, head_capacity=mode, min_head_fraction=0.3)
    prompts = [torch.randint(0, ARCH.vocab_size, (n,)) for n in (41, 29)]
    cap = 41 + steps + 2
    compressor = DecodeCompressor(ARCH, cfg, 2, steps + 2, CPU, torch.float32)
    full, logits = prefill(engine, prompts, cap, compressor.obs)
    ref = KVCache(ARCH, 2, cap, CPU, torch.float32)
    positions = torch.tensor([41, 29])
    tokens = logits.argmax(-1)
    for _ in range(2):  # latent: N_D = 2 steps on the full cache first
        logits = engine.decode_step(tokens, positions, full, compressor.obs)
        tokens, positions = logits.argmax(-1), positions + 1
    ref.data.copy_(full.data)
    ref.lengths.copy_(full.lengths)
    hkv, g, d = ARCH.num_kv_heads, ARCH.group_size, ARCH.head_dim
    want_scores = torch.stack([
        score_keys(compressor.obs.ordered(li, 2).reshape(2 * hkv, g, w, d),
                   ref.k(li)[:, :, :43].reshape(2 * hkv, 43, d), ref.lengths.reshape(-1).long(), cfg)
        for li in range(ARCH.num_layers)
    ]).view(ARCH.num_layers, 2, hkv, 43)  # fmt: skip
    assert compressor.due(2)
    compact = compressor.run(full, 2)
    caps = compressor.capacities  # [L, B, Hkv]
    for b in range(2):
        lens = ref.lengths[b][None].expand(ARCH.num_layers, hkv)
        want = adaptive_capacities(want_scores[:, b], lens, cfg, across_layers=mode == "adaptive_layers")
        assert torch.equal(caps[:, b], want)
    if mode == "adaptive":
        assert (caps.sum(dim=2) == hkv * c).all()
    else:
        assert (caps.sum(dim=(0, 2)) == ARCH.num_layers * hkv * c).all()
    assert torch.equal(compact.lengths.long(), caps) and len(set(caps.flatten().tolist())) > 1
    assert compressor.stats(0)["kv_head_capacities"] == caps[:, 0].tolist()
    keep = keep_mask(compact, cap)
    for _ in range(steps):
        got = engine.decode_step(tokens, positions, compact, compressor.obs)
        want_logits = masked_decode_step(engine, tokens, positions, ref, keep)
        torch.testing.assert_close(got, want_logits, atol=1e-5, rtol=1e-4)
        tokens, positions = got.argmax(-1), positions + 1


def test_snapkv_and_latent_differ_only_in_when_they_compress(engine):
    torch.manual_seed(2)
    w, gap, n = 8, 4, 40
    latent = KVCompressionConfig(window=w, gap=gap, capacity=16)
    snap = KVCompressionConfig(window=w, gap=-1, capacity=16)
    prompt = torch.randint(0, ARCH.vocab_size, (n,))
    # latent: prefill, `gap` greedy steps on the full cache appending queries, then compress
    c_lat = DecodeCompressor(ARCH, latent, 1, 16, CPU, torch.float32)
    full, logits = prefill(engine, [prompt], n + 16, c_lat.obs)
    fed = []
    for step in range(gap):
        assert not c_lat.due(step)
        fed.append(int(logits[0].argmax()))
        logits = engine.decode_step(torch.tensor(fed[-1:]), torch.tensor([n + step]), full, c_lat.obs)
    assert c_lat.due(gap)
    lat = c_lat.run(full, gap)
    # snapkv: the same tokens as a prompt, compressed right after prefill with its last W prompt queries
    c_snap = DecodeCompressor(ARCH, snap, 1, 16, CPU, torch.float32)
    full2, _ = prefill(engine, [torch.cat([prompt, torch.tensor(fed)])], n + 16, c_snap.obs)
    assert c_snap.due(0)
    sk = c_snap.run(full2, 0)
    assert torch.equal(lat.lengths, sk.lengths) and (lat.lengths == 16).all()
    assert torch.equal(lat.positions[..., :16], sk.positions[..., :16])
    torch.testing.assert_close(lat.data[..., :16, :], sk.data[..., :16, :], atol=1e-4, rtol=1e-4)
    nxt = torch.tensor([int(logits[0].argmax())])
    a = engine.decode_step(nxt, torch.tensor([n + gap]), lat)
    b = engine.decode_step(nxt, torch.tensor([n + gap]), sk)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_capacity_above_the_length_keeps_the_cache_exactly(engine):
    torch.manual_seed(4)
    cfg = KVCompressionConfig(window=4, gap=-1, capacity=64)
    prompts = [torch.randint(0, ARCH.vocab_size, (n,)) for n in (30, 17)]
    compressor = DecodeCompressor(ARCH, cfg, 2, 8, CPU, torch.float32)
    full, _ = prefill(engine, prompts, 40, compressor.obs)
    dense = KVCache(ARCH, 2, 40, CPU, torch.float32)
    dense.data.copy_(full.data)
    dense.lengths.copy_(full.lengths)
    compact = compressor.run(full, 0)
    assert compact.capacity == 30 + 8
    for s, n in enumerate((30, 17)):
        assert (compact.lengths[:, s] == n).all()
        assert torch.equal(compact.data[:, :, s, :, :n], dense.data[:, :, s, :, :n])
    tokens, positions = torch.tensor([5, 6]), torch.tensor([30, 17])
    torch.testing.assert_close(
        engine.decode_step(tokens, positions, compact), engine.decode_step(tokens, positions, dense)
    )


def test_compression_releases_the_full_cache_memory(engine):
    cfg = KVCompressionConfig(window=4, gap=-1, capacity=8)
    compressor = DecodeCompressor(ARCH, cfg, 1, 4, CPU, torch.float32)
    full, _ = prefill(engine, [torch.arange(60) % ARCH.vocab_size], 256, compressor.obs)
    before = full.nbytes
    storage = full.data.untyped_storage()
    compact = compressor.run(full, 0)
    assert before == 2 * 2 * 2 * 256 * 16 * 4 and full.nbytes == 0
    assert full.data.untyped_storage().data_ptr() != storage.data_ptr()
    del storage
    assert compact.nbytes < before / 10
    stats = compressor.stats(0)
    assert stats["kv_bytes_before"] == 60 * 2 * 2 * 2 * 16 * 4 and stats["compression_ms"] > 0
    assert compact.bytes_used(0) == 8 * 2 * 2 * 2 * 16 * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")
def test_graphed_decode_over_a_compact_cache_equals_eager_steps():
    """The CUDA-graph step over a compact cache (made by compression, under inference mode) replays the eager
    step: same logits, same appended lengths."""
    dev = torch.device("cuda")
    model = random_model(ARCH, dev, torch.float32, seed=3)
    eng = Engine(model)
    cfg = KVCompressionConfig(window=4, gap=-1, capacity=12)
    steps = 5
    runs = []
    for graphed in (False, True):
        comp = DecodeCompressor(ARCH, cfg, 2, steps, dev, torch.float32)
        cache = eng.new_cache(2, 64)
        for i, n in enumerate((40, 27)):
            eng.prefill(
                torch.arange(n, device=dev) % ARCH.vocab_size, cache, i, DensePrefill(), observe=comp.obs
            )
        compact = comp.run(cache, 0)
        step = GraphedDecode(eng, compact) if graphed else (lambda t, p, c=compact: eng.decode_step(t, p, c))
        tokens, positions = torch.tensor([3, 4], device=dev), torch.tensor([40, 27], device=dev)
        out = []
        for _ in range(steps):
            logits = step(tokens, positions).clone()
            out.append(logits)
            tokens, positions = logits.argmax(-1), positions + 1
        runs.append((torch.stack(out), compact.lengths.clone()))
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=1e-4, rtol=1e-4)
    assert torch.equal(runs[1][1], runs[0][1])
