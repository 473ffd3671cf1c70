"""Attention execution on one shard: dense causal prefill and decode over the KV cache.

Sparse prefill (entropy / fixed policies) plugs in through `PrefillAttention`: the policy decides the
blocks (`policies/`), a kernel (`kernels/`) computes; this module only dispatches.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from entropyinfer.kernels.decode_attention import decode_attention


class PrefillAttention(Protocol):
    """Attention over a whole prompt for one layer: q [Hq, N, d], k and v [Hkv, N, d] -> [Hq, N, d]."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    def stats(self) -> dict: ...


def _sdpa_backends_cuda() -> list:
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact causal attention without an N x N score matrix (fused SDPA; cuDNN first on GPU)."""
    group = q.shape[0] // k.shape[0]
    if group > 1:  # the fused kernels want one KV head per query head
        k = k.repeat_interleave(group, dim=0)
        v = v.repeat_interleave(group, dim=0)
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
    from torch.nn.attention import sdpa_kernel

    try:
        ctx = sdpa_kernel(_sdpa_backends_cuda(), set_priority=True)
    except TypeError:  # older torch: no priority order
        ctx = sdpa_kernel(_sdpa_backends_cuda())
    with ctx:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]


class DensePrefill:
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dense_causal_attention(q, k, v)

    def stats(self) -> dict:
        return {"density": 1.0, "rigid_fraction": 0.0}


def cached_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """q [B, Hq, d] over k_cache/v_cache [B, Hkv, capacity, d] with lengths [B, Hkv] -> [B, Hq, d]."""
    return decode_attention(q, k_cache, v_cache, lengths)


POLICY_NAMES = ("dense",)


def check_policy(policy: str) -> None:
    from entropyinfer.errors import UnknownPolicyError

    if policy not in POLICY_NAMES:
        raise UnknownPolicyError(f"unknown policy {policy!r}; choose one of: {', '.join(POLICY_NAMES)}")


def build_prefill_attention(policy: str, overrides: dict) -> DensePrefill:
    from entropyinfer.errors import ConfigError

    check_policy(policy)
    if overrides:
        raise ConfigError(f"policy {policy!r} takes no options, got: {', '.join(sorted(overrides))}")
    return DensePrefill()
