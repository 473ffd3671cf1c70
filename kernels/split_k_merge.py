"""The split-K half that contiguous and paged decode attention share (`decode_attention.py`,
`paged_decode_attention.py`): the float32 scratch of the splits' partial outputs and log2-sum-exps
(`DecodeWorkspace`, cached per launch shape by `get_workspace`) and the stage-2 kernel that merges them,
``out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M)`` with ``M = max_s lse_s`` (a head without keys gives
zeros, never NaN). Its torch counterpart is the references' own softmax (`decode_attention_ref.py`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

__all__ = [
    "DecodeWorkspace",
    "check_workspace",
    "clear_workspace_cache",
    "decode_merge_kernel",
    "get_workspace",
]


@triton.jit
def decode_merge_kernel(
    MidO: tl.tensor,
    MidLse: tl.tensor,
    Out: tl.tensor,
    stride_mb: tl.tensor,
    stride_mh: tl.tensor,
    stride_ms: tl.tensor,
    stride_lse_b: tl.tensor,
    stride_lse_h: tl.tensor,
    stride_ob: tl.tensor,
    stride_oh: tl.tensor,
    Hq: tl.tensor,
    num_splits: tl.tensor,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
) -> None:
    pid = tl.program_id(0)
    b = (pid // Hq).to(tl.int64)
    h = (pid % Hq).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM

    lse = tl.load(MidLse + b * stride_lse_b + h * stride_lse_h + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_safe)  # 0 for empty splits and for the padding
    denom = tl.sum(w, axis=0)
    o_ptrs = MidO + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :]
    o = tl.load(o_ptrs, mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    res = tl.sum(w[:, None] * o, axis=0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, res.to(Out.dtype.element_ty), mask=mask_d)


class DecodeWorkspace(NamedTuple):
    """Float32 scratch of one launch shape: the splits' partial outputs and their log2-sum-exps."""

    mid_o: torch.Tensor  # [B, Hq, S, d], normalised partial outputs
    mid_lse: torch.Tensor  # [B, Hq, S], log2-sum-exp of each split (-inf: no key)


_WORKSPACES: dict[tuple[Any, ...], DecodeWorkspace] = {}


def get_workspace(
    device: torch.device | str, batch: int, num_q_heads: int, head_dim: int, num_splits: int
) -> DecodeWorkspace:
    """The cached scratch of one launch shape (allocated on first use, then reused).

    A CUDA graph captured after a warm-up call keeps pointing at the same memory. Every split program
    overwrites its slot on each call, so stale contents are never read.
    """
    dev = torch.device(device)
    key = (dev, batch, num_q_heads, head_dim, num_splits)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = DecodeWorkspace(
            mid_o=torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=dev),
            mid_lse=torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=dev),
        )
        _WORKSPACES[key] = ws
    return ws


def clear_workspace_cache() -> None:
    """Drop every cached scratch buffer (graphs captured with them must not be replayed afterwards)."""
    _WORKSPACES.clear()


def check_workspace(
    ws: DecodeWorkspace, device: torch.device, batch: int, hq: int, d: int, num_splits: int
) -> None:
    mid_o, mid_lse = ws
    want = ((batch, hq, num_splits, d), (batch, hq, num_splits))
    got = (tuple(mid_o.shape), tuple(mid_lse.shape))
    if got != want:
        raise ValueError(f"workspace shapes must be (mid_o, mid_lse) = {want}, got {got}")
    if mid_o.dtype != torch.float32 or mid_lse.dtype != torch.float32:
        raise ValueError("workspace buffers must be float32")
    if mid_o.device != device or mid_lse.device != device:
        raise ValueError(f"workspace buffers must be on {device}, got {mid_o.device}, {mid_lse.device}")
    if mid_o.stride(-1) != 1 or mid_lse.stride(-1) != 1:
        raise ValueError("workspace buffers need a contiguous last dim")
