"""Sequence-parallel prefill and decode on CPU with gloo (spawned ranks), against one rank in the parent.

A tiny random Llama with 6 query / 3 KV heads (SmolLM2's 2:1 GQA and its uneven split at SP=2: 2 + 1 KV
heads) and 4096 positions. Each SP rank runs `sequence_parallel_prefill` on its segment of a 2000-token
prompt (padded: 2000 is not a multiple of 3 at SP=3), then `SequenceParallelDecoder` steps of a batch with
that sequence and a short one that prefilled without SP (held whole by every rank). The logits of every
step equal one rank's (`Engine.prefill_pages` + `PagedDecoder`) within fp32 tolerance, greedy tokens are
identical, every SP rank has the same logits, and under the entropy policy each rank's KV heads have one
rank's block counts (>= 99% equal) and the density is within 0.01.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from spawning import spawn

from entropyinfer.errors import ConfigError
from entropyinfer.kernels.backend import interpreter_ready
from entropyinfer.kernels.paged_decode_attention import paged_decode_attention
from entropyinfer.policies.config import SparsePrefillConfig
from entropyinfer.shard.attention import DensePrefill, PrefillAttention
from entropyinfer.shard.compression import ObservationPool
from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint
from entropyinfer.shard.engine import Engine
from entropyinfer.shard.kv_pages import KVPages
from entropyinfer.shard.paged_decode import PagedDecoder
from entropyinfer.shard.parallel.all_to_all import (
    SequenceParallelGroup,
    check_sequence_parallel,
    split_heads,
)
from entropyinfer.shard.parallel.sequence import sequence_parallel_prefill
from entropyinfer.shard.parallel.sp_compress import Spans
from entropyinfer.shard.parallel.sp_decode import SequenceParallelDecoder, paged_attention_lse
from entropyinfer.shard.sparse_attention import SparsePrefill
from entropyinfer.shard.weights import build_model

CPU, F32 = torch.device("cpu"), torch.float32
ATOL, RTOL = 2e-4, 1e-4
STEPS, LONG, SHORT, PAGE = 5, 2000, 37, 16
SPARSE = SparsePrefillConfig(segment_size=64, block_size=8, base_budget=16, threshold_len=64, fixed_budget=16)
UNEVEN = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=320, hidden_size=96,
    intermediate_size=128, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
    max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
)  # fmt: skip


def prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, UNEVEN["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed))


def new_seq(pages: KVPages, tokens: int) -> SimpleNamespace:
    seq = SimpleNamespace(block_table=[], table_cache=None, kv_lengths=None, cached_names=[])
    pages.allocate(seq, tokens)
    return seq


def attention_for(policy: str, n: int) -> PrefillAttention:
    if policy == "dense":
        return DensePrefill()
    attention = SparsePrefill("entropy", SPARSE)
    attention.begin(UNEVEN["num_hidden_layers"], n)
    return attention


def run(engine: Engine, policy: str, sp: SequenceParallelGroup | None) -> dict[str, Any]:
    """Prefill the long prompt (SP when `sp`) and the short one (never SP), then STEPS greedy steps of both
    in one batch. -> logits of every step per row, tokens, the long prompt's attention object."""
    arch = engine.arch
    pages = KVPages(arch, 2 * (LONG + SHORT) // PAGE + 8, PAGE, CPU, F32)
    long_seq, short_seq = new_seq(pages, LONG + STEPS + 1), new_seq(pages, SHORT + STEPS + 1)
    long_tokens, short_tokens = prompt(LONG, 1), prompt(SHORT, 2)
    attention = attention_for(policy, LONG)
    table = pages.device_table(long_seq).long()
    if sp is None:
        first_long = engine.prefill_pages(long_tokens, 0, LONG, pages, table, attention)
    else:
        split = split_heads(arch.num_heads, arch.num_kv_heads, sp.size)
        first_long = sequence_parallel_prefill(engine, sp, split, long_tokens, pages, table, attention)
    short_table = pages.device_table(short_seq).long()
    first_short = engine.prefill_pages(short_tokens, 0, SHORT, pages, short_table, DensePrefill())
    assert first_long is not None and first_short is not None
    obs = ObservationPool(arch, CPU, F32)
    decoder: Any = PagedDecoder(engine, pages, obs)
    extra: tuple[torch.Tensor, ...] = ()
    if sp is not None:  # row 0 holds its segment here (the last rank also the decode tokens), row 1 all
        decoder = SequenceParallelDecoder(engine, pages, obs, sp).forward
        spans = Spans.segments(LONG, sp.size, arch.num_layers, arch.num_kv_heads)
        start, count = torch.zeros(2, arch.num_layers, 2, arch.num_kv_heads, dtype=torch.long)
        start[:, 0], count[:, 0] = spans.starts[sp.rank], spans.counts[sp.rank]
        extra = (torch.tensor([True, False]), start, count)
    logits = [torch.stack([first_long, first_short])]
    tables = pages.batch_tables([long_seq, short_seq])
    for i in range(STEPS):
        tokens = logits[-1].argmax(-1)
        positions = torch.tensor([LONG + i, SHORT + i])
        lengths = positions.to(torch.int32)[None, :, None].expand(arch.num_layers, 2, arch.num_kv_heads)
        logits.append(decoder(tokens, positions, tables, lengths.contiguous(), None, *extra).clone())
    return {"logits": logits, "tokens": [lg.argmax(-1).tolist() for lg in logits], "attention": attention}


def sp_ranks(sp: SequenceParallelGroup, folder: str, ref: dict[str, dict[str, Any]]) -> None:
    engine = Engine(build_model(folder, CPU, F32, "dummy"))
    arch = engine.arch
    split = split_heads(arch.num_heads, arch.num_kv_heads, sp.size)
    k0, kn = split.kv_start(sp.rank), split.kv[sp.rank]
    for policy, want in ref.items():
        got = run(engine, policy, sp)
        assert got["tokens"] == want["tokens"], f"{policy}: greedy tokens differ from one rank's"
        for a, b in zip(got["logits"], want["logits"], strict=True):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
        every = sp.all_gather(torch.stack(got["logits"]))
        assert all(torch.equal(every[0], e) for e in every), f"{policy}: SP ranks disagree on the logits"
        if policy != "entropy":
            continue
        mine, one = got["attention"], want["attention"]
        assert len(mine.sparse_counts) == len(one.sparse_counts) > 0
        same = total = 0
        for (mc, md), (rc, rd) in zip(mine.sparse_counts, one.sparse_counts, strict=True):
            assert torch.equal(md, rd)
            same += int((mc == rc[k0 : k0 + kn]).sum())
            total += mc.numel()
        assert same >= 0.99 * total, f"rank {sp.rank}: {same} of {total} block counts equal one rank's"


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dummy_checkpoint(tmp_path_factory.mktemp("uneven"), UNEVEN)


@pytest.fixture(scope="module")
def reference(uneven: Path) -> dict[str, dict[str, Any]]:
    engine = Engine(build_model(uneven, CPU, F32, "dummy"))
    return {policy: run(engine, policy, None) for policy in ("dense", "entropy")}


@pytest.mark.parametrize("sp", [2, 3])  # 3 KV heads: 2 + 1 at SP=2, one each at SP=3 (2000 % 3 != 0)
def test_sequence_parallel_prefill_and_decode_equal_one_rank(
    sp: int, uneven: Path, reference: dict[str, dict[str, Any]]
) -> None:
    spawn(sp, sp_ranks, str(uneven), reference, group=SequenceParallelGroup)


def test_paged_attention_lse_merges_to_the_whole() -> None:
    """Partials over two halves of each row's keys, merged by their LSE, equal attention over all of them."""
    gen = torch.Generator().manual_seed(3)
    b, hkv, g, d, ps, pages = 2, 2, 3, 16, 8, 12
    k_pages, v_pages = (torch.randn(pages, hkv, ps, d, generator=gen) for _ in range(2))
    q = torch.randn(b, hkv * g, d, generator=gen)
    tables = torch.stack([torch.randperm(pages, generator=gen)[:6] for _ in range(b)])[:, None].expand(
        b, hkv, 6
    )
    full = torch.tensor([[45, 45], [30, 30]], dtype=torch.int32)
    whole, lse = paged_attention_lse(q, k_pages, v_pages, tables.contiguous(), full)
    scores = []
    for i in range(b):  # the reference: every key of the row
        ids = tables[i, 0, :6].long()
        k = k_pages[ids].transpose(0, 1).reshape(hkv, -1, d)[:, : full[i, 0]]
        v = v_pages[ids].transpose(0, 1).reshape(hkv, -1, d)[:, : full[i, 0]]
        s = torch.einsum("hgd,hld->hgl", q[i].view(hkv, g, d), k) * d**-0.5
        scores.append(torch.logsumexp(s, -1).reshape(-1))
        ref = torch.einsum("hgl,hld->hgd", s.softmax(-1), v).reshape(hkv * g, d)
        torch.testing.assert_close(whole[i], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.stack(scores), atol=1e-5, rtol=1e-5)
    empty_out, empty_lse = paged_attention_lse(
        q, k_pages, v_pages, tables.contiguous(), torch.zeros_like(full)
    )
    assert torch.equal(empty_out, torch.zeros_like(q)) and bool(torch.isinf(empty_lse).all())


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_triton_paged_kernel_returns_the_lse_of_the_torch_path(device: str) -> None:
    """`paged_decode_attention(..., lse_out=)` (the Triton kernel: on CPU tensors in the interpreter, fp32)
    gives the torch path's output and log-sum-exp, also for a row without keys and unequal head lengths."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if device == "cpu" and not interpreter_ready() and torch.cuda.is_available():
        pytest.skip("triton compiles for the GPU in this process")
    gen = torch.Generator().manual_seed(5)
    b, hkv, g, d, ps, pages = 3, 2, 2, 16, 8, 10
    k_pages, v_pages = (torch.randn(pages, hkv, ps, d, generator=gen) for _ in range(2))
    q = torch.randn(b, hkv * g, d, generator=gen)
    tables = torch.stack([torch.randperm(pages, generator=gen)[:5] for _ in range(b * hkv)]).view(b, hkv, 5)
    lengths = torch.tensor([[37, 37], [0, 0], [20, 9]], dtype=torch.int32)
    tables, want = tables.to(torch.int32), paged_attention_lse(q, k_pages, v_pages, tables, lengths)
    q, k_pages, v_pages, tables, lengths = (x.to(device) for x in (q, k_pages, v_pages, tables, lengths))
    lse = torch.empty(b, hkv * g, device=device)
    out = paged_decode_attention(q, k_pages, v_pages, tables, lengths, backend="triton", lse_out=lse)
    torch.testing.assert_close(out.cpu(), want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.cpu(), want[1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="lse_out"):
        paged_decode_attention(q, k_pages, v_pages, tables, lengths, backend="torch", lse_out=lse)


def test_sizes_that_do_not_split_the_kv_heads_name_the_sizes_that_work() -> None:
    check_sequence_parallel(3, 1, 3)
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=4 .* sizes that work are 1\.\.3"):
        check_sequence_parallel(3, 1, 4)
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=3:.* 1\.\.1"):
        check_sequence_parallel(3, 3, 2)
    assert split_heads(9, 3, 2).kv == (2, 1) and split_heads(9, 3, 2).q == (6, 3)
