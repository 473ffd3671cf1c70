"""GGUF -> Hugging Face checkpoint conversion of a Llama-architecture model (what the embedded model needs).

`convert_gguf` reads a GGUF file (llama.cpp's format) with the ``gguf`` library, dequantizes every tensor
to fp32, undoes llama.cpp's rope row permutation of Q and K, renames the tensors to transformers'
``LlamaForCausalLM`` names, rebuilds the Hugging Face fast tokenizer from the GGUF vocabulary
(`gguf_tokenizer`), and writes an ordinary checkpoint folder: config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json. `shard/embedded.py` decides where and when (once,
under a lock) and checks the result against the model it promises.

``from_pretrained(gguf_file=...)`` is not used: it needs `accelerate` (not a dependency) and parses the file
a second time for the tokenizer; the tensors written here are bit-identical to what transformers would load.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entropyinfer.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from gguf import GGUFReader
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "CONVERTER_VERSION",
    "convert_gguf",
    "gguf_field",
    "gguf_tokenizer",
    "hf_tensor_name",
    "unpermute_rope",
]

CONVERTER_VERSION = 1
"""Bumped when the conversion's output changes, so that older cached folders are not reused (it is part of
the embedded model's cache folder name)."""

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_GGUF_TOKEN_CONTROL = 3
_GGUF_TOKEN_USER_DEFINED = 4


def hf_tensor_name(gguf_name: str) -> str:
    """The transformers ``LlamaForCausalLM`` name of a GGUF tensor (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``); anything else raises UnsupportedArchitectureError."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m is None or m.group(2) not in _LAYER_TENSORS:
        raise UnsupportedArchitectureError(f"unexpected GGUF tensor {gguf_name!r} for a Llama model")
    return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rope pairs -> Hugging Face's rotate-half halves)."""
    # llama.cpp's convert script applies reshape(n_heads, 2, half, ...).swapaxes(1, 2); this is its inverse.
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """The value of metadata field `key` (a GGUF value: number, string or list), or `default`."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def convert_gguf(gguf_path: Path, out: Path, *, hf_id: str, eos_token: str, chat_template: str) -> None:
    """Write a Hugging Face Llama checkpoint (fp32 safetensors, config, tokenizer) of `gguf_path` to `out`.

    `hf_id` becomes config.json's ``_name_or_path``; the GGUF's eos token must be `eos_token`;
    `chat_template` is used when the GGUF has none.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    reader = GGUFReader(str(gguf_path))
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedArchitectureError(f"{gguf_path.name}: GGUF architecture {arch!r}, expected 'llama'")

    def meta(key: str, default: Any = None) -> Any:
        return gguf_field(reader, f"llama.{key}", default)

    n_heads = int(meta("attention.head_count"))
    n_kv = int(meta("attention.head_count_kv", n_heads))
    hidden = int(meta("embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    tied = "output.weight" not in tensor_names
    tokens_field = reader.fields["tokenizer.ggml.tokens"]
    eps = float(meta("attention.layer_norm_rms_epsilon", 1e-5))
    bos_id = int(gguf_field(reader, "tokenizer.ggml.bos_token_id", 1))
    eos_id = int(gguf_field(reader, "tokenizer.ggml.eos_token_id", 2))
    pad_id = int(gguf_field(reader, "tokenizer.ggml.padding_token_id", eos_id))
    # transformers 5 turns the legacy rope_theta argument into rope_parameters; 4.x keeps it as is.
    legacy: dict[str, Any] = {"rope_theta": float(meta("rope.freq_base", 10000.0))}
    config = LlamaConfig(
        vocab_size=int(meta("vocab_size", len(tokens_field.data))),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=int(meta("rope.dimension_count", hidden // n_heads)),
        max_position_embeddings=int(meta("context_length")),
        # GGUF stores eps as float32 (1e-5 -> 9.99999974738e-06): keep the decimal value of the original.
        rms_norm_eps=float(f"{eps:.6g}"),
        **legacy,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=tied,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        architectures=["LlamaForCausalLM"],
    )

    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if ".attn_q." in t.name:
            w = unpermute_rope(w, n_heads)
        elif ".attn_k." in t.name:
            w = unpermute_rope(w, n_kv)
        state[hf_tensor_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {k for k in model.state_dict() if not (tied and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise UnsupportedArchitectureError(
            f"{gguf_path.name}: tensors do not match LlamaForCausalLM: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.tie_weights()
    model.eval()
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id).save_pretrained(out)
    del model, state

    # config.json: transformers 5 writes rope_parameters only; add the flat rope_theta older readers use.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("rope_theta", config.rope_parameters["rope_theta"] if config.rope_parameters else 1e4)
    cfg.setdefault("rope_scaling", None)
    cfg["_name_or_path"] = hf_id
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    tokenizer = gguf_tokenizer(
        reader,
        max_len=config.max_position_embeddings,
        eos_token=eos_token,
        chat_template=chat_template,
        source=gguf_path.name,
    )
    tokenizer.save_pretrained(out)
    for p in out.iterdir():  # safetensors writes 0600 files; the cache may be shared by a team's processes
        p.chmod(0o644)


def gguf_tokenizer(
    reader: GGUFReader, *, max_len: int, eos_token: str, chat_template: str, source: str = "GGUF"
) -> PreTrainedTokenizerFast:
    """The Hugging Face fast tokenizer stored in a GGUF file of tokenizer model "gpt2" (byte-level BPE).

    Built directly with `tokenizers` from the GGUF vocabulary, merges, token types and pre-tokenizer name,
    re-using the already parsed GGUF. ``AutoTokenizer.from_pretrained(folder, gguf_file=...)`` would parse
    the 98 MB file a second time (5-10 s) and ignores ``tokenizer.ggml.pre``: for "smollm" it then drops the
    digit split, so whitespace before a digit tokenizes differently from the original SmolLM2 tokenizer and
    from llama.cpp (e.g. "\\n\\n8" -> "Ċ","Ċ","8" instead of "ĊĊ","8"). This follows llama.cpp.
    The GGUF's eos token must be `eos_token`; `chat_template` is used when the GGUF has none; `source`
    names the file in errors.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedArchitectureError(f"{source}: GGUF tokenizer {kind!r}, expected 'gpt2' (BPE)")
    tokens: list[str] = list(gguf_field(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges", [])]
    backend = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if gguf_field(reader, "tokenizer.ggml.pre") == "smollm":
        # llama.cpp's "smollm" pre-tokenizer (like the original tokenizer.json) splits every digit apart
        # before the GPT-2 byte-level regex.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    pairs = list(zip(tokens, types, strict=True))
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in pairs if k == _GGUF_TOKEN_CONTROL]
    )
    backend.add_tokens([AddedToken(t, special=False) for t, k in pairs if k == _GGUF_TOKEN_USER_DEFINED])

    def special(key: str) -> str | None:
        idx = gguf_field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if idx is None else tokens[int(idx)]

    eos = special("eos")
    if eos != eos_token:
        raise UnsupportedArchitectureError(f"{source}: eos token is {eos!r}, expected {eos_token!r}")
    template = gguf_field(reader, "tokenizer.chat_template") or chat_template
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=special("bos"),
        eos_token=eos,
        unk_token=special("unknown"),
        pad_token=special("padding") or eos,
        model_max_length=max_len,
        chat_template=template,
        clean_up_tokenization_spaces=False,
    )
