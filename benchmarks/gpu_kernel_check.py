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


def main() -> None:
    torch.manual_seed(0)
    cases = [
        ("decode B1 32/8 d128 L4133", lambda: check_decode(1, 32, 8, 128, 4133)),
        ("decode B3 9/3 d64 L1000", lambda: check_decode(3, 9, 3, 64, 1000)),
        ("decode B8 32/8 d128 L32768", lambda: check_decode(8, 32, 8, 128, 32768)),
        ("sparse entropy 32/8 d128 N4196", lambda: check_sparse(4196, 32, 8, 128, "entropy")),
        ("sparse fixed 9/3 d64 N3000", lambda: check_sparse(3000, 9, 3, 64, "fixed")),
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
