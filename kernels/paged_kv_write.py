"""The decode step's KV write into the page pool in Triton: each new token's key and value, for every
(sequence, KV head), stored at that head's page and offset in one launch per layer.

Torch's advanced-indexing assignment (`paged_kv_write_ref`) is two ``index_put`` launches per layer, each
about 4 us on an H200 for a single token (index arithmetic over the full index tensors); in a CUDA-graph
decode step of Llama-3-8B's shape that was 64 launches and about 0.27 ms of a 6.3 ms step. Here one
program per (sequence, KV head) reads its page id and offset and copies the ``d`` elements of K and of V.

Layouts: ``k, v [B, Hkv, d]`` with a contiguous last dimension (other strides free: the projection's
views); ``kv_pages`` is one layer of `KVPages.data` (``[2, num_pages, Hkv, page_size, d]``, contiguous);
``page, offset [B, Hkv]`` integers (any strides). No host sync, no allocation: capturable. ``backend`` as
in `kernels.backend`: the kernel for CUDA tensors, the reference for CPU tensors by default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entropyinfer.kernels.backend import Backend, jit_kernel, runs_triton
from entropyinfer.kernels.paged_kv_write_ref import check_kv_write_args, paged_kv_write_ref

__all__ = ["paged_kv_write"]


@triton.jit
def _paged_kv_write_kernel(
    k_ptr: tl.tensor,
    v_ptr: tl.tensor,
    kv_ptr: tl.tensor,
    page_ptr: tl.tensor,
    offset_ptr: tl.tensor,
    stride_kb: tl.tensor,
    stride_kh: tl.tensor,
    stride_vb: tl.tensor,
    stride_vh: tl.tensor,
    stride_pb: tl.tensor,
    stride_ph: tl.tensor,
    stride_ob: tl.tensor,
    stride_oh: tl.tensor,
    plane: tl.tensor,
    num_kv_heads: tl.tensor,
    page_size: tl.tensor,
    head_dim: tl.tensor,
    BLOCK_D: tl.constexpr,
) -> None:
    pid = tl.program_id(0)
    b = (pid // num_kv_heads).to(tl.int64)
    h = (pid % num_kv_heads).to(tl.int64)
    page = tl.load(page_ptr + b * stride_pb + h * stride_ph).to(tl.int64)
    off = tl.load(offset_ptr + b * stride_ob + h * stride_oh).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < head_dim
    dst = ((page * num_kv_heads + h) * page_size + off) * head_dim + cols
    key = tl.load(k_ptr + b * stride_kb + h * stride_kh + cols, mask=mask)
    value = tl.load(v_ptr + b * stride_vb + h * stride_vh + cols, mask=mask)
    tl.store(kv_ptr + dst, key.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(kv_ptr + plane + dst, value.to(kv_ptr.dtype.element_ty), mask=mask)


def paged_kv_write(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_pages: torch.Tensor,
    page: torch.Tensor,
    offset: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> None:
    """Write ``k, v [B, Hkv, d]`` into one layer's ``kv_pages [2, num_pages, Hkv, page_size, d]`` in place,
    at ``kv_pages[:, page[b, h], h, offset[b, h]]`` (page ids and offsets must be in range: not checked)."""
    if not runs_triton(k.device, backend) or k.numel() == 0:
        paged_kv_write_ref(k, v, kv_pages, page, offset)  # checks the arguments itself
        return
    check_kv_write_args(k, v, kv_pages, page, offset)
    if not kv_pages.is_contiguous() or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(
            "paged_kv_write: kv_pages must be contiguous, k and v need a contiguous last dimension"
        )
    batch, hkv, d = k.shape
    jit_kernel(_paged_kv_write_kernel, k.device)[(batch * hkv,)](
        k, v, kv_pages, page, offset, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        page.stride(0), page.stride(1), offset.stride(0), offset.stride(1),
        kv_pages[0].numel(), hkv, kv_pages.shape[3], d,
        BLOCK_D=triton.next_power_of_2(d), num_warps=1,
    )  # fmt: skip
