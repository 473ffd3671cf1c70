"""Key-block representations (element-wise max and min of each ``b``-key block) read straight from paged KV:
what entropy profiling needs of a prefill chunk's prefix, without a contiguous copy of it.

Semantics: `paged_block_reps_ref`. One program per (tile of ``GROUPS`` blocks, KV head); each block's ``b``
rows are found through the head's page table (``p // page_size`` is a shift) and reduced in float32, written
in the pool's dtype (exact: min and max only pick elements). It reads each key once and writes ``2 / b`` of
it, where a gather reads and writes keys and values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entropyinfer.kernels.backend import Backend, jit_kernel, runs_triton
from entropyinfer.kernels.paged_block_reps_ref import check_paged_reps_args, paged_block_reps_ref
from entropyinfer.kernels.tiling import pow2

__all__ = ["paged_block_reps"]


@triton.jit(do_not_specialize=["n_blocks"])
def _paged_reps_kernel(
    k_ptr: tl.tensor,
    table_ptr: tl.tensor,
    max_ptr: tl.tensor,
    min_ptr: tl.tensor,
    stride_kp: tl.tensor,
    stride_kh: tl.tensor,
    stride_ks: tl.tensor,
    stride_th: tl.tensor,
    stride_oh: tl.tensor,
    stride_og: tl.tensor,
    n_blocks: tl.tensor,
    dim: tl.tensor,
    B: tl.constexpr,  # keys per block (a power of two)
    GROUPS: tl.constexpr,  # blocks per program
    PAGE_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
) -> None:
    h = tl.program_id(1).to(tl.int64)
    g = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    r = tl.arange(0, B)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < n_blocks
    d_ok = d < dim
    pos = g[:, None] * B + r[None, :]  # [GROUPS, B] key positions
    page = tl.load(table_ptr + h * stride_th + pos // PAGE_SIZE, mask=g_ok[:, None], other=0).to(tl.int64)
    row = page * stride_kp + h * stride_kh + (pos % PAGE_SIZE).to(tl.int64) * stride_ks
    m = g_ok[:, None, None] & d_ok[None, None, :]
    x = tl.load(k_ptr + row[:, :, None] + d[None, None, :], mask=m, other=0.0).to(tl.float32)
    res_max = tl.max(tl.where(m, x, float("-inf")), axis=1)
    res_min = tl.min(tl.where(m, x, float("inf")), axis=1)
    out = h * stride_oh + g[:, None] * stride_og + d[None, :]
    om = g_ok[:, None] & d_ok[None, :]
    tl.store(max_ptr + out, res_max.to(max_ptr.dtype.element_ty), mask=om)
    tl.store(min_ptr + out, res_min.to(min_ptr.dtype.element_ty), mask=om)


def paged_block_reps(
    k_pages: torch.Tensor,
    block_table: torch.Tensor,
    num_blocks: int,
    block_size: int,
    *,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kmax, kmin [Hkv, num_blocks, d]`` (the pool's dtype) of the first ``num_blocks`` ``block_size``-key
    blocks of every KV head of one layer's pool ``k_pages [num_pages, Hkv, page_size, d]`` (last dim
    contiguous), read through ``block_table`` int32 / int64 ``[Hkv, P]``. ``backend``: `kernels.backend`."""
    check_paged_reps_args(k_pages, block_table, num_blocks, block_size)
    if not runs_triton(k_pages.device, backend):
        return paged_block_reps_ref(k_pages, block_table, num_blocks, block_size)
    if block_size & (block_size - 1) or k_pages.shape[2] & (k_pages.shape[2] - 1):
        raise ValueError(f"block_size {block_size} and page_size {k_pages.shape[2]} must be powers of two")
    if k_pages.stride(-1) != 1:
        raise ValueError("k_pages needs a contiguous last dim")
    if block_table.stride(1) != 1:  # the kernel steps through a row by one
        block_table = block_table.contiguous()
    hkv, d = k_pages.shape[1], k_pages.shape[3]
    kmax = torch.empty(hkv, num_blocks, d, dtype=k_pages.dtype, device=k_pages.device)
    kmin = torch.empty_like(kmax)
    if num_blocks == 0:
        return kmax, kmin
    groups = max(1, min(16, 128 // block_size))
    grid = (triton.cdiv(num_blocks, groups), hkv)
    jit_kernel(_paged_reps_kernel, k_pages.device)[grid](
        k_pages, block_table, kmax, kmin,
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), block_table.stride(0),
        kmax.stride(0), kmax.stride(1), num_blocks, d,
        B=block_size, GROUPS=groups, PAGE_SIZE=k_pages.shape[2], BLOCK_D=pow2(d), num_warps=4,
    )  # fmt: skip
    return kmax, kmin
