"""One attention layer (Llama-3-8B shape: 32 query / 8 KV heads, d=128, bf16, random data) at 32k / 64k /
128k: entropy-sparse prefill (profiling included) and the fixed-budget baseline against dense cuDNN SDPA and
dense FlashAttention-2 SDPA, with density, rigid-head fraction and the profiling / attention time split.
Writes sparse_layer.{json,md}; with `--ranking-strides 8 16 32` also `ranking: queries` at those strides
(`kernels/query_ranking.py`), into sparse_layer_ranking.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results

from entropyinfer.kernels.sparse_prefill import sparse_prefill_attention
from entropyinfer.policies.config import load_sparse_config
from entropyinfer.policies.entropy import plan_density, plan_layer

HQ, HKV, D = 32, 8, 128


def sdpa_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Any) -> float:
    from torch.nn.attention import sdpa_kernel

    ke, ve = k.repeat_interleave(HQ // HKV, 0)[None], v.repeat_interleave(HQ // HKV, 0)[None]
    with sdpa_kernel([backend]):
        return do_bench(lambda: F.scaled_dot_product_attention(q[None], ke, ve, is_causal=True), rep=200)


def graphed_ms(fn: Any) -> float:
    """GPU time of `fn` alone: replay of a CUDA graph of it (no host launch cost)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, rep=200)


def sparse_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: str, cfg: Any) -> dict[str, Any]:
    n = q.shape[1]

    def plan() -> Any:
        return plan_layer(q, k, cfg, policy=policy, backend="triton")

    p = plan()
    kw = dict(segment_size=cfg.segment_size, block_size=cfg.block_size)

    def attend() -> Any:
        return sparse_prefill_attention(q, k, v, p.block_idx, p.kernel_counts, **kw)

    def both() -> Any:
        pl = plan()
        return sparse_prefill_attention(q, k, v, pl.block_idx, pl.kernel_counts, **kw)

    density = plan_density(p.counts, p.dense_segments, n, cfg.segment_size, cfg.block_size)
    attn_ms = do_bench(attend, rep=200)
    total_ms = do_bench(both, rep=200)
    flops = 4 * D * HQ * density * n * (n + 1) / 2
    out = {
        "profile_ms": do_bench(plan, rep=200),
        "attn_ms": attn_ms,
        "total_ms": total_ms,
        "density": density,
        "rigid_fraction": p.rigid.float().mean().item(),
        "attn_tflops": flops / attn_ms / 1e9,
    }
    try:
        out["profile_gpu_ms"] = graphed_ms(plan)
        out["total_graphed_ms"] = graphed_ms(both)
    except Exception:
        out["graph_error"] = traceback.format_exc(limit=3)
        print(out["graph_error"], flush=True)
    return out


def main() -> None:
    from torch.nn.attention import SDPBackend

    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument(
        "--ranking-strides", type=int, nargs="*", default=[],
        help="also time `ranking: queries` at these ranking_stride values (rows entropy_queries<s>_*, ...)",
    )  # fmt: skip
    args = ap.parse_args()
    cfg = load_sparse_config("entropy_long")
    runs = [(p, p, cfg) for p in ("entropy", "fixed")] + [
        (f"{p}_queries{st}", p, dataclasses.replace(cfg, ranking="queries", ranking_stride=st))
        for st in args.ranking_strides
        for p in ("entropy", "fixed")
    ]
    rows = []
    for n in args.lengths:
        torch.manual_seed(0)
        q = torch.randn(HQ, n, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(HKV, n, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(HKV, n, D, device="cuda", dtype=torch.bfloat16)
        row: dict[str, Any] = {"tokens": n}
        for name, backend in (
            ("cudnn_ms", SDPBackend.CUDNN_ATTENTION),
            ("fa2_ms", SDPBackend.FLASH_ATTENTION),
        ):
            try:
                row[name] = sdpa_ms(q, k, v, backend)
            except Exception:
                row[name + "_error"] = traceback.format_exc(limit=2)
        for policy, rule, run_cfg in runs:
            try:
                r = sparse_ms(q, k, v, rule, run_cfg)
                row.update({f"{policy}_{key}": val for key, val in r.items()})
                if "cudnn_ms" in row:
                    row[f"{policy}_vs_cudnn"] = row["cudnn_ms"] / r["total_ms"]
                if "fa2_ms" in row:
                    row[f"{policy}_vs_fa2"] = row["fa2_ms"] / r["total_ms"]
                row[f"{policy}_profile_share"] = r["profile_ms"] / r["total_ms"]
                if "profile_gpu_ms" in r:
                    row[f"{policy}_profile_gpu_share"] = r["profile_gpu_ms"] / r["total_ms"]
            except Exception:
                row[policy + "_error"] = traceback.format_exc(limit=4)
                print(row[policy + "_error"], flush=True)
        rows.append(row)
        print(row, flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    cols = [
        "tokens",
        "cudnn_ms",
        "fa2_ms",
        "entropy_total_ms",
        "entropy_profile_ms",
        "entropy_attn_ms",
        "entropy_vs_cudnn",
        "entropy_vs_fa2",
        "entropy_profile_share",
        "entropy_profile_gpu_ms",
        "entropy_profile_gpu_share",
        "entropy_total_graphed_ms",
        "entropy_density",
        "entropy_rigid_fraction",
        "entropy_attn_tflops",
        "fixed_total_ms",
        "fixed_vs_cudnn",
        "fixed_density",
    ]
    for name, _, _ in runs[2:]:  # query ranking: its whole time, its profiling and its speed-up
        cols += [f"{name}_total_ms", f"{name}_profile_ms", f"{name}_vs_cudnn"]
    name = "sparse_layer" if not args.ranking_strides else "sparse_layer_ranking"
    meta = {
        "env": environment(),
        "shape": "32 q / 8 KV heads, d=128, bf16, random data, batch 1, causal",
        "config": vars(cfg) if hasattr(cfg, "__dict__") else str(cfg),
    }
    print(write_results(name, "One attention layer: entropy-sparse vs dense", cols, rows, meta))


if __name__ == "__main__":
    main()
