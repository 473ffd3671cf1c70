"""The Python API on the real SmolLM2 model: outputs equal transformers' greedy outputs, stats, errors."""

from __future__ import annotations

import json

import pytest
import torch

from entropyinfer import (
    LLM,
    CheckpointNotFoundError,
    ConfigError,
    InvalidRequestError,
    PromptTooLongError,
    SamplingParams,
    UnknownPolicyError,
    UnsupportedArchitectureError,
)
from entropyinfer.evaluation.corpus import real_document

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    "The three primary colors are",
    [{"role": "user", "content": "Summarize in one sentence:\n\n" + real_document()[:2500]}],
]


@pytest.fixture(scope="module")
def hf_model(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2.checkpoint), dtype=torch.float32).eval()


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_greedy_matches_transformers(smollm2, hf_model, index):
    prompt = PROMPTS[index]
    out = smollm2.generate(prompt, SamplingParams(max_tokens=24))[0]
    ids = smollm2.encode(prompt)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[
            0, len(ids) :
        ].tolist()
    assert out.token_ids == ref
    assert out.text.strip(), "the model should say something"
    assert out.finish_reason in ("stop", "length")


def test_batch_equals_one_by_one_and_stats(smollm2):
    params = SamplingParams(max_tokens=12)
    batch = smollm2.generate(PROMPTS[:2], params)
    single = [smollm2.generate(p, params)[0] for p in PROMPTS[:2]]
    assert [o.token_ids for o in batch] == [o.token_ids for o in single]
    stats = batch[0].stats
    for key in (
        "prompt_tokens",
        "prefill_ms",
        "decode_ms_per_token",
        "density",
        "rigid_fraction",
        "kv_tokens_kept",
        "kv_bytes",
    ):
        assert key in stats, key
    assert stats["prompt_tokens"] == smollm2.count_tokens(PROMPTS[0])
    assert stats["density"] == 1.0 and stats["policy"] == "dense"
    arch = smollm2.arch
    per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * 4
    assert stats["kv_bytes"] == stats["kv_tokens_kept"] * per_token


def test_stop_strings_stop_tokens_and_length(smollm2):
    free = smollm2.generate(PROMPTS[1], SamplingParams(max_tokens=16))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 16
    word = free.text.split()[2]
    cut = smollm2.generate(PROMPTS[1], SamplingParams(max_tokens=16, stop=[word]))[0]
    assert cut.finish_reason == "stop" and word not in cut.text and free.text.startswith(cut.text)
    tok = smollm2.generate(PROMPTS[1], SamplingParams(max_tokens=16, stop_token_ids=[free.token_ids[3]]))[0]
    assert tok.token_ids == free.token_ids[:4] and tok.finish_reason == "stop"


def test_streaming_concatenates_to_the_text(smollm2):
    events = list(smollm2.stream(PROMPTS[0], SamplingParams(max_tokens=20)))
    assert events[-1].finished and events[-1].output is not None
    assert "".join(e.text for e in events) == events[-1].output.text
    assert [e.token_id for e in events] == events[-1].output.token_ids


def test_seeded_sampling_is_reproducible(smollm2):
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a = smollm2.generate(PROMPTS[1], p)[0].token_ids
    b = smollm2.generate(PROMPTS[1], p)[0].token_ids
    c = smollm2.generate(PROMPTS[1], SamplingParams(max_tokens=16, temperature=1.0, seed=8))[0].token_ids
    assert a == b and a != c


def test_bad_inputs_raise_typed_errors(smollm2, tmp_path):
    with pytest.raises(UnknownPolicyError, match="dense"):
        LLM("smollm2-135m", policy="magic")
    with pytest.raises(CheckpointNotFoundError, match="smollm2-135m"):
        LLM("no-such-model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
    with pytest.raises(UnsupportedArchitectureError, match="mamba"):
        LLM(str(tmp_path))
    with pytest.raises(ConfigError, match="no_such_knob"):
        LLM("smollm2-135m", policy="entropy", no_such_knob=1)
    with pytest.raises(PromptTooLongError, match="8192"):
        smollm2.generate("word " * 9000, SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(temperature=-1.0)
    assert e.value.field == "temperature"
    with pytest.raises(InvalidRequestError):
        smollm2.generate("", SamplingParams(max_tokens=4))
    with pytest.raises(UnknownPolicyError):
        smollm2.generate("hello", SamplingParams(max_tokens=2), policy="nope")
