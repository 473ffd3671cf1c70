"""The engine core on one GPU: TTFT and decode ms/token through `LLM.generate` (scheduler, paged KV, paged
decode kernel), random-weight Llama-3-8B shape, bf16; batch 1 at each `--tokens` length and `--batch`
concurrent requests at `--batch-tokens`. Each configuration is timed after one untimed run of itself.
Compare with `ttft_decode.json` (the pre-core path: contiguous cache, CUDA-graph decode).

    python benchmarks/core_decode.py                # H200
    python benchmarks/core_decode.py --smoke        # CPU, tiny model
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLAMA3_8B, environment, write_results

from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint
from entropyinfer.shard.llm import LLM
from entropyinfer.shard.sampling import SamplingParams

LLAMA = dict(LLAMA3_8B, model_type="llama", architectures=["LlamaForCausalLM"])
TINY = dict(LLAMA, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=4096)  # fmt: skip


def text(n: int, seed: int) -> str:
    """About n tokens of the byte-level tokenizer (one byte = one token)."""
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghij ") for _ in range(n - 2))


def run(llm: LLM, prompts: list[str], policy: str, new: int) -> dict[str, Any]:
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    llm.generate(prompts, params, policy=policy)  # untimed run of the same shape
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, policy=policy)
    wall = time.perf_counter() - t0
    s = outs[0].stats
    return {
        "policy": policy,
        "batch": len(prompts),
        "prompt_tokens": s["prompt_tokens"],
        "prefill_ms": round(float(s["prefill_ms"]), 1),
        "decode_ms_per_token": round(float(s["decode_ms_per_token"]), 2),
        "density": round(float(s.get("density", 1.0)), 3),
        "wall_s": round(wall, 2),
        "tokens_out": sum(len(o.token_ids) for o in outs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--policies", nargs="+", default=["dense", "entropy"])
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.tokens, args.batch_tokens, args.new, args.batch = [1500], 600, 4, 3
    folder = write_dummy_checkpoint(tempfile.mkdtemp(), TINY if args.smoke else LLAMA)
    device = "cpu" if args.smoke else "cuda"
    llm = LLM(str(folder), load_format="dummy", device=device, warm_up_kernels=False)
    rows = []
    for policy in args.policies:
        for n in args.tokens:
            rows.append(run(llm, [text(n, 0)], policy, args.new))
            print(rows[-1], flush=True)
        prompts = [text(args.batch_tokens, i) for i in range(args.batch)]
        rows.append(run(llm, prompts, policy, args.new))
        print(rows[-1], flush=True)
    columns = ["policy", "batch", "prompt_tokens", "prefill_ms", "decode_ms_per_token", "density", "wall_s"]
    meta = {"env": environment(), "command": " ".join(sys.argv), "new_tokens": args.new}
    print(
        write_results("core_decode", "Engine core: TTFT and decode through LLM.generate", columns, rows, meta)
    )


if __name__ == "__main__":
    main()
