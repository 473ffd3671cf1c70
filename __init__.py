"""entropyinfer: long-context LLM serving with entropy-guided sparse attention.

The engine (`LLM`, `SamplingParams`) imports without Ray; the client SDK
(`Client`, `AsyncClient`) is loaded on first use.
"""

from __future__ import annotations

import os
import sys
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


def _unshadow_top_level_names() -> None:
    """Take this repository's root off `sys.path`.

    The root is the package `entropyinfer` itself, never a place to import from: as a path entry (`''`
    when Python starts in it: `python -m pytest`, `python -m entropyinfer`, a Ray worker given the
    driver's directory) its folders would shadow other distributions' top-level packages of the same
    name, and transformers imports Hugging Face's `kernels` package, which our `kernels/` would hide.
    """
    root = os.path.realpath(os.path.dirname(__file__))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    shadowed = sys.modules.get("kernels")
    if shadowed is not None and os.path.realpath(os.path.dirname(shadowed.__file__ or "")) == os.path.join(
        root, "kernels"
    ):
        del sys.modules["kernels"]


_unshadow_top_level_names()

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
