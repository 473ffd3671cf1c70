"""Whole-model benchmark (GPU): time to first token and decode ms/token, random-weight Llama-3-8B shape,
at 32k / 64k / 128k tokens: this engine's dense path, its entropy-sparse prefill, and Hugging Face
transformers (eager, SDPA), in one run.

Both engines share the same weight tensors (ours wraps transformers' state dict, no copy).
Run: `python benchmarks/ttft_decode.py [--lengths 32768 65536 131072]`; writes
ttft_decode.{json,md} to $OUT (device machine) or benchmarks/results/.
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLAMA3_8B, cuda_time, decode_ms, environment, write_results

from entropyinfer.policies.config import load_sparse_config
from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.attention import DensePrefill, PrefillAttention
from entropyinfer.shard.config import EngineConfig
from entropyinfer.shard.engine import Engine
from entropyinfer.shard.sparse_attention import SparsePrefill
from entropyinfer.shard.sparse_warm_up import warm_up_sparse_prefill
from entropyinfer.shard.weights import model_from_state_dict


def build_models() -> tuple[Any, Engine]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**LLAMA3_8B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    arch = ModelArch.from_hf_config(cfg.to_dict())
    ours = model_from_state_dict(arch, hf.state_dict(), torch.device("cuda"), torch.bfloat16)
    return hf, Engine(ours, EngineConfig(prefill_chunk_size=8192))


def ours_ttft(
    engine: Engine,
    tokens: torch.Tensor,
    extra: int,
    attention: PrefillAttention | None = None,
    reps: int = 1,
    warmup: int = 0,
) -> tuple[float, Any]:
    """Median prefill time (ms) over `reps` runs after `warmup` untimed ones, and (cache, first token)."""
    cache = engine.new_cache(1, tokens.shape[0] + extra)
    holder: dict[str, Any] = {}

    def run() -> None:
        holder["tok"] = engine.prefill(tokens, cache, 0, attention or DensePrefill()).argmax()

    return cuda_time(run, reps=reps, warmup=warmup), (cache, holder["tok"])


def ours_decode(engine: Engine, cache: Any, first: torch.Tensor, n: int, steps: int) -> float:
    return decode_ms(engine, cache, first.view(1).long(), torch.tensor([n], device="cuda"), steps)


@torch.inference_mode()
def hf_ttft_decode(hf: Any, tokens: torch.Tensor, steps: int) -> tuple[float, float | None]:
    holder: dict[str, Any] = {}

    def prefill() -> None:
        out = hf(tokens[None], use_cache=True, logits_to_keep=1)
        holder["pkv"], holder["tok"] = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)

    ttft = cuda_time(prefill, warmup=1)  # after an untimed run at this length, as ours
    if steps <= 0:
        return ttft, None
    pkv, tok = holder.pop("pkv"), holder.pop("tok")

    def step() -> None:
        nonlocal tok
        out = hf(tok, past_key_values=pkv, use_cache=True)
        tok = out.logits[0, -1].argmax().view(1, 1)

    step()
    return ttft, cuda_time(lambda: [step() for _ in range(steps)]) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--hf-decode-steps", type=int, default=8)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument(
        "--reps", type=int, default=2, help="timed prefills per length (median), after one untimed"
    )
    args = ap.parse_args()

    hf, engine = build_models()
    warm = torch.randint(0, LLAMA3_8B["vocab_size"], (4096,), device="cuda")
    ours_ttft(engine, warm, 8)
    try:  # as LLM does when it loads: compile the sparse kernels for every size class
        a = engine.arch
        warm_up_sparse_prefill(
            load_sparse_config("entropy_long"), a.num_heads, a.num_kv_heads, a.head_dim,
            a.max_position_embeddings, engine.device, engine.dtype,
        )  # fmt: skip
    except Exception:
        traceback.print_exc()
    if not args.skip_hf:
        hf_ttft_decode(hf, warm, 0)
    rows: list[dict[str, Any]] = []
    for n in args.lengths:
        tokens = torch.randint(0, LLAMA3_8B["vocab_size"], (n,), device="cuda")
        row: dict[str, Any] = {"tokens": n}
        try:
            torch.cuda.reset_peak_memory_stats()
            ttft, (cache, first) = ours_ttft(engine, tokens, args.decode_steps + 8, reps=args.reps, warmup=1)
            row["ours_ttft_s"] = ttft / 1e3
            row["ours_decode_ms"] = ours_decode(engine, cache, first, n, args.decode_steps)
            row["ours_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            del cache
        except Exception:
            row["ours_error"] = traceback.format_exc(limit=3)
            print(row["ours_error"], flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        try:
            sparse = SparsePrefill("entropy", load_sparse_config("entropy_long"))
            ttft, (cache, _) = ours_ttft(engine, tokens, 8, sparse, reps=args.reps, warmup=1)
            row["entropy_ttft_s"] = ttft / 1e3
            row["entropy_density"] = sparse.stats()["density"]
            if "ours_ttft_s" in row:
                row["entropy_speedup"] = row["ours_ttft_s"] / row["entropy_ttft_s"]
            del cache
        except Exception:
            row["entropy_error"] = traceback.format_exc(limit=3)
            print(row["entropy_error"], flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        if not args.skip_hf:
            try:
                torch.cuda.reset_peak_memory_stats()
                ttft, dec = hf_ttft_decode(hf, tokens, args.hf_decode_steps if n == max(args.lengths) else 0)
                row["hf_ttft_s"] = ttft / 1e3
                row["hf_decode_ms"] = dec
                row["hf_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            except Exception:
                row["hf_error"] = traceback.format_exc(limit=3)
                print(row["hf_error"], flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        if "ours_ttft_s" in row and "hf_ttft_s" in row:
            row["ttft_speedup"] = row["hf_ttft_s"] / row["ours_ttft_s"]
        rows.append(row)
        print(row, flush=True)
    meta = {
        "env": environment(),
        "model": "Llama-3-8B shape, random weights, bf16, batch 1",
        "ours": "layer-wise prefill, chunk 8192, cuDNN SDPA; decode Triton split-K kernel in a CUDA graph",
        "entropy": "entropy_long preset (S=512, b=8, B0=2048, threshold 4096), per-head budgets",
        "hf": "transformers eager, attn_implementation=sdpa, DynamicCache",
    }
    cols = [
        "tokens",
        "ours_ttft_s",
        "hf_ttft_s",
        "ttft_speedup",
        "entropy_ttft_s",
        "entropy_density",
        "entropy_speedup",
        "ours_decode_ms",
        "hf_decode_ms",
        "ours_peak_gb",
        "hf_peak_gb",
    ]
    print(
        write_results("ttft_decode", "TTFT and decode, Llama-3-8B shape (random weights)", cols, rows, meta)
    )


if __name__ == "__main__":
    main()
