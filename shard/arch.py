"""Model architecture read from a Hugging Face `config.json`: one dataclass for every family we run.

Supported: Llama 2 / 3 / 3.1 (incl. llama3 rope scaling), Qwen2 / Qwen2.5 (qkv bias), Qwen3 (q/k norm),
openPangu-Embedded (`model_type` "PanguEmbedded": Llama with bias on q, k, v and o).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from entropyinfer.errors import CheckpointNotFoundError, ConfigError, UnsupportedArchitectureError
from entropyinfer.shard.parallel.heads import check_heads, head_shard

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "PanguEmbedded")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()
    # > 1 in the view of one tensor-parallel rank (`local`), whose num_heads / num_kv_heads are the rank's
    tensor_parallel_size: int = 1

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def local(self, tensor_parallel_size: int) -> ModelArch:
        """What one of `tensor_parallel_size` ranks holds: its query heads (``Hq / tp``) and KV heads
        (``Hkv / tp``, or 1 when KV heads are replicated), so that per-rank buffers (KV pages, caches,
        query buffers) size themselves from it; every other field is the whole model's (hidden and
        vocabulary sizes, and intermediate_size, whose split the MLP makes itself). ConfigError naming the
        sizes that work when the heads or the MLP do not split evenly."""
        tp = tensor_parallel_size
        if self.tensor_parallel_size != 1:
            raise ValueError("local() takes the whole model's arch, not a rank's")
        check_heads(self.num_heads, self.num_kv_heads, tp)
        if self.intermediate_size % tp:
            raise ConfigError(
                f"tensor_parallel_size={tp} does not divide intermediate_size={self.intermediate_size}"
            )
        if tp == 1:
            return self
        shard = head_shard(self.num_heads, self.num_kv_heads, tp, 0)
        return replace(self, num_heads=shard.q_count, num_kv_heads=shard.kv_count, tensor_parallel_size=tp)

    def kv_bytes_per_token(self, element_size: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelArch:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise CheckpointNotFoundError(
                f"{folder} has no config.json: pass a Hugging Face checkpoint folder"
            )
        return cls.from_hf_config(json.loads(path.read_text()))

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArch:
        model_type = cfg.get("model_type", "")
        if model_type.lower() == "panguembedded" or "PanguEmbedded" in str(cfg.get("architectures", "")):
            model_type = "PanguEmbedded"
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} is not supported; "
                f"entropyinfer runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if model_type == "PanguEmbedded":
            _refuse_later_pangu(cfg)
        elif cfg.get("use_sliding_window"):
            raise UnsupportedArchitectureError(f"{model_type} with sliding-window attention is not supported")
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") if model_type != "PanguEmbedded" else None
        attention_bias = bool(cfg.get("attention_bias", False))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        rope_params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = float(rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedArchitectureError(
                f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        rope_params["rope_type"] = rope_type
        rope_params.pop("rope_theta", None)
        rope_params.pop("type", None)
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type in ("qwen2", "PanguEmbedded") or attention_bias,
            o_bias=model_type == "PanguEmbedded" or (model_type != "qwen2" and attention_bias),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            rope_scaling=rope_params,
            eos_token_ids=eos_ids,
        )


def _refuse_later_pangu(cfg: dict[str, Any]) -> None:
    """The later openPangu variants add sliding windows, parameter sinks or sandwich norms."""
    for key, value in cfg.items():
        k = key.lower()
        if k == "layer_types":
            value = [t for t in value or [] if t != "full_attention"]
        if value and ("sliding_window" in k or "sink" in k or "sandwich" in k or k == "layer_types"):
            raise UnsupportedArchitectureError(
                f"this openPangu variant sets {key}={value!r}; only openPangu-Embedded (the Llama graph with "
                "q/k/v/o bias) is supported, not the variants with sliding windows, sinks or sandwich norms"
            )
