"""The engine core's paged decode step (`shard/paged_decode.py`) on a tiny random Llama (CPU, fp32).

`PagedDecoder` eager and padded (the CUDA-graph path's input handling, run eagerly with ``pad_on_cpu``)
equals the contiguous `Engine.decode_step` over a `CompactKVCache` with the same tokens (logits and the keys
written) on ragged batches and on compressed sequences whose (layer, KV head) lengths all differ; with
observation windows, and across batches of different sizes in one padded bucket (rows of an earlier, larger
batch become padding), padded equals eager, and padding writes only `KVPages.scratch_page` and the
observation pool's scratch row. On CUDA, the graphed step equals the eager one.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.compression import ObservationPool
from entropyinfer.shard.config import EngineConfig
from entropyinfer.shard.engine import Engine
from entropyinfer.shard.kv_cache import CompactKVCache
from entropyinfer.shard.kv_pages import KVPages
from entropyinfer.shard.paged_decode import PagedDecoder, graph_batch_sizes, table_width
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
PS, NUM_PAGES = 8, 80
TOL = dict(atol=1e-5, rtol=1e-5)


def make(device: str = "cpu", max_num_seqs: int = 8) -> tuple[Engine, KVPages, ObservationPool]:
    dev = torch.device(device)
    model = random_model(ARCH, dev, torch.float32, seed=5)
    engine = Engine(model, EngineConfig(max_num_seqs=max_num_seqs, kv_page_size=PS, cuda_graph_min_tokens=2))
    pages = KVPages(ARCH, NUM_PAGES, PS, dev, torch.float32)
    pages.data.normal_()  # noise everywhere: a stray write shows
    obs = ObservationPool(ARCH, dev, torch.float32)
    for _ in range(4):
        obs.acquire(6)
    obs.q.normal_()
    return engine, pages, obs


def sequences(pages: KVPages, lengths: list[list[list[int]]], seed: int = 0) -> list[SimpleNamespace]:
    """Sequences with the given per-(layer, head) lengths ([B][L][Hkv]) and, per head, pages for one more
    token, from a shuffled pool (ragged, non-contiguous; tables built here, not by `KVPages`)."""
    free = torch.randperm(pages.num_pages, generator=torch.Generator().manual_seed(seed)).tolist()
    seqs = []
    for lens in lengths:
        longest = torch.tensor(lens).max(dim=0).values.tolist()
        table = [[free.pop() for _ in range(pages.pages(n + 1))] for n in longest]
        seqs.append(SimpleNamespace(block_table=table, kv_lengths=torch.tensor(lens, dtype=torch.int32)))
    return seqs


def tables_of(seqs: list[SimpleNamespace], device: torch.device) -> torch.Tensor:
    """int32 [B, Hkv, max pages], each head's row padded with its last page (as `KVPages.batch_tables`)."""
    width = max(len(t) for s in seqs for t in s.block_table)
    rows = [[t + [t[-1]] * (width - len(t)) for t in s.block_table] for s in seqs]
    return torch.tensor(rows, dtype=torch.int32, device=device)


