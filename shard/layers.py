"""Building blocks shared by every model family: RMSNorm and rotary position embeddings.

On a GPU the token-wise operations run as fused Triton kernels (`kernels/layer_ops.py`), on the CPU as their
torch references (Hugging Face's exact computation), whatever TRITON_INTERPRET says: each op decides that
itself (`kernels/backend.py`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from entropyinfer.kernels.layer_ops import rms_norm, rotary
from entropyinfer.shard.arch import ModelArch


class RMSNorm(nn.Module):
    def __init__(
        self, dim: int, eps: float, device: torch.device | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """Inverse frequencies (fp32, [head_dim / 2]) with the checkpoint's rope scaling applied."""
    d = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = arch.rope_scaling
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class Rotary(nn.Module):
    """cos/sin for given positions, computed on the fly (cheap, and static-shape for CUDA graphs)."""

    inv_freq: torch.Tensor

    def __init__(self, arch: ModelArch, device: torch.device | None = None):
        super().__init__()
        with torch.device("cpu"):  # also under a meta-device build: a meta tensor's first math costs seconds
            inv_freq = rope_inv_freq(arch)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # [..., d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [B, T, heads, d] (a projection's output, viewed) -> [B, heads, T, d], into `out` when given;
    cos/sin: [B, T, d] or [T, d]."""
    return rotary(x, cos, sin, out)
