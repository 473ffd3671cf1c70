"""What skipping the profiling of reliably rigid heads could save at most (issue 13 item 2), SmolLM2-135M.

The entropy rule profiles every (layer, KV head) of a sparse layer (`kernels.block_scoring.block_scores`:
block logits, entropies) before it plans the layer (`policies.entropy.plan_layer`: budgets, counts, block
selection). A head found rigid in nearly every request could skip its profiling (the rule would give it
the rigid budget without looking). This script measures the part of a sparse prefill that profiling and
planning take (timers around `block_scores` and `plan_layer` / `plan_chunk`, the real code path of
`SparsePrefill`), the dense and sparse prefill times, and, from a saved head profile (`--profile`, as
`benchmarks/policy_rebalance.py` writes it), the share of profiled heads rigid in at least
`--rigid-reliable` of their requests. The scoring work is linear in the heads, so
``scoring time x that share`` bounds the time saved from above (the selection still needs block logits of
every head it selects for, so a real skip saves less unless the skipped heads take a fixed pattern).

`python benchmarks/policy_profiling_share.py --profile benchmarks/results/<name>_profile_b16.json
  --out benchmarks/results` (CPU, ~2 min); GPU: add `--device cuda --length 8000`.
Writes `policy_skip_profiling.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment

import entropyinfer.policies.entropy as entropy_mod
import entropyinfer.shard.sparse_attention as sparse_mod
from entropyinfer import LLM
from entropyinfer.evaluation.corpus import real_documents
from entropyinfer.policies.config import load_sparse_config
from entropyinfer.policies.head_stats import HeadProfile
from entropyinfer.shard.attention import DensePrefill, PrefillAttention
from entropyinfer.shard.sparse_attention import SparsePrefill

MODEL = "smollm2-135m"


class Timer:
    """Wraps a function; sums its wall time (synchronising CUDA around each call)."""

    def __init__(self, fn: Callable[..., Any], cuda: bool) -> None:
        self.fn, self.cuda, self.total, self.calls = fn, cuda, 0.0, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        self.total += time.perf_counter() - t0
        self.calls += 1
        return out


def timed_prefill(llm: LLM, ids: list[int], attention: PrefillAttention, cuda: bool) -> float:
    cache = llm.engine.new_cache(1, len(ids))
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        llm.engine.prefill(torch.tensor(ids, dtype=torch.long), cache, 0, attention, all_logits=False)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", type=Path, required=True, help="a saved head profile (policy_rebalance)")
    ap.add_argument("--rigid-reliable", type=float, default=0.95)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    body = json.loads(args.profile.read_text())
    profile = HeadProfile.from_dict(body["profile"])
    rf = profile.rigid_frequency
    profiled = int(np.isfinite(rf).sum())
    reliable = int((np.nan_to_num(rf) >= args.rigid_reliable).sum())
    llm = LLM(MODEL, device=args.device, policy="entropy")
    cfg = load_sparse_config("entropy_short")
    text = "\n\n".join(reversed(real_documents(40)))  # real documents, the last first, to --length tokens
    ids = list(llm.tokenizer.encode(text, add_special_tokens=False))[: args.length]
    scoring = Timer(entropy_mod.block_scores, cuda)
    planning = Timer(sparse_mod.plan_layer, cuda)
    chunk_planning = Timer(sparse_mod.plan_chunk, cuda)
    entropy_mod.block_scores = scoring  # type: ignore[assignment]
    sparse_mod.plan_layer = planning  # type: ignore[assignment]
    sparse_mod.plan_chunk = chunk_planning  # type: ignore[assignment]
    timed_prefill(llm, ids, SparsePrefill("entropy", cfg), cuda)  # warm-up
    dense = min(timed_prefill(llm, ids, DensePrefill(), cuda) for _ in range(args.reps))
    runs = []
    for _ in range(args.reps):
        for t in (scoring, planning, chunk_planning):
            t.total, t.calls = 0.0, 0
        total = timed_prefill(llm, ids, SparsePrefill("entropy", cfg), cuda)
        runs.append((total, scoring.total, planning.total + chunk_planning.total, scoring.calls))
    total, score_s, plan_s, layers = min(runs)
    share = reliable / profiled if profiled else 0.0
    result = {
        "environment": environment(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "tokens": len(ids),
        "dense_prefill_s": dense,
        "sparse_prefill_s": total,
        "scoring_s": score_s,
        "planning_s": plan_s,
        "scored_layers": layers,
        "profile_requests": profile.total_requests,
        "profiled_heads": profiled,
        "reliably_rigid_heads": reliable,
        "saving_bound_s": score_s * share,
        "saving_bound_share": score_s * share / total if total else 0.0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "policy_skip_profiling.json").write_text(json.dumps(result, indent=1))
    (args.out / "policy_skip_profiling.md").write_text(report(result))
    print(report(result))


def report(r: dict[str, Any]) -> str:
    a = r["args"]
    return "\n".join([
        "# Skipping the profiling of reliably rigid heads: the most it could save (SmolLM2-135M)",
        "",
        f"Device {a['device']}, one {r['tokens']}-token prompt, `entropy_short`, best of {a['reps']}.",
        "",
        "| dense prefill | sparse prefill | of which profiling (block_scores) | planning (scores, budgets, "
        "selection) | heads rigid in >= "
        f"{float(a['rigid_reliable']):.0%} of {r['profile_requests']} requests | saving bound |",
        "|---|---|---|---|---|---|",
        f"| {r['dense_prefill_s']:.2f} s | {r['sparse_prefill_s']:.2f} s | {r['scoring_s']:.3f} s "
        f"({r['scoring_s'] / r['sparse_prefill_s']:.1%}) | {r['planning_s']:.3f} s "
        f"({r['planning_s'] / r['sparse_prefill_s']:.1%}) | {r['reliably_rigid_heads']} of "
        f"{r['profiled_heads']} | {r['saving_bound_s'] * 1000:.1f} ms ({r['saving_bound_share']:.2%}) |",
        "",
        f"Command: `python benchmarks/policy_profiling_share.py --device {a['device']} "
        f"--length {a['length']} --reps {a['reps']} --profile {a['profile']} "
        f"--rigid-reliable {a['rigid_reliable']}`.",
        "",
    ])  # fmt: skip


if __name__ == "__main__":
    main()
