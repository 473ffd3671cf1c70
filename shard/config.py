"""Engine settings (typed; loaded from YAML or keyword overrides through `configs/loader.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from entropyinfer.errors import ConfigError

# How `LLM(load_format=...)` gets its weights (vLLM's names): "auto" reads the checkpoint's safetensors;
# "dummy" fills a model of the checkpoint's shape with random weights (only config.json and the tokenizer
# are read), for speed measurements and serving tests without a real checkpoint.
LOAD_FORMATS = ("auto", "dummy")


def check_load_format(value: object, name: str = "load_format") -> None:
    """Raise ConfigError naming `name` unless `value` is one of LOAD_FORMATS."""
    if value not in LOAD_FORMATS:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(LOAD_FORMATS)}")


@dataclass(frozen=True)
class EngineConfig:
    # Tokens per chunk of the token-wise prefill work (norms, projections, MLP): bounds activation memory.
    # Attention itself runs over the whole prompt in one fused kernel, so no N x N matrix ever exists.
    prefill_chunk_size: int = 4096
    # Capture the decode step in a CUDA graph (GPU only) when at least this many tokens are generated.
    cuda_graph_min_tokens: int = 8
    cuda_graphs: bool = True
    max_batch_size: int = 32
    # GPU: compile the sparse-prefill kernels for every block-count size class when the model loads, so the
    # first long request of each size does not pay Triton's compile time (a few seconds, once per process).
    warm_up_kernels: bool = True

    def __post_init__(self) -> None:
        if self.prefill_chunk_size < 1:
            raise ConfigError(f"prefill_chunk_size must be >= 1, got {self.prefill_chunk_size}")
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
