"""The GGUF -> Hugging Face conversion (shard/gguf_convert.py) of the embedded SmolLM2-135M-Instruct: the
config, tensor names and tokenizer it writes, and the pure pieces (tensor names, rope row order).

The checkpoint comes from `resolve_checkpoint`, converted at most once per session and cache folder (see
tests/shard/test_embedded.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from entropyinfer.errors import UnsupportedArchitectureError
from entropyinfer.shard.embedded import resolve_checkpoint
from entropyinfer.shard.gguf_convert import hf_tensor_name, unpermute_rope

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return resolve_checkpoint("smollm2-135m")


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint))


def test_config_is_smollm2_135m(checkpoint: Path) -> None:
    cfg = json.loads((checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_size"] == 576
    assert cfg["intermediate_size"] == 1536
    assert cfg["num_hidden_layers"] == 30
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["head_dim"] == 64
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert cfg["max_position_embeddings"] == 8192
    assert cfg["rms_norm_eps"] == 1e-5
    assert cfg["rope_theta"] == 100000.0
    rope = cfg.get("rope_parameters")
    if rope is not None:  # transformers >= 5
        assert rope["rope_theta"] == 100000.0
        assert rope["rope_type"] == "default"
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    gen = json.loads((checkpoint / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2


def test_weight_names_are_llama_for_causal_lm(checkpoint: Path) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(AutoConfig.from_pretrained(str(checkpoint)))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert stored == expected
    assert dtypes == {"F32"}


def test_tokenizer_chat_template_and_eos(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tokenize=False
    )
    assert with_system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2
    assert tokenizer.bos_token_id == 1
    assert tokenizer.encode("<|im_start|>user\nHi<|im_end|>") == [1, 4093, 198, 26843, 2]
    # No bos is prepended; digits are split one by one (llama.cpp's "smollm" pre-tokenizer).
    ids = tokenizer.encode("In 2024 there were\n\n8 of them.")
    assert tokenizer.convert_ids_to_tokens(ids)[:6] == ["In", "Ġ", "2", "0", "2", "4"]
    assert "ĊĊ" in tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.decode(ids) == "In 2024 there were\n\n8 of them."


@pytest.mark.slow
def test_greedy_chat_answer_is_english(checkpoint: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(checkpoint), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    answer = tokenizer.decode(new, skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert new[-1] == tokenizer.eos_token_id, answer


def test_tensor_names_map_to_llama_for_causal_lm() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("blk.0.attn_q.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.29.ffn_down.weight") == "model.layers.29.mlp.down_proj.weight"
    assert hf_tensor_name("blk.3.attn_norm.weight") == "model.layers.3.input_layernorm.weight"
    assert hf_tensor_name("blk.3.attn_k.bias") == "model.layers.3.self_attn.k_proj.bias"
    for bad in ("blk.0.attn_qkv.weight", "rope_freqs.weight", "blk.x.attn_q.weight"):
        with pytest.raises(UnsupportedArchitectureError, match="unexpected GGUF tensor"):
            hf_tensor_name(bad)


def test_unpermute_rope_inverts_llama_cpps_permutation() -> None:
    n_heads, head_dim, hidden = 3, 8, 5
    w = np.arange(n_heads * head_dim * hidden, dtype=np.float32).reshape(n_heads * head_dim, hidden)
    # llama.cpp's convert_hf_to_gguf.py: reshape(n_head, 2, half, ...).swapaxes(1, 2).reshape(shape).
    permuted = w.reshape(n_heads, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rope(permuted, n_heads), w)
    # Row i of a head's first half pairs with row i + head_dim // 2 (rotate-half), interleaved in GGUF.
    head0 = unpermute_rope(permuted, n_heads)[:head_dim]
    np.testing.assert_array_equal(head0[[0, head_dim // 2]], permuted[[0, 1]])
