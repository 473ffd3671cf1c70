"""Fused token-wise layer operations in Triton: RMSNorm (optionally with the residual add), rotary
embeddings written straight into their destination, and the MLP's ``silu(gate) * up`` over the fused
gate|up projection's output.

Each replaces a chain of small torch kernels (RMSNorm alone is eight: cast, square, mean, add, rsqrt,
multiply, cast, scale) by one pass over the data in float32 with a single rounding at the end, which
matters twice: in prefill these passes read and write the whole prompt's activations (float32
intermediates included), and in a decode step, where every kernel is tiny, their count is what the
step costs beyond reading the weights. `layer_ops_ref.py` holds the torch reference (Hugging Face's
exact computation); results agree with it to the dtype's rounding (they round once, the reference at
every step).

Layouts: rows are the last dimension, which must be contiguous; other strides are free. `rotary` reads
``x [B, T, H, d]`` (the projection's output, viewed) and writes ``[B, H, T, d]`` into ``out`` when given
(in prefill: the layer's query buffer and the KV cache), so the transpose and the copy come for free.

Each op takes ``backend`` (`kernels.backend`): by default the kernel runs for CUDA tensors and the reference
for CPU tensors; ``backend="triton"`` runs the kernel in Triton's interpreter on CPU tensors (tests, float32 /
float16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entropyinfer.kernels.backend import Backend, jit_kernel, runs_triton
from entropyinfer.kernels.layer_ops_ref import add_rms_norm_ref, rms_norm_ref, rotary_ref, silu_and_mul_ref

__all__ = ["add_rms_norm", "rms_norm", "rotary", "silu_and_mul"]


@triton.jit
def _rms_norm_kernel(
    x_ptr: tl.tensor,
    r_ptr: tl.tensor,
    w_ptr: tl.tensor,
    out_ptr: tl.tensor,
    sum_ptr: tl.tensor,
    stride_x: tl.tensor,
    stride_r: tl.tensor,
    stride_o: tl.tensor,
    stride_s: tl.tensor,
    n_cols: tl.tensor,
    eps: tl.tensor,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
) -> None:
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    y = (xf * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    x_ptr: tl.tensor,
    cos_ptr: tl.tensor,
    sin_ptr: tl.tensor,
    out_ptr: tl.tensor,
    sxb: tl.tensor,
    sxt: tl.tensor,
    sxh: tl.tensor,
    scb: tl.tensor,
    sct: tl.tensor,
    sob: tl.tensor,
    soh: tl.tensor,
    sot: tl.tensor,
    T: tl.tensor,
    H: tl.tensor,
    HALF: tl.tensor,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
) -> None:
    pid = tl.program_id(0).to(tl.int64)  # one (b, t) per program along axis 0
    b = pid // T
    t = pid % T
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    dm = offs_d < HALF
    c = tl.load(cos_ptr + b * scb + t * sct + offs_d, mask=dm, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + b * scb + t * sct + offs_d, mask=dm, other=0.0).to(tl.float32)[None, :]
    m = (offs_h < H)[:, None] & dm[None, :]
    src = x_ptr + b * sxb + t * sxt + offs_h[:, None].to(tl.int64) * sxh + offs_d[None, :]
    x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
    dst = out_ptr + b * sob + t * sot + offs_h[:, None].to(tl.int64) * soh + offs_d[None, :]
    ty = out_ptr.dtype.element_ty
    tl.store(dst, (x1 * c - x2 * s).to(ty), mask=m)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(ty), mask=m)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr: tl.tensor,
    o_ptr: tl.tensor,
    stride_x: tl.tensor,
    stride_o: tl.tensor,
    n_cols: tl.tensor,
    BLOCK: tl.constexpr,
) -> None:
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n_cols
    g = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * stride_o + cols, (g / (1.0 + tl.exp(-g)) * u).to(o_ptr.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def _norm_warps(block: int) -> int:
    return min(max(block // 512, 1), 8)


def _check_norm(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [{x.shape[-1]}], got {tuple(weight.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: Backend = "auto") -> torch.Tensor:
    """RMSNorm over the last dimension of ``x [..., D]`` (see `rms_norm_ref`); a new tensor like ``x``."""
    _check_norm(x, weight)
    if not runs_triton(x.device, backend) or x.numel() == 0:
        return rms_norm_ref(x, weight, eps)
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(rows.shape[1])
    jit_kernel(_rms_norm_kernel, x.device)[(rows.shape[0],)](
        rows, rows, weight, out, out, rows.stride(0), rows.stride(0), out.stride(0), out.stride(0),
        rows.shape[1], float(eps), HAS_RESIDUAL=False, BLOCK=block, num_warps=_norm_warps(block),
    )  # fmt: skip
    return out.view(x.shape)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: Backend = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` and RMSNorm of ``s`` in one pass: returns ``(normed, s)`` (see
    `add_rms_norm_ref`)."""
    _check_norm(x, weight)
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ in shape")
    if not runs_triton(x.device, backend) or x.numel() == 0:
        return add_rms_norm_ref(x, residual, weight, eps)
    rows, res = _rows(x), _rows(residual)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    total = torch.empty_like(out)
    block = triton.next_power_of_2(rows.shape[1])
    jit_kernel(_rms_norm_kernel, x.device)[(rows.shape[0],)](
        rows, res, weight, out, total, rows.stride(0), res.stride(0), out.stride(0), total.stride(0),
        rows.shape[1], float(eps), HAS_RESIDUAL=True, BLOCK=block, num_warps=_norm_warps(block),
    )  # fmt: skip
    return out.view(x.shape), total.view(x.shape)


def rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Rotary embedding of ``x [B, T, H, d]`` -> ``[B, H, T, d]`` (into ``out`` when given, any strides
    with a contiguous last dimension); ``cos``/``sin`` are ``[B, T, d]`` or ``[T, d]`` (see `rotary_ref`)."""
    bsz, t, h, d = x.shape
    if d % 2 or cos.shape[-1] != d or sin.shape != cos.shape:
        raise ValueError(f"rotary: head dim {d} must be even and match cos/sin {tuple(cos.shape)}")
    if out is not None and tuple(out.shape) != (bsz, h, t, d):
        raise ValueError(f"rotary: out must be {(bsz, h, t, d)}, got {tuple(out.shape)}")
    if not runs_triton(x.device, backend) or x.numel() == 0:
        return rotary_ref(x, cos, sin, out)
    if out is None:
        out = torch.empty(bsz, h, t, d, dtype=x.dtype, device=x.device)
    if x.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("rotary: x and out need a contiguous last dimension")
    if cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    scb, sct = (0, cos.stride(0)) if cos.dim() == 2 else (cos.stride(0), cos.stride(1))
    block_h = min(triton.next_power_of_2(h), 16)
    jit_kernel(_rotary_kernel, x.device)[(bsz * t, triton.cdiv(h, block_h))](
        x, cos, sin, out, x.stride(0), x.stride(1), x.stride(2), scb, sct,
        out.stride(0), out.stride(1), out.stride(2), t, h, d // 2,
        BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(d // 2), num_warps=4,
    )  # fmt: skip
    return out


def silu_and_mul(x: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` (the fused projection's output) in one pass:
    ``[..., 2I] -> [..., I]`` (see `silu_and_mul_ref`)."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: the last dimension {x.shape[-1]} must be even (gate | up)")
    if not runs_triton(x.device, backend) or x.numel() == 0:
        return silu_and_mul_ref(x)
    rows = _rows(x)
    n = rows.shape[1] // 2
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(n), 2048)
    jit_kernel(_silu_and_mul_kernel, x.device)[(rows.shape[0], triton.cdiv(n, block))](
        rows, out, rows.stride(0), out.stride(0), n, BLOCK=block, num_warps=4 if block < 2048 else 8
    )
    return out.view(*x.shape[:-1], n)
