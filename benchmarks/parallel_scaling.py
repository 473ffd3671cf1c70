"""Tensor- and sequence-parallel scaling (issue 11 item 6): TTFT at 128k / 256k / 512k / 1M tokens for each
TP and SP size the machine holds, dense against entropy, decode tokens/s, scaling efficiency against one GPU,
peak memory per GPU; results JSON with a `world_size` field.

The model: random weights of Llama-3-8B's shape (32 layers, 32 query / 8 KV heads) made a 1M-context config
(`max_position_embeddings` 1048576 + room for the generated tokens, plain RoPE with theta 2.8e9, the
1048k stage of Gradient's public Llama-3-8B-Instruct-Gradient-1048k; the byte tokenizer: one character,
one token), bf16, through `LLM(..., tensor_parallel_size=tp, sequence_parallel_size=sp)`: rank 0 here, the
other ranks as local processes (`shard/parallel/launch.py: LocalRanks`, NCCL), no torchrun.

Per shape (tp x sp) and policy: one LLM, a 2k-token warm-up request, then one request per length of
`--max-tokens` greedy tokens. A row: TTFT (the request's prefill_ms, CUDA-synchronised), decode ms/token
and tokens/s, density and the straggler (the densest rank's attention work over the mean rank's), the SP
size the prompt ran with, whether the tokens equal the first shape's (the
same weights: dummy weights are seeded per tensor), the peak GPU memory of every rank (GiB, from the
ranks' own `torch.cuda.max_memory_allocated`, reset before each request), speedup and scaling efficiency
(``ttft(1 GPU) / (ttft * world_size)``) against the one-GPU row of the same length and policy (from this
run, or from `--baseline`, a previous run's JSON). A shape that needs more GPUs than the machine has is
listed as skipped; a length that fails (out of memory) is a row with its error and the next length runs.

Runs (device machine, `$OUT` gets parallel_scaling.{json,md}; else benchmarks/results/):
    python benchmarks/parallel_scaling.py --shapes 1x1                   # one GPU: the baselines
    python benchmarks/parallel_scaling.py --shapes 2x1 4x1 8x1 1x2 1x4 1x8 \
        --baseline benchmarks/results/parallel_scaling.json --name parallel_scaling_multi
    python benchmarks/parallel_scaling.py --smoke                        # CPU / gloo, tiny model, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLAMA3_8B, environment, write_results

from entropyinfer import LLM, SamplingParams
from entropyinfer.errors import ConfigError
from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint
from entropyinfer.shard.parallel.all_to_all import check_sequence_parallel
from entropyinfer.shard.parallel.heads import check_heads

LENGTHS = [131072, 262144, 524288, 1048576]
SHAPES = [
    "1x1",
    "2x1",
    "4x1",
    "8x1",
    "1x2",
    "1x4",
    "1x8",
]  # tp x sp: the TP = 1, 2, 4, 8 and SP = 2, 4, 8
ROPE_1M = {"rope_type": "default", "rope_theta": 2.8e9}  # Gradient 1048k's last stage (model card: 2.80B)
SMOKE = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=4, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip
SMOKE_SPARSE = dict(segment_size=64, block_size=8, threshold_len=64, base_budget=32, fixed_budget=32)


def checkpoint(smoke: bool, context: int, layers: int | None) -> Path:
    base: dict[str, Any] = dict(SMOKE) if smoke else {**LLAMA3_8B, "vocab_size": 320}  # byte tokenizer ids
    cfg = {**base, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    cfg["max_position_embeddings"] = context
    cfg["rope_parameters"] = dict(ROPE_1M)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return write_dummy_checkpoint(Path(tempfile.mkdtemp(prefix="parallel_scaling_")), cfg)


def prompt(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n - 1))


def parse_shape(text: str) -> tuple[int, int]:
    tp, sp = text.lower().split("x")
    return int(tp), int(sp)


def rank_peaks(llm: LLM, reset: bool) -> list[float] | None:
    """Every rank's peak GPU memory in GiB since the last reset (rank order), None on the CPU."""
    if not torch.cuda.is_available():
        return None
    if llm.executor is None:  # one rank: this process
        peak = torch.cuda.max_memory_allocated() / 2**30
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return [round(peak, 2)]
    return [round(b / 2**30, 2) for b in llm.executor.peak_memory(reset=reset)]


