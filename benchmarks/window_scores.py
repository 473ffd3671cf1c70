"""Observation-window scores of KV compression (`kernels/window_scores.py`) on the GPU: the fused kernel
against its torch reference (what compression ran before), per layer, at Llama-3-8B's attention shape
(8 KV heads x 4 query heads, d=128, the default 32-query window), bf16, 32k and 128k keys; then a sweep of
the kernel's launch shapes (`Tiles`) at 128k. ``triton.testing.do_bench`` medians.

    python benchmarks/window_scores.py           # GPU; results/window_scores.{json,md}
    python benchmarks/window_scores.py --smoke   # CPU, interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results

from entropyinfer.kernels import window_scores as ws
from entropyinfer.kernels.window_scores_ref import window_scores_ref


def bench(fn, smoke: bool) -> float:  # type: ignore[no-untyped-def]
    if smoke:
        fn()
        return 0.0
    import triton

    return float(triton.testing.do_bench(fn, warmup=5, rep=40))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    dev, dt = ("cpu", torch.float32) if a.smoke else ("cuda", torch.bfloat16)
    backend = "triton"
    h, g, w, d = 8, 4, 32, (16 if a.smoke else 128)
    sizes = [300] if a.smoke else [32768, 131072]
    rows = []
    for n in sizes:
        q = torch.randn(h, g, w, d, device=dev).to(dt)
        k = torch.randn(h, n, d, device=dev).to(dt)
        lens = torch.full((h,), n, device=dev)
        got, want = ws.window_scores(q, k, lens, backend=backend), window_scores_ref(q, k, lens)
        err = float((got - want).abs().max())
        kernel = bench(functools.partial(ws.window_scores, q, k, lens, backend=backend), a.smoke)
        ref = bench(functools.partial(window_scores_ref, q, k, lens), a.smoke)
        rows.append({"keys": n, "tiles": "default", "kernel_ms": round(kernel, 3),
                     "reference_ms": round(ref, 3), "speedup": round(ref / kernel, 1) if kernel else None,
                     "max_abs_err": err})  # fmt: skip
        print(rows[-1], flush=True)
    default = dataclasses.replace(ws.TILES)
    sweep = [dict(block_s=b, keys_per_split=ks, probs_keys=pk, lse_warps=nw, probs_warps=nw)
             for b in (64, 128) for ks in (1024, 4096) for pk in (512, 2048) for nw in (4, 8)]  # fmt: skip
    for tiles in sweep[:2] if a.smoke else sweep:
        for key, value in tiles.items():
            setattr(ws.TILES, key, value)
        try:
            t = bench(functools.partial(ws.window_scores, q, k, lens, backend=backend), a.smoke)
            rows.append({"keys": sizes[-1], "tiles": str(tiles), "kernel_ms": round(t, 3)})
        except Exception as e:  # a tile shape the compiler refuses: recorded, the sweep goes on
            rows.append({"keys": sizes[-1], "tiles": str(tiles), "error": str(e)[:200]})
        print(rows[-1], flush=True)
    for key, value in dataclasses.asdict(default).items():
        setattr(ws.TILES, key, value)
    meta = {"env": environment(), "command": " ".join(sys.argv), "shape": dict(h=h, g=g, w=w, d=d),
            "default_tiles": dataclasses.asdict(default)}  # fmt: skip
    cols = ["keys", "tiles", "kernel_ms", "reference_ms", "speedup", "max_abs_err"]
    print(
        write_results("window_scores", "Observation-window scores: fused kernel vs torch", cols, rows, meta)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