def gather(pages: KVPages, seq: SimpleNamespace, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[Hkv, max pages * page_size, d] keys and values of one layer of `seq`, contiguous."""
    table = tables_of([seq], pages.device)[0].long()
    heads = torch.arange(ARCH.num_kv_heads)[:, None]
    shape = (ARCH.num_kv_heads, -1, ARCH.head_dim)
    return pages.k(layer)[table, heads].reshape(shape), pages.v(layer)[table, heads].reshape(shape)


def batch(pages: KVPages, seqs: list[SimpleNamespace], obs: bool, seed: int = 0):
    dev = pages.device
    gen = torch.Generator().manual_seed(seed)
    b = len(seqs)
    tokens = torch.randint(0, ARCH.vocab_size, (b,), generator=gen).to(dev)
    positions = torch.tensor([int(s.kv_lengths.max()) + 3 for s in seqs], device=dev)
    tables = tables_of(seqs, dev)
    lengths = torch.stack([s.kv_lengths for s in seqs], dim=1).to(dev)
    index = None
    if obs:
        rows = torch.tensor(
            [1 + i % 4 if i % 3 else ObservationPool.scratch_row for i in range(b)], device=dev
        )
        index = (rows, torch.arange(b, device=dev) % 6)
    return tokens, positions, tables, lengths, index


def reference(engine: Engine, pages: KVPages, pool: ObservationPool, args) -> tuple[torch.Tensor, ...]:
    """The eager step at the batch's own shapes, on copies: (logits, pages data, pool q)."""
    data, q = pages.data.clone(), pool.q.clone()
    logits = PagedDecoder(engine, pages, pool).forward(*args)
    out = (logits, pages.data.clone(), pool.q.clone())
    pages.data.copy_(data)
    pool.q.copy_(q)
    return out


def contiguous(engine: Engine, pages: KVPages, seqs: list[SimpleNamespace], args) -> tuple[torch.Tensor, ...]:
    """The same step through `Engine.decode_step` over a `CompactKVCache` holding each (layer, sequence,
    head)'s tokens: (logits, the new keys [L, B, Hkv, d] it wrote)."""
    tokens, positions, _, lengths, _ = args
    cache = CompactKVCache(ARCH, len(seqs), 128, pages.device, torch.float32)
    cache.lengths.copy_(lengths)
    for b, s in enumerate(seqs):
        for li in range(ARCH.num_layers):
            k, v = gather(pages, s, li)
            n = k.shape[1]
            cache.k(li)[b, :, :n], cache.v(li)[b, :, :n] = k, v
    logits = engine.decode_step(tokens, positions, cache)
    new = torch.stack(
        [
            cache.k(li).gather(2, lengths[li].long()[..., None, None].expand(-1, -1, 1, ARCH.head_dim))[
                :, :, 0
            ]
            for li in range(ARCH.num_layers)
        ]
    )
    return logits, new


def written_keys(pages: KVPages, seqs: list[SimpleNamespace], lengths: torch.Tensor) -> torch.Tensor:
    """[L, B, Hkv, d]: the key each (layer, sequence, head) holds at index ``lengths``."""
    out = torch.empty(ARCH.num_layers, len(seqs), ARCH.num_kv_heads, ARCH.head_dim)
    for b, s in enumerate(seqs):
        for li in range(ARCH.num_layers):
            for h, table in enumerate(s.block_table):
                n = int(lengths[li, b, h])
                out[li, b, h] = pages.k(li)[table[n // PS], h, n % PS]
    return out


RAGGED = [[[5, 5], [5, 5]], [[19, 19], [19, 19]], [[40, 40], [40, 40]]]  # uncompressed, ragged batch
COMPRESSED = [
    [[3, 11], [7, 2]],
    [[17, 0], [9, 30]],
    [[1, 1], [25, 6]],
    [[12, 12], [12, 12]],
    [[0, 4], [8, 8]],
]


@pytest.mark.parametrize("obs", [False, True])
@pytest.mark.parametrize("lengths", [RAGGED, COMPRESSED], ids=["ragged", "compressed"])
@pytest.mark.parametrize("padded", [False, True])
def test_decoder_equals_the_contiguous_step(lengths, padded: bool, obs: bool) -> None:
    engine, pages, pool = make()
    seqs = sequences(pages, lengths)
    args = batch(pages, seqs, obs)
    contiguous_logits, new_keys = contiguous(engine, pages, seqs, args)
    want_logits, want_data, want_q = reference(engine, pages, pool, args)
    torch.testing.assert_close(want_logits, contiguous_logits, **TOL)
    decoder = PagedDecoder(engine, pages, pool, pad_on_cpu=padded)
    logits = decoder(*args)
    torch.testing.assert_close(logits, want_logits, **TOL)
    torch.testing.assert_close(written_keys(pages, seqs, args[3]), new_keys, **TOL)
    real = slice(0, pages.scratch_page)  # padding may write the scratch page, nothing else differs
    torch.testing.assert_close(pages.data[:, :, real], want_data[:, :, real], **TOL)
    torch.testing.assert_close(pool.q[:, 1:], want_q[:, 1:], **TOL)


def test_padding_never_writes_a_real_page_or_observation_row() -> None:
    """Batches of 7, 5, 6 rows in the bucket of 8 and of 3, 4 in the bucket of 4, with and without windows:
    the rows that become padding held real tables and observation rows (stale rows of a larger batch); every
    real page and row still equals the unpadded reference."""
    engine, pages, pool = make()
    rng = torch.Generator().manual_seed(1)
    lens = [torch.randint(0, 30, (2, 2), generator=rng).tolist() for _ in range(7)]
    seqs = sequences(pages, lens)
    decoder = PagedDecoder(engine, pages, pool, pad_on_cpu=True)
    for b, obs in ((7, True), (5, False), (6, True), (3, True), (4, False), (2, True)):
        args = batch(pages, seqs[:b], obs=obs, seed=b)
        want_logits, want_data, want_q = reference(engine, pages, pool, args)
        pages.data[:, :, pages.scratch_page] = 7.0  # a sentinel: a padded row's K/V may be all zeros
        scratch = pages.data[:, :, pages.scratch_page].clone()
        logits = decoder(*args)
        torch.testing.assert_close(logits, want_logits, **TOL)
        torch.testing.assert_close(
            pages.data[:, :, : pages.scratch_page], want_data[:, :, : pages.scratch_page]
        )
        torch.testing.assert_close(pool.q[:, 1:], want_q[:, 1:])
        if b in (7, 3):  # padded rows ran (7 -> 8, 3 -> 4) and wrote the scratch page only
            assert not torch.equal(pages.data[:, :, pages.scratch_page], scratch)
    assert sorted(decoder._steps) == [(2, table_width(1)), (4, table_width(1)), (8, table_width(1))]


def test_buckets() -> None:
    assert graph_batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(1) == [1]
    assert [table_width(p) for p in (1, 16, 17, 300, 8192)] == [16, 16, 32, 512, 8192]


def test_a_batch_larger_than_max_num_seqs_runs_eagerly() -> None:
    engine, pages, pool = make(max_num_seqs=2)
    seqs = sequences(pages, RAGGED)
    args = batch(pages, seqs, obs=False)
    want = reference(engine, pages, pool, args)[0]
    decoder = PagedDecoder(engine, pages, pool, pad_on_cpu=True)
    torch.testing.assert_close(decoder(*args), want, **TOL)
    assert not decoder._steps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")
def test_graphed_steps_equal_eager_steps_and_recapture_when_the_pool_grows() -> None:
    engine, pages, pool = make("cuda")
    seqs = sequences(pages, COMPRESSED)
    decoder = PagedDecoder(engine, pages, pool)
    for b, obs in ((5, True), (4, False), (5, True)):
        args = batch(pages, seqs[:b], obs, seed=b)
        want_logits, want_data, want_q = reference(engine, pages, pool, args)
        logits = decoder(*args, steps_left=10)
        torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
        real = slice(0, pages.scratch_page)
        torch.testing.assert_close(pages.data[:, :, real], want_data[:, :, real], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pool.q[:, 1:], want_q[:, 1:], atol=1e-4, rtol=1e-4)
    assert decoder.captures == 2  # buckets 8 and 4, the second 5-batch replays
    for _ in range(4):
        pool.acquire(6)  # the pool's tensor is reallocated: the graph is captured again
    args = batch(pages, seqs, obs=True, seed=9)
    want_logits = reference(engine, pages, pool, args)[0]
    torch.testing.assert_close(decoder(*args, steps_left=10), want_logits, atol=1e-4, rtol=1e-4)
    assert decoder.captures == 3
    short = PagedDecoder(engine, pages, pool)
    short(*batch(pages, seqs[:2], obs=False), steps_left=1)  # too few steps left to pay for a capture
    assert short.captures == 0
