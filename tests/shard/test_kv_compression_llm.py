"""Decode-time KV compression through the `LLM` API on the real SmolLM2 model (CPU, fp32)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from entropyinfer import LLM, ConfigError, SamplingParams
from entropyinfer.evaluation.corpus import real_document
from entropyinfer.shard.head_report import StatsSinks

SHORT = [{"role": "user", "content": "Summarize in one sentence:\n\n" + real_document()[:1200]}]
OTHER = "The three primary colors are"


def test_capacity_above_the_prompt_keeps_everything_and_equals_dense(smollm2):
    params = SamplingParams(max_tokens=24)
    dense = smollm2.generate(SHORT, params, policy="dense")[0]
    assert dense.stats["kv_compression"] == "none"
    n = dense.stats["prompt_tokens"]
    assert n + 24 < 1024
    for policy in ("snapkv", "entropy"):  # default capacity 1024 > prompt: nothing dropped
        out = smollm2.generate(SHORT, params, policy=policy)[0]
        assert out.token_ids == dense.token_ids, policy
        assert out.stats["kv_compression"] == {"snapkv": "snapkv", "entropy": "latent"}[policy]
        assert out.stats["kv_compressions"] == 1
        assert out.stats["kv_tokens_kept"] == dense.stats["kv_tokens_kept"] == n + 23
        assert out.stats["kv_bytes"] == dense.stats["kv_bytes"]


def test_small_capacity_compresses_and_reports_stats(smollm2):
    llm = copy.copy(smollm2)  # shares the loaded model
    llm.set_kv_compression("latent", capacity=64)
    out = llm.generate(SHORT, SamplingParams(max_tokens=30))[0]
    st = out.stats
    n, layers = st["prompt_tokens"], llm.arch.num_layers
    # latent: 16 decode steps on the full cache, then 64 kept per head; 29 steps in all write 13 more
    assert st["kv_compression"] == "latent" and st["kv_capacity"] == 64 and st["kv_compressions"] == 1
    assert st["kv_tokens_kept_per_layer"] == [64 + 13] * layers
    assert st["kv_tokens_kept"] == 64 + 13
    assert st["kv_tokens_kept_total"] == (64 + 13) * layers * llm.arch.num_kv_heads
    per_token = llm.arch.kv_bytes_per_token(4)
    assert st["kv_bytes"] == (64 + 13) * per_token
    assert st["kv_bytes_before"] == (n + 16) * per_token
    assert st["compression_ms"] > 0 and out.text.strip()
    llm.set_kv_compression("none")
    st = llm.generate(OTHER, SamplingParams(max_tokens=4), policy="entropy")[0].stats
    assert st["kv_compression"] == "none" and st["kv_bytes"] == st["kv_bytes_before"]


def test_batch_with_compression_equals_one_by_one_and_recompression(smollm2):
    llm = copy.copy(smollm2)
    llm.set_kv_compression("auto", capacity=48, recompress_every=8)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    batch = llm.generate([SHORT, OTHER], params, policy="snapkv")
    single = [llm.generate(p, params, policy="snapkv")[0] for p in (SHORT, OTHER)]
    assert [o.token_ids for o in batch] == [o.token_ids for o in single]
    st = batch[0].stats
    assert st["kv_compression"] == "snapkv" and st["kv_compressions"] == 3  # after prefill, steps 8, 16
    assert st["kv_tokens_kept"] == 48 + 19 - 16  # re-compressed to 48 at step 16, 3 steps since
    assert batch[1].stats["kv_tokens_kept"] == batch[1].stats["prompt_tokens"] + 19  # short: all kept


def test_the_first_compression_reports_where_it_kept_the_prompt(smollm2):
    """The kept-stats sink (the policy actor's segment shares learn from it) gets one `KeepStats` per
    compressed sequence, after its first compression only: per (layer, KV head) the fractions of the kept
    prompt positions over 16 bins of relative position, weight 1 where the plan chose, 0 where it kept all."""
    llm = copy.copy(smollm2)
    llm.set_kv_compression("auto", capacity=48, recompress_every=8)
    seen = []
    llm.core.sinks = StatsSinks(kept=lambda rid, stats: seen.append(stats))
    try:
        out = llm.generate([SHORT, OTHER], SamplingParams(max_tokens=20, ignore_eos=True), policy="snapkv")
    finally:
        llm.core.sinks = StatsSinks()
    assert out[0].stats["kv_compressions"] == 3 and len(seen) == 2  # re-compressions do not report
    layers, heads = llm.arch.num_layers, llm.arch.num_kv_heads
    chose, kept_all = sorted(seen, key=lambda s: -float(s.weights.sum()))
    for stats in seen:
        assert stats.fractions.shape == (layers, heads, 16) and stats.weights.shape == (layers, heads)
    assert (chose.weights == 1).all() and np.allclose(chose.fractions.sum(-1), 1.0, atol=1e-5)
    kept = 48 - 32  # C - W prefix positions chosen per head: every fraction is a count of them
    assert np.allclose(chose.fractions * kept, np.round(chose.fractions * kept), atol=1e-4)
    assert (kept_all.weights == 0).all() and (kept_all.fractions == 0).all()  # OTHER is shorter than 48


def test_kv_overrides_are_checked_and_named(smollm2):
    with pytest.raises(ConfigError, match="kv_capacity"):
        LLM("smollm2-135m", policy="entropy", kv_capacity=8)
    with pytest.raises(ConfigError, match="kv_gap"):
        copy.copy(smollm2).set_kv_compression("latent", gap=0)
    with pytest.raises(ConfigError, match="kv_no_such_knob"):
        LLM("smollm2-135m", kv_no_such_knob=1)
    with pytest.raises(ConfigError, match="nope"):
        LLM("smollm2-135m", kv_compression="nope")


def test_entropy_policy_with_per_head_capacities(smollm2):
    ids = smollm2.tokenizer.encode(real_document(1200))[:800]
    prompt = [{"role": "user", "content": smollm2.tokenizer.decode(ids) + "\n\nWhat is this text about?"}]
    llm = copy.copy(smollm2)
    llm.set_kv_compression("auto", capacity=128, head_capacity="entropy")
    st = llm.generate(prompt, SamplingParams(max_tokens=18, ignore_eos=True), policy="entropy")[0].stats
    hkv = llm.arch.num_kv_heads
    caps = st["kv_head_capacities"]  # [layers][KV heads]
    assert st["density"] < 1.0 and len(caps) == llm.arch.num_layers
    assert all(sum(row) == hkv * 128 for row in caps)  # the same total per layer
    assert caps[0] == [128] * hkv  # layer 0 runs dense: no entropy, uniform
    assert any(len(set(row)) > 1 for row in caps) and min(min(row) for row in caps) >= 64
    # every head keeps its own capacity (all below the prompt length), plus the one step after compression
    assert st["kv_tokens_kept_per_layer"] == [128 + 1] * llm.arch.num_layers
