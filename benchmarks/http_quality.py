"""Quality of a deployed server's policies over HTTP: perplexity and top-k KL against dense, from prompt
logprobs (`evaluation/http_scorer.py`), on real prose of a given length.

Run against any running `entropyinfer serve` (its API key in $ENTROPYINFER_API_KEY):
`python benchmarks/http_quality.py --url http://127.0.0.1:8000 --policies entropy fixed --tokens 4000`;
writes http_quality.{json,md} to $OUT or benchmarks/results/. The KL is over the shared top-k support plus a
remainder bucket: a lower bound of the full KL (the harness's `kl_mean` is the full one).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results

from entropyinfer.evaluation.corpus import prose_text
from entropyinfer.evaluation.http_scorer import MAX_TOP_K, HTTPScorer, score_policies

COLUMNS = ["policy", "tokens", "ppl", "ppl_window", "kl_topk_mean", "kl_topk_max", "top1_agree"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=os.environ.get("ENTROPYINFER_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--policies", nargs="+", default=["entropy", "fixed"])
    ap.add_argument("--tokens", type=int, default=4000, help="about this many prompt tokens (4 chars each)")
    ap.add_argument("--window", type=int, default=256, help="last positions of the KL and ppl_window")
    ap.add_argument("--top-k", type=int, default=MAX_TOP_K)
    args = ap.parse_args()
    text = prose_text()[: 4 * args.tokens]
    t0 = time.perf_counter()
    with HTTPScorer(args.url, api_key=os.environ.get("ENTROPYINFER_API_KEY"), top_k=args.top_k) as scorer:
        results = score_policies(scorer, text, args.policies, args.window)
    rows = [{"policy": p, **{k: round(v, 5) for k, v in m.items()}} for p, m in results.items()]
    command = "python benchmarks/http_quality.py " + " ".join(sys.argv[1:])
    meta = {"env": environment(), "command": command, "url": args.url, "top_k": args.top_k,
            "window": args.window, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    print(write_results("http_quality", "Policy quality over HTTP (prompt logprobs)", COLUMNS, rows, meta))


if __name__ == "__main__":
    main()
