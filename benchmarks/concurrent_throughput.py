"""Output tokens/s of N concurrent completions through the engine core against the same requests one at a
time (issue 10, item 6), on the CPU by default: SmolLM2-135M fp32, chat prompts of a few hundred tokens.

    python benchmarks/concurrent_throughput.py              # 8 requests x 64 tokens
    python benchmarks/concurrent_throughput.py --smoke      # 2 requests x 4 tokens, a temporary folder

"concurrent": one `LLM.generate` call with every prompt (they share each decode step); "one at a time":
a `generate` call per prompt. Greedy, ignore_eos, so both produce the same tokens (checked).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results

from entropyinfer.evaluation.corpus import real_document
from entropyinfer.shard.llm import LLM
from entropyinfer.shard.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-chars", type=int, default=1200, help="document characters per prompt")
    ap.add_argument("--smoke", action="store_true", help="2 requests x 4 tokens into a temporary folder")
    args = ap.parse_args()
    if args.smoke:
        args.requests, args.max_tokens, args.prompt_chars = 2, 4, 200
        os.environ["OUT"] = tempfile.mkdtemp()
    llm = LLM(args.model, device=args.device)
    doc = real_document()
    prompts = [
        [
            {
                "role": "user",
                "content": f"Question {i}: summarize.\n\n" + doc[i * 97 : i * 97 + args.prompt_chars],
            }
        ]
        for i in range(args.requests)
    ]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[0], SamplingParams(max_tokens=2))  # warm-up
    t0 = time.perf_counter()
    alone = [llm.generate(p, params)[0] for p in prompts]
    one_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    together = llm.generate(prompts, params)
    batch_s = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in together)
    rows = [
        {"mode": "one at a time", "requests": args.requests, "seconds": round(one_s, 2),
         "output_tok_s": round(tokens / one_s, 1), "speedup": 1.0},
        {"mode": "concurrent", "requests": args.requests, "seconds": round(batch_s, 2),
         "output_tok_s": round(tokens / batch_s, 1), "speedup": round(one_s / batch_s, 2)},
    ]  # fmt: skip
    same = all(a.token_ids == b.token_ids for a, b in zip(alone, together, strict=True))
    meta = {
        "env": environment(),
        "model": args.model,
        "max_tokens": args.max_tokens,
        "prompt_tokens": [o.stats["prompt_tokens"] for o in together],
        "same_tokens": same,
        "threads": torch.get_num_threads(),
    }
    print(
        write_results(
            "concurrent_throughput",
            f"{args.requests} concurrent completions vs one at a time ({args.model}, {args.device})",
            ["mode", "requests", "seconds", "output_tok_s", "speedup"],
            rows,
            meta,
            notes=f"greedy, ignore_eos, {args.max_tokens} tokens each; same tokens both ways: {same}",
        )
    )


if __name__ == "__main__":
    main()
