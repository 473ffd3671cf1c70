"""Adaptive (AdaKV-style) KV capacities through the `LLM` API (engine core, paged KV) on SmolLM2 (CPU)."""

from __future__ import annotations

import copy

import pytest

from entropyinfer import SamplingParams
from entropyinfer.evaluation.corpus import real_document

PROMPT = [{"role": "user", "content": "Summarize in one sentence:\n\n" + real_document()[:1200]}]


@pytest.mark.parametrize("mode", ["adaptive", "adaptive_layers"])
def test_adaptive_capacities_keep_the_uniform_total(smollm2, mode):
    """The capacities come from the window's scores at compression time: the same tokens in all as uniform
    (per layer for adaptive, over the layers for adaptive_layers), split unevenly, and decoding goes on."""
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    uniform = copy.copy(smollm2)
    uniform.set_kv_compression("latent", capacity=64)
    base = uniform.generate(PROMPT, params)[0].stats
    llm = copy.copy(smollm2)
    llm.set_kv_compression("latent", capacity=64, head_capacity=mode, min_head_fraction=0.25)
    out = llm.generate(PROMPT, params)[0]
    st, layers, hkv = out.stats, llm.arch.num_layers, llm.arch.num_kv_heads
    assert st["kv_compressions"] == 1 and len(out.token_ids) == 30
    # 16 steps on the full cache, then 64 per head on average; the 13 later steps add one token per head
    assert st["kv_tokens_kept_total"] == base["kv_tokens_kept_total"] == (64 + 13) * layers * hkv
    per_layer = st["kv_tokens_kept_per_layer"]
    if mode == "adaptive":
        assert per_layer == [64 + 13] * layers
    else:
        assert sum(per_layer) == pytest.approx((64 + 13) * layers) and len(set(per_layer)) > 1
