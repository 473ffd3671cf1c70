"""Every Triton kernel on the GPU (bf16, compiled, not interpreted) against its torch reference.

CI checks the kernels under TRITON_INTERPRET=1 in fp32/fp16; this script is the GPU-side check, run before
the speed benchmarks. Writes gpu_kernel_check.{json,md}.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results

from entropyinfer.kernels.decode_attention import decode_attention
from entropyinfer.kernels.decode_attention_ref import decode_attention_ref
from entropyinfer.kernels.paged_block_reps import paged_block_reps
from entropyinfer.kernels.paged_block_reps_ref import paged_block_reps_ref
from entropyinfer.kernels.paged_sparse_prefill import paged_sparse_prefill_attention
from entropyinfer.kernels.sparse_prefill import sparse_prefill_attention
from entropyinfer.kernels.sparse_prefill_ref import sparse_prefill_attention_ref
from entropyinfer.policies.config import load_sparse_config
from entropyinfer.policies.entropy import plan_layer

DEV = "cuda"
BF16 = torch.bfloat16


def check_decode(b: int, hq: int, hkv: int, d: int, l_max: int) -> dict[str, Any]:
    q = torch.randn(b, hq, d, device=DEV, dtype=BF16)
    k = torch.randn(b, hkv, l_max, d, device=DEV, dtype=BF16)
    v = torch.randn(b, hkv, l_max, d, device=DEV, dtype=BF16)
    lengths = torch.randint(0, l_max + 1, (b, hkv), device=DEV, dtype=torch.int32)
    lengths[0, 0] = l_max
    got = decode_attention(q, k, v, lengths).float()
    ref = decode_attention_ref(q.float(), k.float(), v.float(), lengths).float()
    return {"max_abs_err": (got - ref).abs().max().item(), "tol": 2e-2}


def check_sparse(n: int, hq: int, hkv: int, d: int, policy: str) -> dict[str, Any]:
    cfg = load_sparse_config(
        "entropy_long", segment_size=256, base_budget=512, threshold_len=1024, fixed_budget=512
    )
    q = torch.randn(hq, n, d, device=DEV, dtype=BF16)
    k = torch.randn(hkv, n, d, device=DEV, dtype=BF16)
    v = torch.randn(hkv, n, d, device=DEV, dtype=BF16)
    plan = plan_layer(q, k, cfg, policy=policy, backend="triton")
    ref_plan = plan_layer(q.float(), k.float(), cfg, policy=policy, backend="torch")
    counts = plan.counts.masked_fill(plan.dense_segments[None, :], -1)
    kw = dict(segment_size=cfg.segment_size, block_size=cfg.block_size)
    got = sparse_prefill_attention(q, k, v, plan.block_idx, counts, **kw).float()
    ref = sparse_prefill_attention_ref(q.float(), k.float(), v.float(), plan.block_idx, counts, **kw).float()
    return {
        "max_abs_err": (got - ref).abs().max().item(),
        "tol": 3e-2,
        "entropy_max_rel_err": (
            (plan.entropy - ref_plan.entropy).abs() / ref_plan.entropy.abs().clamp_min(1e-6)
        )[:, 1:]
        .max()
        .item(),
        "counts_equal_frac": (plan.counts == ref_plan.counts).float().mean().item(),
    }


def paged(*xs: torch.Tensor, page_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each ``x [Hkv, N, d]`` in a pool ``[P, Hkv, page_size, d]`` of noise, every head's pages in its own
    shuffled order (the same for all xs, as the engine's K and V pools), the last page's tail NaN (reading
    past N fails by construction) -> ``(pools, table [Hkv, per_head] int32)``."""
    hkv, n, d = xs[0].shape
    per_head = -(-n // page_size)
    order = torch.randperm(hkv * per_head + 5, device=DEV)[: hkv * per_head].reshape(hkv, per_head)
    pools = []
    for x in xs:
        pool = torch.randn(hkv * per_head + 5, hkv, page_size, d, device=DEV, dtype=x.dtype) * 50
        pad = x.new_full((hkv, per_head * page_size - n, d), float("nan"))
        rows = torch.cat([x, pad], dim=1).reshape(hkv, per_head, page_size, d)
        for h in range(hkv):
            pool[order[h], h] = rows[h]
        pools.append(pool)
    return pools, order.to(torch.int32)


def check_paged_sparse(n: int, q_offset: int, hq: int, hkv: int, d: int, page_size: int) -> dict[str, Any]:
    """A chunk ``[q_offset, n)`` of a prompt whose keys live in shuffled pages, against the contiguous
    reference of the same plan (the engine's chunked prefill with `paged_prefix_reads`)."""
    cfg = load_sparse_config(
        "entropy_long", segment_size=256, base_budget=512, threshold_len=1024, fixed_budget=512
    )
    q = torch.randn(hq, n, d, device=DEV, dtype=BF16)
    k = torch.randn(hkv, n, d, device=DEV, dtype=BF16)
    v = torch.randn(hkv, n, d, device=DEV, dtype=BF16)
    plan = plan_layer(q, k, cfg, policy="entropy", backend="triton")
    counts = plan.counts.masked_fill(plan.dense_segments[None, :], -1)
    idx, cnt = plan.block_idx, counts
    kw = dict(segment_size=cfg.segment_size, block_size=cfg.block_size, q_offset=q_offset)
    (k_pages, v_pages), table = paged(k, v, page_size=page_size)
    qc = q[:, q_offset:]
    got = paged_sparse_prefill_attention(qc, k_pages, v_pages, table, idx, cnt, kv_len=n, **kw).float()
    ref = sparse_prefill_attention_ref(qc.float(), k.float(), v.float(), idx, cnt, **kw).float()
    return {"max_abs_err": (got - ref).abs().max().item(), "tol": 3e-2}


def check_paged_reps(n: int, hkv: int, d: int, page_size: int, block_size: int) -> dict[str, Any]:
    k = torch.randn(hkv, n, d, device=DEV, dtype=BF16)
    (k_pages,), table = paged(k, page_size=page_size)
    blocks = n // block_size
    got = paged_block_reps(k_pages, table, blocks, block_size)
    ref = paged_block_reps_ref(k_pages, table, blocks, block_size)
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ref, strict=True))
    return {"max_abs_err": err, "tol": 0.0}


