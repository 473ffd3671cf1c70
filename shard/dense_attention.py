"""Exact dense causal attention of a prompt or of one prefill chunk, through fused SDPA kernels.

A whole prompt: one causal SDPA call (cuDNN first on GPU). A chunk (queries ``[q0, q1)`` over keys
``[0, q1)``): fused calls that return their log-sum-exp, the chunk over the prefix ``[0, q0)`` unmasked
(a GQA group's heads stacked on the query axis) and over its own keys ``[q0, q1)`` causally, merged by their
log-sum-exp (what torch's context-parallel attention does). Every call runs a fused kernel
(FlashAttention, then cuDNN, then the memory-efficient kernel on GPU: cuDNN plans per shape and a chunk's
prefix grows; the flash kernel on CPU), and no mask is ever materialised.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["dense_causal_attention", "dense_chunk_attention", "merge_by_lse"]

_LseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]


def _sdpa_backends_cuda() -> list:
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    group = q.shape[0] // k.shape[0]
    if group > 1:  # the fused kernels want one KV head per query head
        return k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    return k, v


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact causal attention without an N x N score matrix (fused SDPA; cuDNN first on GPU).
    ``q [Hq, N, d]``, ``k``, ``v`` ``[Hkv, N, d]`` -> ``[Hq, N, d]``."""
    if q.device.type != "cuda":  # the CPU kernel takes GQA as it is: no copy of K/V per query head
        gqa = q.shape[0] != k.shape[0]
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=gqa)[0]
    k, v = _repeat_kv(q, k, v)
    from torch.nn.attention import sdpa_kernel

    try:
        ctx = sdpa_kernel(_sdpa_backends_cuda(), set_priority=True)
    except TypeError:  # older torch: no priority order
        ctx = sdpa_kernel(_sdpa_backends_cuda())
    with ctx:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]


def _lse_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    return out, lse


def _lse_cudnn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)
    return res[0], res[1]


def _lse_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)
    return res[0], res[1]


def _lse_efficient(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)
    return res[0], res[1]


def _lse_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Last resort (any device and dtype): scores in float32, O(Nq * Nk) memory."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        nq, nk = scores.shape[-2:]
        keep = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.exp(scores - lse[..., None]) @ v.float()).to(q.dtype), lse


# FlashAttention first for chunks: cuDNN builds an execution plan per new (Nq, Nk) shape (~85 ms of host
# time on an H200, measured in benchmarks/chunk_trace.py), and a chunk's prefix grows every chunk.
_CUDA_LSE: list[_LseFn] = [_lse_flash, _lse_cudnn, _lse_efficient, _lse_math]
_cuda_broken: set[tuple[str, torch.dtype, int]] = set()  # (kernel, dtype, head dim) that raised once


def _attend_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, Nq, d] in q's dtype, lse float32 [B, H, Nq])`` of ``q [B, H, Nq, d]`` over ``k``, ``v``
    ``[B, H, Nk, d]`` (last dim contiguous; causal: square, ``Nq == Nk``)."""
    fns: list[_LseFn] = [_lse_cpu, _lse_math] if q.device.type != "cuda" else _CUDA_LSE
    if q.dtype not in (torch.float16, torch.bfloat16):  # cuDNN and flash take half types only (in fp32
        fns = [f for f in fns if f not in (_lse_cudnn, _lse_flash)]  # cuDNN answered NaN, not an error)
    for fn in fns:
        tag = (fn.__name__, q.dtype, q.shape[-1])
        if tag in _cuda_broken and fn is not _lse_math:
            continue
        try:
            out, lse = fn(q, k, v, causal)
        except (RuntimeError, NotImplementedError):  # kernel unavailable for this dtype / shape / GPU
            if fn is _lse_math:
                raise
            _cuda_broken.add(tag)
            continue
        b, h, nq = q.shape[:3]
        return out, lse.float().reshape(b, h, -1)[..., :nq]  # some kernels pad or add a trailing 1
    raise AssertionError("unreachable: the math path always answers")


def merge_by_lse(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """float32 attention over the union of disjoint key sets from each set's result: ``out [S, ..., d]``
    (each normalised over its own keys) and ``lse`` float32 ``[S, ...]`` (-inf: a set without keys, whose
    weight is then 0; no keys anywhere gives zeros, never NaN)."""
    top = lse.amax(dim=0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lse - top)
    total = w.sum(dim=0).clamp_min(torch.finfo(torch.float32).tiny)
    return (out.float() * w[..., None]).sum(dim=0) / total[..., None]


def _prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention of ``q [Hq, Nq, d]`` over ``k``, ``v`` ``[Hkv, L, d]`` -> ``(out [Hq, Nq, d],
    lse [Hq, Nq])``, a GQA group's query heads stacked along the query axis (``[Hkv, G * Nq, d]``): no copy
    of K/V per query head. On an H200 (bf16, 32/8 heads, a 128k prefix) 0.55 ms for a 30-token chunk and
    1.8 ms for a 256-token one, against 3.1 and 4.3 ms with K/V repeated per head; the flash kernel splits
    the keys of such short chunks itself (explicit key ranges merged by log-sum-exp were slower)."""
    hq, nq, d = q.shape
    hkv = k.shape[0]
    out, lse = _attend_lse(q.reshape(hkv, hq // hkv * nq, d)[None], k[None], v[None], False)
    return out[0].reshape(hq, nq, d), lse[0].reshape(hq, nq)


def dense_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int) -> torch.Tensor:
    """Exact causal attention of a chunk: ``q [Hq, Nq, d]`` at positions ``[q_offset, q_offset + Nq)`` over
    ``k``, ``v`` ``[Hkv, Nk, d]`` (``Nk >= q_offset + Nq``; keys from position 0) -> ``[Hq, Nq, d]``: query
    ``p`` attends keys ``[0, p]``."""
    nq = q.shape[1]
    if k.shape[1] < q_offset + nq or q_offset < 0:
        raise ValueError(f"keys must cover [0, q_offset + Nq): Nk={k.shape[1]}, q_offset={q_offset}, Nq={nq}")
    if q_offset == 0:
        return dense_causal_attention(q, k[:, :nq], v[:, :nq])
    prefix = _prefix_attention(q, k[:, :q_offset], v[:, :q_offset])
    k2, v2 = _repeat_kv(q, k[:, q_offset : q_offset + nq], v[:, q_offset : q_offset + nq])
    own, own_lse = _attend_lse(q[None], k2[None], v2[None], True)
    out = merge_by_lse(torch.stack([prefix[0], own[0]]), torch.stack([prefix[1], own_lse[0]]))
    return out.to(q.dtype)
