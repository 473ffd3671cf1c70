"""Sequence parallelism on GPUs (NCCL): the same greedy tokens as one GPU, and what SP does to TTFT and
decode speed, through `LLM(..., sequence_parallel_size=k)`.

A random-weight model of Llama-3-8B's shape (or `--small`: 4 layers, same heads) from a dummy checkpoint
(byte tokenizer: one character, one token), bf16. For each prompt length, policy and SP size: one request
of `--max-tokens` greedy tokens; rows carry TTFT (the request's prefill_ms), decode ms/token, whether the
tokens equal SP=1's, rank 0's peak GPU memory, and `world_size`.

Run (needs as many GPUs as the largest SP size):
    python benchmarks/sequence_parallel.py --sp 1 2 --lengths 8192 32768 --policies dense entropy
writes sequence_parallel.{json,md} to $OUT (device machine) or benchmarks/results/.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLAMA3_8B, environment, write_results

from entropyinfer import LLM, SamplingParams
from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint


def checkpoint(small: bool, max_len: int) -> Path:
    cfg: dict[str, Any] = {**LLAMA3_8B, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], max_len)
    cfg["vocab_size"] = 320  # the byte tokenizer's ids; the layers keep the 8B shape
    if small:
        cfg["num_hidden_layers"] = 4
    return write_dummy_checkpoint(Path(tempfile.mkdtemp(prefix="sp_bench_")), cfg)


def prompt(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n - 1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--policies", nargs="+", default=["dense", "entropy"])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--device", default="cuda")  # cpu: a smoke run of the script (gloo)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    folder = checkpoint(args.small, max(args.lengths) + args.max_tokens + 64)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    rows: list[dict[str, Any]] = []
    baseline: dict[tuple[int, str], list[int]] = {}
    for sp in sorted(args.sp):
        for policy in args.policies:
            try:
                llm = LLM(
                    str(folder), policy=policy, load_format="dummy", device=args.device, dtype=args.dtype,
                    tensor_parallel_size=args.tp, sequence_parallel_size=sp, kv_compression="none",
                    max_model_len=max(args.lengths) + args.max_tokens + 64, sequence_parallel_min_tokens=1024,
                )  # fmt: skip
            except Exception as e:  # e.g. fewer GPUs than ranks
                traceback.print_exc()
                rows.append({"sp": sp, "policy": policy, "error": repr(e)[:200]})
                continue
            try:
                warm = min(2048, min(args.lengths))
                llm.generate(prompt(warm, 99), SamplingParams(max_tokens=2))  # warm-up (compiles, NCCL)
                cuda = args.device == "cuda"
                for n in args.lengths:
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    out = llm.generate(prompt(n, n), params)[0]
                    key = (n, policy)
                    if sp == min(args.sp):
                        baseline[key] = out.token_ids
                    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
                    rows.append(
                        {
                            "tokens": n, "policy": policy, "tp": args.tp, "sp": sp,
                            "world_size": args.tp * sp,
                            "ttft_ms": round(out.stats["prefill_ms"], 1),
                            "decode_ms_per_token": round(out.stats["decode_ms_per_token"], 2),
                            "density": round(out.stats.get("density", 1.0), 4),
                            "split": out.stats.get("sequence_parallel_size", 1),
                            "same_tokens": out.token_ids == baseline.get(key),
                            "peak_gib_rank0": None if peak is None else round(peak, 2),
                        }
                    )  # fmt: skip
                    print(rows[-1], flush=True)
            finally:
                llm.close()
    columns = ["tokens", "policy", "tp", "sp", "world_size", "ttft_ms", "decode_ms_per_token", "density"]
    columns += ["split", "same_tokens", "peak_gib_rank0"]
    meta = {"env": environment(), "args": vars(args)}
    notes = (
        "same_tokens: greedy tokens equal the smallest SP size's. split: the SP size the prompt ran with "
        "(1: below sequence_parallel_min_tokens). Random weights: speed and agreement, not quality."
    )
    print(write_results("sequence_parallel", "Sequence parallelism (NCCL)", columns, rows, meta, notes))


if __name__ == "__main__":
    main()