def straggler(stats: dict[str, Any]) -> float | None:
    """The densest rank's attention work over the mean rank's (1.0: balanced), from the per-rank densities
    of the request's stats (TP ranks, or the SP ranks of rank 0's TP rank); None on one rank / dense."""
    per = stats.get("density_per_sp_rank") or stats.get("density_per_tp_rank")
    if not per or sum(per) <= 0:
        return None
    return round(max(per) / (sum(per) / len(per)), 3)


def baseline_rows(path: str | None) -> dict[tuple[int, str], dict[str, Any]]:
    if not path or not Path(path).exists():
        return {}
    rows = json.loads(Path(path).read_text())["rows"]
    return {(r["tokens"], r["policy"]): r for r in rows if r.get("world_size") == 1 and "ttft_ms" in r}


def run_shape(
    folder: Path, tp: int, sp: int, policy: str, args: argparse.Namespace, context: int
) -> list[dict[str, Any]]:
    extra: dict[str, Any] = {}
    if args.smoke:
        extra = dict(SMOKE_SPARSE, sequence_parallel_min_tokens=512, kv_page_size=8, warm_up_kernels=False)
    else:
        extra = dict(sequence_parallel_min_tokens=args.sp_min_tokens)
    shape = {"tp": tp, "sp": sp, "world_size": tp * sp, "policy": policy}
    t0 = time.perf_counter()
    try:
        llm = LLM(
            str(folder), policy=policy, load_format="dummy", device=args.device, dtype=args.dtype,
            tensor_parallel_size=tp, sequence_parallel_size=sp, kv_compression="none", max_model_len=context,
            **extra,
        )  # fmt: skip
    except Exception as e:  # too few GPUs, out of memory at start
        traceback.print_exc()
        return [{**shape, "error": repr(e)[:300]}]
    start_s = time.perf_counter() - t0
    rows = []
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    try:
        llm.generate(prompt(min(2048, min(args.lengths)), 99), SamplingParams(max_tokens=2))  # warm-up
        for n in args.lengths:
            row: dict[str, Any] = {"tokens": n, **shape, "start_s": round(start_s, 1)}
            try:
                rank_peaks(llm, reset=True)
                out = llm.generate(prompt(n, n), params)[0]
                ms = out.stats["decode_ms_per_token"]
                row.update(
                    ttft_ms=round(out.stats["prefill_ms"], 1),
                    decode_ms_per_token=round(ms, 2),
                    decode_tok_s=round(1e3 / ms, 1) if ms else None,
                    density=round(out.stats.get("density", 1.0), 4),
                    split=out.stats.get("sequence_parallel_size", 1),
                    straggler=straggler(out.stats),
                    token_ids=out.token_ids,
                )
                peaks = rank_peaks(llm, reset=False)
                row["peak_gib_per_rank"], row["peak_gib_max"] = peaks, (max(peaks) if peaks else None)
            except Exception as e:  # out of memory at this length: record it, try the next
                traceback.print_exc()
                row["error"] = repr(e)[:300]
                if llm.executor is not None and llm.executor.broken:
                    rows.append(row)
                    break
            rows.append(row)
            print({k: v for k, v in row.items() if k != "token_ids"}, flush=True)
    finally:
        llm.close()
    return rows