def main() -> None:
    torch.manual_seed(0)
    cases = [
        ("decode B1 32/8 d128 L4133", lambda: check_decode(1, 32, 8, 128, 4133)),
        ("decode B3 9/3 d64 L1000", lambda: check_decode(3, 9, 3, 64, 1000)),
        ("decode B8 32/8 d128 L32768", lambda: check_decode(8, 32, 8, 128, 32768)),
        ("sparse entropy 32/8 d128 N4196", lambda: check_sparse(4196, 32, 8, 128, "entropy")),
        ("sparse fixed 9/3 d64 N3000", lambda: check_sparse(3000, 9, 3, 64, "fixed")),
        (
            "paged sparse 32/8 d128 N8192 chunk@6144 p16",
            lambda: check_paged_sparse(8192, 6144, 32, 8, 128, 16),
        ),
        ("paged sparse 9/3 d64 N5000 chunk@2048 p64", lambda: check_paged_sparse(5000, 2048, 9, 3, 64, 64)),
        ("paged sparse 32/8 d128 N4196 chunk@0 p128", lambda: check_paged_sparse(4196, 0, 32, 8, 128, 128)),
        ("paged reps 8 d128 N32768 p16 b64", lambda: check_paged_reps(32768, 8, 128, 16, 64)),
        ("paged reps 3 d64 N5000 p8 b128", lambda: check_paged_reps(5000, 3, 64, 8, 128)),
    ]
    rows = []
    for name, fn in cases:
        row: dict[str, Any] = {"case": name}
        try:
            row.update(fn())
            row["ok"] = row["max_abs_err"] <= row["tol"]
        except Exception:
            row["ok"] = False
            row["error"] = traceback.format_exc(limit=4)[-1500:]
            print(row["error"], flush=True)
        rows.append(row)
        print(row, flush=True)
    cols = ["case", "ok", "max_abs_err", "tol", "entropy_max_rel_err", "counts_equal_frac"]
    print(
        write_results(
            "gpu_kernel_check",
            "Triton kernels vs torch references on the GPU (bf16)",
            cols,
            rows,
            {"env": environment()},
        )
    )


if __name__ == "__main__":
    main()
