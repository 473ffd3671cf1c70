"""entropyinfer: long-context LLM serving with entropy-guided sparse attention.

The engine (`LLM`, `SamplingParams`) imports without Ray; the client SDK
(`Client`, `AsyncClient`) is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from entropyinfer.errors import (
    CheckpointNotFoundError,
    ConfigError,
    EntropyInferError,
    InvalidRequestError,
    PromptTooLongError,
    RequestCancelled,
    UnknownPolicyError,
    UnsupportedArchitectureError,
)

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "AsyncClient",
    "CheckpointNotFoundError",
    "Client",
    "ConfigError",
    "EntropyInferError",
    "InvalidRequestError",
    "PromptTooLongError",
    "RequestCancelled",
    "RequestOutput",
    "SamplingParams",
    "UnknownPolicyError",
    "UnsupportedArchitectureError",
]

_LAZY = {
    "LLM": "entropyinfer.shard.llm",
    "RequestOutput": "entropyinfer.shard.llm",
    "SamplingParams": "entropyinfer.shard.sampling",
    "Client": "entropyinfer.cluster.client",
    "AsyncClient": "entropyinfer.cluster.client",
}

if TYPE_CHECKING:
    from entropyinfer.cluster.client import AsyncClient, Client
    from entropyinfer.shard.llm import LLM, RequestOutput
    from entropyinfer.shard.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'entropyinfer' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