def add_scaling(rows: list[dict[str, Any]], baseline: dict[tuple[int, str], dict[str, Any]]) -> None:
    """speedup / scaling efficiency against the one-GPU row of the same length and policy; same_tokens
    against the first row that has tokens for that length and policy."""
    ones = {(r["tokens"], r["policy"]): r for r in rows if r.get("world_size") == 1 and "ttft_ms" in r}
    ones = {**baseline, **ones}
    first: dict[tuple[int, str], list[int]] = {}
    for r in rows:
        if "ttft_ms" not in r:
            continue
        key = (r["tokens"], r["policy"])
        one = ones.get(key)
        if one is not None:
            r["speedup"] = round(one["ttft_ms"] / r["ttft_ms"], 2)
            r["scaling_efficiency"] = round(one["ttft_ms"] / (r["ttft_ms"] * r["world_size"]), 3)
        ids = r.pop("token_ids", None)
        if ids is not None and key not in first:  # the baseline's tokens (another run's), else these
            base = one.get("tokens_out") if one is not None else None
            first[key] = base if base is not None else ids
        r["same_tokens"] = None if ids is None else ids == first[key]
        r["tokens_out"] = ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="tp x sp, e.g. 1x1 2x1 1x4")
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--policies", nargs="+", default=["dense", "entropy"])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the 8B shape (a quick look)")
    ap.add_argument("--sp-min-tokens", type=int, default=65536)
    ap.add_argument("--baseline", default=None, help="a previous run's JSON with the one-GPU rows")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--name", default="parallel_scaling")
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, a tiny model, 1x1 2x1 1x2 2x2")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.dtype = "cpu", "float32"
        args.lengths = args.lengths or [600, 1200]
        args.max_tokens = min(args.max_tokens, 4)
        if args.shapes == SHAPES:
            args.shapes = ["1x1", "2x1", "1x2", "2x2"]
        if args.name == "parallel_scaling":
            args.name = "parallel_scaling_smoke"
    args.lengths = args.lengths or LENGTHS
    context = max(args.lengths) + args.max_tokens + 64  # max_model_len: no pages / warm-up beyond it
    folder = checkpoint(args.smoke, max(context, 4096 if args.smoke else 1048576 + 1024), args.layers)
    gpus = torch.cuda.device_count() if args.device == "cuda" else 64
    shape_of: dict[str, Any] = SMOKE if args.smoke else LLAMA3_8B
    heads = int(shape_of["num_attention_heads"]), int(shape_of["num_key_value_heads"])
    rows: list[dict[str, Any]] = []
    for text in args.shapes:
        tp, sp = parse_shape(text)
        try:
            check_heads(heads[0], heads[1], tp)
            check_sequence_parallel(heads[1], tp, sp)
        except ConfigError as e:
            rows.append({"tp": tp, "sp": sp, "world_size": tp * sp, "skipped": str(e)[:200]})
            continue
        if tp * sp > gpus:
            rows.append(
                {"tp": tp, "sp": sp, "world_size": tp * sp, "skipped": f"needs {tp * sp} GPUs, {gpus} here"}
            )
            continue
        for policy in args.policies:
            rows += run_shape(folder, tp, sp, policy, args, context)
            gc.collect()  # the closed LLM's pool, before the next one sizes its own from free memory
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            report(rows, args, gpus, context)  # after every shape: a command that times out keeps its rows
    print(report(rows, args, gpus, context))


def report(rows: list[dict[str, Any]], args: argparse.Namespace, gpus: int, context: int) -> str:
    rows = [dict(r) for r in rows]
    add_scaling(rows, baseline_rows(args.baseline))
    columns = ["tokens", "policy", "tp", "sp", "world_size", "ttft_ms", "speedup", "scaling_efficiency"]
    columns += ["decode_tok_s", "density", "straggler", "split", "same_tokens", "peak_gib_max"]
    columns += ["peak_gib_per_rank"]
    meta = {"env": environment(), "args": vars(args), "gpus": gpus, "max_model_len": context}
    notes = (
        "TTFT: the request's prefill_ms (prefill plus the first token's logits). scaling_efficiency = "
        "ttft(1 GPU) / (ttft x world_size), against the one-GPU row of the same length and policy. split: "
        "the SP size the prompt ran with (1: below sequence_parallel_min_tokens). same_tokens: greedy tokens "
        "equal the first row's of that length and policy. peak_gib_per_rank: each rank's "
        "torch.cuda.max_memory_allocated during the request. straggler: the densest rank's share of the "
        "attention work over the mean rank's (entropy budgets differ per head; heads are not rebalanced). "
        "Random weights: speed, memory and agreement, not quality. Rows with `skipped` / `error` did not run."
    )
    return write_results(args.name, "Tensor / sequence parallel scaling", columns, rows, meta, notes)


if __name__ == "__main__":
    main()
