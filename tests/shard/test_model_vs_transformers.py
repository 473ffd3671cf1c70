"""Our model definitions against transformers' own implementations (tiny random configs, fp32).

On a machine with CUDA the logits test also runs our model on the GPU, where the token-wise operations are the
fused Triton kernels (`kernels/layer_ops.py`), against transformers on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.attention import DensePrefill
from entropyinfer.shard.config import EngineConfig
from entropyinfer.shard.engine import Engine
from entropyinfer.shard.weights import load_model

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

CASES = {
    "llama3_gqa_scaled": (LlamaConfig, dict(TINY, rope_parameters=LLAMA3_ROPE)),
    "llama2_tied_linear": (
        LlamaConfig,
        dict(
            TINY,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        ),
    ),
    "qwen2_bias_tied": (Qwen2Config, dict(TINY, tie_word_embeddings=True)),
    "qwen3_qknorm": (Qwen3Config, dict(TINY, head_dim=32, num_key_value_heads=1)),
    "pangu_embedded": (
        LlamaConfig,
        dict(TINY, attention_bias=True, rope_parameters={"rope_theta": 1.6e7, "rope_type": "default"}),
    ),
}


def _save_hf(tmp_path, name):
    config_cls, kwargs = CASES[name]
    torch.manual_seed(hash(name) % 1000)
    hf = AutoModelForCausalLM.from_config(config_cls(**kwargs), dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for pname, p in hf.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    if name == "pangu_embedded":  # openPangu-Embedded is this graph under its own model_type
        cfg = json.loads((tmp_path / "config.json").read_text())
        cfg["model_type"] = "PanguEmbedded"
        cfg["architectures"] = ["PanguEmbeddedForCausalLM"]
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    return hf


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(tmp_path, name, device):
    hf = _save_hf(tmp_path, name)
    model = load_model(tmp_path, torch.device(device), torch.float32)
    tol = 1e-4 if device == "cpu" else 1e-3
    arch = model.arch
    if name == "pangu_embedded":
        assert arch.model_type == "PanguEmbedded" and arch.qkv_bias and arch.o_bias
    tokens = torch.randint(0, 128, (37,))
    with torch.no_grad():
        ref = hf(tokens[None]).logits[0].float()
    engine = Engine(model, EngineConfig(prefill_chunk_size=16))
    cache = engine.new_cache(1, 64)
    got = engine.prefill(tokens, cache, 0, DensePrefill(), all_logits=True).cpu()
    assert (got - ref).abs().max().item() <= tol

    # Decode steps over the cache give the logits of the next positions too.
    more = torch.randint(0, 128, (3,))
    with torch.no_grad():
        ref_next = hf(torch.cat([tokens, more])[None]).logits[0, -3:].float()
    for i in range(3):
        step = engine.decode_step(more[i : i + 1].to(device), torch.tensor([37 + i], device=device), cache)
        assert (step[0].cpu() - ref_next[i]).abs().max().item() <= tol


def test_chunked_prefill_equals_one_shot(tmp_path):
    _save_hf(tmp_path, "llama3_gqa_scaled")
    model = load_model(tmp_path, torch.device("cpu"), torch.float32)
    tokens = torch.randint(0, 128, (50,))
    outs = []
    for chunk in (7, 16, 50, 4096):
        engine = Engine(model, EngineConfig(prefill_chunk_size=chunk))
        cache = engine.new_cache(1, 64)
        outs.append(
            (engine.prefill(tokens, cache, 0, DensePrefill(), all_logits=True), cache.data[:, :, :, :, :50])
        )
    for logits, kv in outs[1:]:
        torch.testing.assert_close(logits, outs[0][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(kv, outs[0][1], rtol=0, atol=1e-5)


def test_later_pangu_variants_and_unknown_architectures_are_refused():
    from entropyinfer.errors import UnsupportedArchitectureError

    base = dict(TINY, model_type="PanguEmbedded")
    for extra in ({"sliding_window": 4096}, {"param_sink_number": 128}, {"sandwich_norm": True}):
        with pytest.raises(UnsupportedArchitectureError, match="openPangu"):
            ModelArch.from_hf_config(dict(base, **extra))
    with pytest.raises(UnsupportedArchitectureError, match="mamba"):
        ModelArch.from_hf_config(dict(TINY, model_type="mamba"))
    with pytest.raises(UnsupportedArchitectureError, match="yarn"):
        ModelArch.from_hf_config(
            dict(TINY, model_type="llama", rope_scaling={"rope_type": "yarn", "factor": 4.0})
        )
