"""Plain-torch reference of the token-wise layer operations (the oracle of `layer_ops`, and the CPU path).

These are exactly the Hugging Face Llama computations, rounding included: RMSNorm normalises in float32,
rounds to the input dtype, then multiplies by the weight in that dtype; rotary embeddings rotate-half in the
input dtype; the MLP activation is ``silu(gate) * up`` in the input dtype (gate and up side by side in
one tensor, the fused projection's output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["add_rms_norm_ref", "rms_norm_ref", "rotary_ref", "silu_and_mul_ref"]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dimension."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (rounded to the dtype) and ``rms_norm(s)``: returns ``(normed, s)``."""
    s = x + residual
    return rms_norm_ref(s, weight, eps), s


def rotary_ref(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate-half rotary embedding of ``x [B, T, H, d]`` with ``cos``/``sin`` ``[B, T, d]`` or ``[T, d]``
    (the two halves of the last dimension equal, as `shard.layers.Rotary` makes them).

    Returns ``[B, H, T, d]``: written into ``out`` (any strides) when given, else a new contiguous tensor.
    """
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, d]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    y = (x * c + rotated * s).transpose(1, 2)
    if out is None:
        return y.contiguous()
    out.copy_(y)
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` along the last dimension: ``[..., 2I] -> [..., I]``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
