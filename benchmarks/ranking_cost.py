"""Whole-model prefill time (GPU) of the block-ranking choice on 8k-context shapes: random-weight SmolLM2-135M
(30 layers, 9 query / 3 KV heads, d=64) and Llama-3-8B at its original 8k context (32 layers, 32 / 8, d=128),
bf16, one prompt of 2k / 4k / 8k tokens, the `entropy_short` preset: dense against `ranking: box` and
`ranking: queries` at several strides (`kernels/query_ranking.py`), so the quality gain of query ranking
(recall_quality_gpu*.md) can be weighed against its profiling cost.

Run: `python benchmarks/ranking_cost.py [--lengths 2048 4096 8192] [--strides 8 4 2]`; writes
ranking_cost.{json,md} to $OUT (device machine) or benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLAMA3_8B, cuda_time, environment, write_results

from entropyinfer.policies.config import load_sparse_config
from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.attention import DensePrefill, PrefillAttention
from entropyinfer.shard.config import EngineConfig
from entropyinfer.shard.embedded import embedded_model
from entropyinfer.shard.engine import Engine
from entropyinfer.shard.sparse_attention import SparsePrefill
from entropyinfer.shard.weights import model_from_state_dict


def shapes() -> dict[str, dict[str, Any]]:
    smollm2 = embedded_model("smollm2-135m")
    assert smollm2 is not None
    small = {k: v for k, v in smollm2.expected_config.items() if k != "model_type"}
    llama8k = {**LLAMA3_8B, "max_position_embeddings": 8192}
    llama8k.pop("rope_parameters")
    llama8k["rope_theta"] = 500000.0
    return {"smollm2-135m": small, "llama3-8b-8k": llama8k}


def build(config: dict[str, Any]) -> Engine:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**config)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    arch = ModelArch.from_hf_config(cfg.to_dict())
    model = model_from_state_dict(arch, hf.state_dict(), torch.device("cuda"), torch.bfloat16)
    return Engine(model, EngineConfig(prefill_chunk_size=8192))


def prefill_ms(engine: Engine, tokens: torch.Tensor, attention: PrefillAttention) -> float:
    cache = engine.new_cache(1, tokens.shape[0] + 8)
    return cuda_time(lambda: engine.prefill(tokens, cache, 0, attention).argmax(), reps=5, warmup=2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--strides", type=int, nargs="+", default=[8, 4, 2])
    args = ap.parse_args()
    box = load_sparse_config("entropy_short", ranking="box")
    runs: list[tuple[str, Any]] = [("box", box)] + [
        (f"queries{s}", dataclasses.replace(box, ranking="queries", ranking_stride=s)) for s in args.strides
    ]
    rows: list[dict[str, Any]] = []
    for name, config in shapes().items():
        engine = build(config)
        for n in args.lengths:
            tokens = torch.randint(0, config["vocab_size"], (n,), device="cuda")
            row: dict[str, Any] = {"model": name, "tokens": n}
            try:
                row["dense_ms"] = prefill_ms(engine, tokens, DensePrefill())
                for label, cfg in runs:
                    sparse = SparsePrefill("entropy", cfg)
                    row[f"{label}_ms"] = prefill_ms(engine, tokens, sparse)
                    row[f"{label}_density"] = sparse.stats()["density"]
                    row[f"{label}_vs_dense"] = row["dense_ms"] / row[f"{label}_ms"]
            except Exception:
                row["error"] = traceback.format_exc(limit=4)
                print(row["error"], flush=True)
            rows.append(row)
            print(row, flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    command = " ".join(["python", *sys.argv])
    labels = [label for label, _ in runs]
    cols = ["model", "tokens", "dense_ms"] + [f"{x}_{k}" for x in labels for k in ("ms", "vs_dense")]
    cols += [f"{x}_density" for x in labels[:1]]
    table = write_results(
        "ranking_cost",
        "Whole-model prefill ms: box vs query ranking (entropy_short), random weights, bf16",
        cols,
        rows,
        {"env": environment(), "command": command},
        notes=f"Run: `{command}`. Median of 5 timed prefills after 2 warm-up (CUDA events); `queries<s>`: "
        "`ranking: queries` with ranking_stride s; `vs_dense`: dense ms / this ms.",
    )
    print(table)


if __name__ == "__main__":
    main()
