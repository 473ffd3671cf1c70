"""Tensor parallelism on CPU with gloo: spawned ranks give one rank's logits and greedy tokens.

Each test spawns `tp` processes (gloo on a free port, forked from a preloaded fork server); every rank
builds its part of the model (`CausalLM(arch, group=...)`, through `build_model` / `load_model`) and runs
the unchanged `Engine` on it, against one rank's results computed in the parent. Paths: `Engine.prefill`
into a contiguous `KVCache` then `Engine.decode_step`; `Engine.prefill_pages` (two chunks) into the rank's
own `KVPages` (sized from the rank's arch) then the engine core's paged decode step (`PagedDecoder`);
dummy weights (the tiny Llama) and safetensors slices (the tiny Llama with q/k/v/o bias, tied embeddings
and a vocabulary that leaves the last rank padding rows). TP=4 on the 4-query / 2-KV-head tiny Llama
replicates KV heads; TP=3 on SmolLM2 (9 / 3 heads, slow). The entropy policy at TP=2 gives, per rank, the
block counts of the same KV heads at TP=1; every rank gets bitwise the same logits.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from spawning import spawn

from entropyinfer.errors import ConfigError
from entropyinfer.policies.config import SparsePrefillConfig
from entropyinfer.policies.entropy import plan_layer
from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.attention import DensePrefill, PrefillAttention
from entropyinfer.shard.compression import ObservationPool
from entropyinfer.shard.config import ParallelConfig
from entropyinfer.shard.engine import Engine
from entropyinfer.shard.kv_pages import KVPages
from entropyinfer.shard.model import CausalLM
from entropyinfer.shard.paged_decode import PagedDecoder
from entropyinfer.shard.parallel.group import TensorParallelGroup, with_kv_replicas
from entropyinfer.shard.parallel.heads import HeadShard, head_shard, tensor_parallel_sizes
from entropyinfer.shard.sparse_attention import SparsePrefill
from entropyinfer.shard.weights import build_model, empty_model, load_model

CPU, F32 = torch.device("cpu"), torch.float32
ATOL, RTOL = 2e-4, 1e-4  # fp32: the ranks' partial sums add up in another order
STEPS = 6
SPARSE = SparsePrefillConfig(segment_size=32, block_size=8, base_budget=16, threshold_len=64, fixed_budget=16)


# ------------------------------------------------------------------------------------------ the engine
def greedy(engine: Engine, tokens: torch.Tensor, attention: PrefillAttention) -> tuple[list[int], list]:
    """Prefill into a contiguous cache, then STEPS greedy decode steps: (tokens, logits of every step)."""
    n = tokens.shape[0]
    cache = engine.new_cache(1, n + STEPS + 1)
    logits = [engine.prefill(tokens, cache, 0, attention, all_logits=True)]
    out = [int(logits[0][-1].argmax())]
    for i in range(STEPS):
        step = engine.decode_step(torch.tensor([out[-1]]), torch.tensor([n + i]), cache)
        logits.append(step[0])
        out.append(int(step[0].argmax()))
    return out, logits


def greedy_paged(engine: Engine, tokens: torch.Tensor, split: int) -> tuple[list[int], list]:
    """Two prefill chunks ([0, split), [split, n)) into paged KV, then STEPS steps of the engine core's
    paged decode (`PagedDecoder`)."""
    n, arch = tokens.shape[0], engine.arch
    pages = KVPages(arch, 64, 8, CPU, F32)  # the rank's own pages, for its KV heads
    seq = SimpleNamespace(block_table=[], table_cache=None, kv_lengths=None, cached_names=[])
    pages.allocate(seq, n + STEPS + 1)
    table = pages.device_table(seq).long()
    attention = DensePrefill()
    assert engine.prefill_pages(tokens[:split], 0, n, pages, table, attention) is None
    first = engine.prefill_pages(tokens[split:], split, n, pages, table, attention)
    assert first is not None
    logits, out = [first], [int(first.argmax())]
    tables, decode = pages.batch_tables([seq]), PagedDecoder(engine, pages, ObservationPool(arch, CPU, F32))
    for i in range(STEPS):
        lengths = torch.full((arch.num_layers, 1, arch.num_kv_heads), n + i, dtype=torch.int32)
        step = decode(torch.tensor([out[-1]]), torch.tensor([n + i]), tables, lengths)
        logits.append(step[0])
        out.append(int(step[0].argmax()))
    return out, logits


def assert_same(mine: tuple[list[int], list], ref: tuple[list[int], list], what: str) -> None:
    assert mine[0] == ref[0], f"{what}: greedy tokens {mine[0]} != one rank's {ref[0]}"
    for a, b in zip(mine[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def prompt(n: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- tiny Llama
def run_tiny(engine: Engine, group: TensorParallelGroup | None = None) -> dict[str, Any]:
    """Every path on one model (the one-rank reference in the parent, a rank's part in a rank); the entropy
    policy's replicas of a KV head (`group` with replicas) decide from the GQA group's block logits."""
    vocab, layers = engine.arch.vocab_size, engine.arch.num_layers
    tokens = prompt(40, vocab)
    out: dict[str, Any] = {
        "contiguous": greedy(engine, tokens, DensePrefill()),
        "paged": greedy_paged(engine, tokens, 24),
    }
    attention = SparsePrefill("entropy", SPARSE)
    if group is not None and group.replicas > 1:
        attention.logit_reduce = group.mean_over_replicas
    attention.begin(layers, 192)
    out["entropy"] = greedy(engine, prompt(192, vocab, seed=2), attention)
    out["counts"] = attention.sparse_counts
    return out


def replicas_pick_one_ranks_blocks(group: TensorParallelGroup, full: ModelArch, shard: HeadShard) -> None:
    """Random post-RoPE q / k of every head (the same on every rank): a rank's query heads with the mean
    over its KV head's replicas choose one rank's blocks, counts and entropy for that KV head (one-shot
    modes per_head and spread, and query ranking with the max over the replicas); without it they would not
    (the partial group's logits)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(full.num_heads, 192, 16, generator=gen)
    k = torch.randn(full.num_kv_heads, 192, 16, generator=gen)
    mq, kv = q[shard.q_start : shard.q_start + shard.q_count], slice(shard.kv_start, shard.kv_start + 1)
    alone_differs = False
    # (mode, ranking): query ranking's scores are a max over the group's heads, made whole by a max
    for mode, ranking in (("per_head", "box"), ("spread", "box"), ("per_head", "queries")):
        cfg = dataclasses.replace(SPARSE, mode=mode, min_budget=8, rigid_budget=16, ranking=ranking)
        one = plan_layer(q, k, cfg)
        mine = plan_layer(
            mq, k[kv], cfg, logit_reduce=group.mean_over_replicas, rank_reduce=group.max_over_replicas
        )
        assert torch.equal(mine.block_idx, one.block_idx[kv]), f"{mode}: blocks differ from one rank's"
        assert torch.equal(mine.counts, one.counts[kv]), f"{mode}: counts differ from one rank's"
        torch.testing.assert_close(mine.entropy, one.entropy[kv], atol=1e-6, rtol=1e-6)
        alone = plan_layer(mq, k[kv], cfg)
        alone_differs |= not torch.equal(alone.block_idx, one.block_idx[kv])
    assert alone_differs, "the partial GQA group chose the group's blocks anyway: the check tests nothing"


def tiny_ranks(group: TensorParallelGroup, dummy: str, ckpt: str, ref: dict[str, Any]) -> None:
    """This rank's part of the tiny Llama (dummy weights and safetensors slices) against one rank's."""
    tp, r = group.size, group.rank
    full = ModelArch.from_folder(dummy)
    group = with_kv_replicas(group, full.num_kv_heads)
    mine = Engine(build_model(dummy, CPU, F32, "dummy", group=group))
    want = head_shard(full.num_heads, full.num_kv_heads, tp, r)
    assert (mine.arch.num_heads, mine.arch.num_kv_heads) == (want.q_count, want.kv_count)
    assert mine.arch.tensor_parallel_size == tp and group.replicas == want.kv_replicas
    got = run_tiny(mine, group)
    every = group.all_gather(torch.stack(got["contiguous"][1][1:]), dim=0).view(tp, STEPS, -1)
    assert all(torch.equal(every[0], e) for e in every), "ranks disagree on the logits"  # any may sample
    for path in ("contiguous", "paged", "entropy"):
        assert_same(got[path], ref["dummy"][path], path)
    # the entropy policy on local heads: the counts of this rank's KV heads (per layer, KV head, segment),
    # those of one rank also where TP=4 replicates the 2 KV heads
    assert ref["dummy"]["counts"] and len(got["counts"]) == len(ref["dummy"]["counts"])
    for (rc, rd), (mc, md) in zip(ref["dummy"]["counts"], got["counts"], strict=True):
        assert torch.equal(md, rd)
        assert torch.equal(mc, rc[want.kv_start : want.kv_start + want.kv_count])
    if group.replicas > 1:
        replicas_pick_one_ranks_blocks(group, full, want)
    from_ckpt = Engine(load_model(ckpt, CPU, F32, group))  # reads only this rank's slices
    vocab = from_ckpt.arch.vocab_size
    assert_same(greedy(from_ckpt, prompt(40, vocab), DensePrefill()), ref["safetensors"], "safetensors")


# Safetensors weights of another shape than the tiny Llama's: q/k/v/o bias (openPangu-Embedded), tied
# embeddings, and a vocabulary that no TP size here divides (the last rank's rows are padding).
BIASED = {"model_type": "PanguEmbedded", "vocab_size": 301, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def tiny_safetensors(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama made BIASED, random weights (every bias and norm too), saved as safetensors."""
    folder = tmp_path_factory.mktemp("tiny_st")
    config = {**json.loads((tiny_checkpoint / "config.json").read_text()), **BIASED}
    (folder / "config.json").write_text(json.dumps(config))
    model = empty_model(ModelArch.from_folder(folder), CPU, F32)
    gen = torch.Generator().manual_seed(7)
    state = {
        k: torch.randn(v.shape, generator=gen) * 0.05 + k.endswith("norm.weight")
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"  # tied
    }
    save_file(state, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def tiny_reference(tiny_checkpoint: Path, tiny_safetensors: Path) -> dict[str, Any]:
    """One rank's results on the tiny Llama: dummy weights (every path) and the safetensors weights."""
    one = Engine(load_model(tiny_safetensors, CPU, F32))
    return {
        "dummy": run_tiny(Engine(build_model(tiny_checkpoint, CPU, F32, "dummy"))),
        "safetensors": greedy(one, prompt(40, one.arch.vocab_size), DensePrefill()),
    }


@pytest.mark.parametrize("tp", [2, 4])  # 4 > 2 KV heads: each KV head on two ranks
def test_tiny_llama_tp_equals_one_rank(
    tp: int, tiny_checkpoint: Path, tiny_safetensors: Path, tiny_reference: dict[str, Any]
) -> None:
    spawn(tp, tiny_ranks, str(tiny_checkpoint), str(tiny_safetensors), tiny_reference)


# --------------------------------------------------------------------------------------------- SmolLM2
def smollm2_ranks(group: TensorParallelGroup, folder: str, tokens: torch.Tensor, ref: tuple) -> None:
    engine = Engine(load_model(folder, CPU, F32, group))
    assert (engine.arch.num_heads, engine.arch.num_kv_heads) == (3, 1)
    assert_same(greedy(engine, tokens, DensePrefill()), ref, "smollm2 contiguous")
    assert_same(greedy_paged(engine, tokens, tokens.shape[0] // 2), ref_paged_last(ref), "smollm2 paged")


def ref_paged_last(ref: tuple[list[int], list]) -> tuple[list[int], list]:
    """The contiguous reference in the paged path's form (last prompt position's logits first)."""
    return ref[0], [ref[1][0][-1], *ref[1][1:]]


@pytest.mark.slow
def test_smollm2_tp3_equals_one_rank(smollm2: Any) -> None:
    engine = Engine(smollm2.model)
    tokens = torch.tensor(smollm2.tokenizer.encode("The capital of France is"))
    ref = greedy(engine, tokens, DensePrefill())
    spawn(3, smollm2_ranks, str(smollm2.checkpoint), tokens, ref)


# ------------------------------------------------------------------------------------------ no spawn
SMOL_HEADS = dict(
    model_type="llama", vocab_size=97, hidden_size=72, intermediate_size=144, num_hidden_layers=1,
    num_attention_heads=9, num_key_value_heads=3,
)  # fmt: skip


def test_head_counts_that_do_not_split_name_the_sizes_that_work() -> None:
    assert tensor_parallel_sizes(9, 3) == [1, 3, 9]
    assert tensor_parallel_sizes(4, 2) == [1, 2, 4]
    arch = ModelArch.from_hf_config(SMOL_HEADS)  # SmolLM2's 9 query / 3 KV heads
    with pytest.raises(
        ConfigError, match=r"tensor_parallel_size=2 .* 9 query / 3 KV .*sizes that work: 1, 3, 9"
    ):
        arch.local(2)
    local = arch.local(9)  # 1 query head per rank, 3 ranks share each KV head
    assert (local.num_heads, local.num_kv_heads, local.group_size) == (1, 1, 1)
    assert head_shard(9, 3, 9, 5) == HeadShard(q_start=5, q_count=1, kv_start=1, kv_count=1, kv_replicas=3)
    assert head_shard(4, 2, 2, 1) == HeadShard(q_start=2, q_count=2, kv_start=1, kv_count=1, kv_replicas=1)
    uneven_mlp = ModelArch.from_hf_config({**SMOL_HEADS, "intermediate_size": 100})
    with pytest.raises(ConfigError, match="does not divide intermediate_size=100"):
        CausalLM(uneven_mlp, device=torch.device("meta"), group=TensorParallelGroup(0, 3))


def test_parallel_config_takes_tensor_parallel_sizes() -> None:
    assert ParallelConfig(tensor_parallel_size=4).world_size == 4
    assert ParallelConfig(tensor_parallel_size=2, sequence_parallel_size=2).world_size == 4
    with pytest.raises(ConfigError, match="sequence_parallel_size"):
        ParallelConfig(sequence_parallel_size=0)
