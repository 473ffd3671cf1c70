"""Where a model runs and in which dtype: `resolve_device`, `resolve_dtype` (the `device` and `dtype` of
`LLM(...)` and `ModelConfig`), `dtype_name` (a torch dtype as its config name), and `synced_now` (a clock
reading after the device's queued work)."""

from __future__ import annotations

import time

import torch

from entropyinfer.errors import ConfigError

__all__ = ["dtype_name", "resolve_device", "resolve_dtype", "synced_now"]

_DTYPES = {  # vLLM's names ("half", "float") and ours; the canonical name of a torch dtype is the last
    "float": torch.float32,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def dtype_name(dtype: str | torch.dtype | None) -> str:
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in _DTYPES.items() if "float" in k}
        if dtype not in names:
            raise ConfigError(f"dtype {dtype} is not one of {', '.join(_DTYPES)}")
        return names[dtype]
    return dtype


def synced_now(device: torch.device) -> float:
    """`time.perf_counter()` once the device has finished its queued work (CUDA: a synchronize)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
