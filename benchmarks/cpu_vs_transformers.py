"""The engine core's CPU path against transformers, side by side in one process: prefill and decode of one
prompt (SmolLM2-135M fp32 by default, a 4096-token prompt) through `EngineCore` (scheduler, paged KV,
paged decode) and through transformers' `LlamaForCausalLM` loaded from the same converted checkpoint
(SDPA attention, its DynamicCache), both greedy, same threads, our prefix cache off (the same prompt runs
again and again). Runs alternate (ours, theirs, ours, ...), each after one untimed run of its own; the
table gives the median of `--reps` runs and the fastest and slowest, and whether both produced the same
greedy tokens.

    python benchmarks/cpu_vs_transformers.py                  # 2-core CPU: about 4 minutes
    python benchmarks/cpu_vs_transformers.py --tokens 512 --new 8 --reps 1   # smoke
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results

from entropyinfer.shard.engine_core import TokenDelta
from entropyinfer.shard.llm import LLM
from entropyinfer.shard.sampling import SamplingParams
from entropyinfer.shard.sequence import SequenceRequest


def prompt_ids(llm: LLM, n: int, seed: int = 0) -> list[int]:
    """n token ids of plain English-like text (the tokenizer's own ids, so both models see real tokens)."""
    rng = random.Random(seed)
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "house", "river", "city", "long", "short", "green",
             "blue", "ran", "walked", "said"]  # fmt: skip
    ids: list[int] = []
    while len(ids) < n:
        ids = llm.encode(" ".join(rng.choice(words) for _ in range(2 * n)))
    return ids[:n]


Run = tuple[float, float, float, float, list[int]]  # prefill s, decode ms/token (wall, then CPU), tokens


class Clock:
    """Wall and CPU (this process, all threads) seconds since the last `lap`."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return out


def run_ours(llm: LLM, ids: list[int], new: int) -> Run:
    """Through the engine core, one request: prefill = until its first token, decode = the rest."""
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    core = llm.core
    core.add_request(SequenceRequest("bench", "", ids, params, "dense", llm.config.sparse, None))
    clock, tokens = Clock(), []
    while not tokens:
        tokens += [e.token_id for e in core.step() if isinstance(e, TokenDelta)]
    pre_wall, pre_cpu = clock.lap()
    while core.has_unfinished():
        tokens += [e.token_id for e in core.step() if isinstance(e, TokenDelta)]
    wall, cpu = clock.lap()
    n = max(len(tokens) - 1, 1)
    return pre_wall, wall * 1e3 / n, pre_cpu, cpu * 1e3 / n, tokens


@torch.inference_mode()
def run_hf(model: Any, ids: list[int], new: int) -> Run:
    """Through transformers: prefill = the prompt's forward and its first token, decode = the rest."""
    clock = Clock()
    out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
    token = int(out.logits[0, -1].argmax())
    pre_wall, pre_cpu = clock.lap()
    past, tokens = out.past_key_values, [token]
    for _ in range(new - 1):
        out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past, token = out.past_key_values, int(out.logits[0, -1].argmax())
        tokens.append(token)
    wall, cpu = clock.lap()
    n = max(new - 1, 1)
    return pre_wall, wall * 1e3 / n, pre_cpu, cpu * 1e3 / n, tokens


def summary(engine: str, runs: list[Run], n: int) -> dict[str, Any]:
    pre, dec = [r[0] for r in runs], [r[1] for r in runs]
    return {
        "engine": engine,
        "prompt_tokens": n,
        "prefill_s": round(statistics.median(pre), 2),
        "prefill_s_range": f"{min(pre):.2f}-{max(pre):.2f}",
        "decode_ms_per_token": round(statistics.median(dec), 1),
        "decode_ms_range": f"{min(dec):.1f}-{max(dec):.1f}",
        "prefill_cpu_s": round(statistics.median(r[2] for r in runs), 2),
        "decode_cpu_ms_per_token": round(statistics.median(r[3] for r in runs), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    # the prompt repeats run after run: without the prefix cache, every run prefills all of it
    llm = LLM(args.model, device="cpu", dtype="float32", enable_prefix_caching=False)
    hf = AutoModelForCausalLM.from_pretrained(str(llm.checkpoint), dtype=torch.float32).eval()
    ids = prompt_ids(llm, args.tokens)
    run_ours(llm, ids, 4)  # untimed runs of each
    run_hf(hf, ids, 4)
    load = [round(os.getloadavg()[0], 1)]  # other processes on the machine (1-minute load average)
    ours, theirs = [], []
    for _ in range(args.reps):
        ours.append(run_ours(llm, ids, args.new))
        theirs.append(run_hf(hf, ids, args.new))
        print("ours", ours[-1][:4], "transformers", theirs[-1][:4], flush=True)
    load.append(round(os.getloadavg()[0], 1))
    rows = [summary("entropyinfer core", ours, len(ids)), summary("transformers", theirs, len(ids))]
    same = ours[-1][4] == theirs[-1][4]
    for r in rows:
        r["same_greedy_tokens"] = same
    ratio = {
        key: rows[0][key] / rows[1][key]
        for key in ("prefill_s", "decode_ms_per_token", "prefill_cpu_s", "decode_cpu_ms_per_token")
    }
    env = environment() | {"threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    command = " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    meta = {"env": env, "command": command, "new_tokens": args.new, "reps": args.reps, "load_average": load,
            "ours_over_transformers": {k: round(v, 3) for k, v in ratio.items()}}  # fmt: skip
    columns = ["engine", "prompt_tokens", "prefill_s", "prefill_s_range", "decode_ms_per_token",
               "decode_ms_range", "prefill_cpu_s", "decode_cpu_ms_per_token",
               "same_greedy_tokens"]  # fmt: skip
    r = {k: f"{v:.2f}x" for k, v in ratio.items()}
    notes = (
        f"Ours / transformers: prefill {r['prefill_s']}, decode {r['decode_ms_per_token']} the wall time; "
        f"{r['prefill_cpu_s']} and {r['decode_cpu_ms_per_token']} the CPU time (process time of all "
        "threads, steadier than wall time on a loaded machine at one thread). Median of "
        f"{args.reps} alternating runs, {args.new} greedy tokens each, after one untimed run each. Load "
        f"average (1 min) before / after the timed runs: {load[0]} / {load[1]} on {os.cpu_count()} CPUs. "
        f"Command: `{command}`."
    )
    title = "CPU: the engine core against transformers (same checkpoint, fp32)"
    print(write_results("cpu_vs_transformers", title, columns, rows, meta, notes))


if __name__ == "__main__":
    main()
