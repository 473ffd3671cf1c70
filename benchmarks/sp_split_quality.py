"""How close the learned SP split of compression capacity comes to the exact one (issue 13 item 3), SmolLM2.

The exact split (`kv_compression.sp_split: exact`) keeps, per (layer, KV head), the global top ``C - W``
prefix positions by the pooled window scores, whatever segment holds them; it all-gathers the whole score
row per layer. The learned split keeps in each segment its own top ``b_j``, ``b_j`` its `split_budget` share
by `span_shares` of a table of where compression keeps positions (`policies/segment_shares.py`). Given the
same scores, the learned split on SP ranks keeps exactly these positions (tests/shard/parallel/
test_sp_split.py), so this script computes both splits in one process from the real scores of one rank.

Per document: SmolLM2 prefills it (dense) and decodes ``gap`` tokens with latent compression; the scores
that compression ranks positions by (`shard.compression.sequence_scores`, wrapped here) are kept. The first
`--warmup` documents teach a `ShareLearner` (their exact plans' `kept_histogram`); on the others, for each
capacity and SP size (equal segments of the prompt, the last also holding the decode tokens):
- ``mass``: the pooled score mass the split keeps over the exact split's (1.0 = as good; the exact top-k
  has the largest mass any choice of that many positions has);
- ``overlap``: the part of the exact split's positions it keeps too.
Splits: ``learned`` (the table), ``length`` (uniform bins: each segment by its share of the prefix, what a
split without statistics would do). Window positions, kept by every split, are left out of both measures.

`python benchmarks/sp_split_quality.py` (CPU, ~5 min). Writes `sp_split_quality.{json,md}`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results

import entropyinfer.shard.compression as compression_mod
from entropyinfer import LLM, SamplingParams
from entropyinfer.evaluation.corpus import real_document
from entropyinfer.policies.kv_compression import select_positions
from entropyinfer.policies.segment_shares import (
    POSITION_BINS,
    KeepStats,
    ShareLearner,
)
from entropyinfer.policies.segment_split import kept_histogram, span_shares, split_budget

MODEL = "smollm2-135m"


def capture_scores(llm: LLM, ids: list[int], gap: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One document's compression scores ``[L, Hkv, S]``, lengths ``[L, Hkv]`` at its compression, and
    its prompt tokens (the decoded text, tokenized again)."""
    prompt = llm.tokenizer.decode(ids)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = compression_mod.sequence_scores

    def keep(*args: Any) -> torch.Tensor:
        out = real(*args)
        seen.append((out.float().cpu(), args[-1].cpu()))
        return out

    compression_mod.sequence_scores = keep  # type: ignore[assignment]
    try:
        llm.generate([prompt], SamplingParams(max_tokens=gap + 2, ignore_eos=True))
    finally:
        compression_mod.sequence_scores = real  # type: ignore[assignment]
    assert len(seen) == 1, "expected one compression"
    return (*seen[0], int(seen[0][1].max()) - gap)


def exact_plan(scores: torch.Tensor, lengths: torch.Tensor, cap: int, w: int) -> tuple[torch.Tensor, Any]:
    flat, n = scores.flatten(0, 1), lengths.flatten().long()
    caps = torch.full_like(n, cap)
    slots = int(torch.minimum(caps, n).max())
    return flat, select_positions(flat, n, caps, w, slots)


def split_keep(
    flat: torch.Tensor, lengths: torch.Tensor, cap: int, w: int, sp: int, prompt: int, bins: torch.Tensor
) -> list[torch.Tensor]:
    """Per head, the prefix positions the learned split keeps with `bins` ``[rows, B]`` over `sp` equal
    segments of the prompt."""
    n = lengths.flatten().long()
    rows = n.shape[0]
    seg = -(-prompt // sp)
    starts = (torch.arange(sp) * seg)[:, None].expand(sp, rows)
    ends = torch.minimum(starts + seg, n[None, :]).clone()
    ends[-1] = n
    prefix = n - n.clamp(max=w)
    room = (torch.minimum(ends, prefix[None, :]) - starts).clamp(min=0)
    shares = span_shares(bins.double(), starts, ends, prefix)
    budget = split_budget(torch.minimum(torch.full_like(n, cap - w), prefix), shares, room)
    out = []
    for h in range(rows):
        kept = [
            int(starts[j, h])
            + flat[h, int(starts[j, h]) : int(starts[j, h]) + int(room[j, h])].topk(int(budget[j, h])).indices
            for j in range(sp)
        ]
        out.append(torch.cat(kept))
    return out


def measure(
    flat: torch.Tensor, plan: Any, kept: list[torch.Tensor], lengths: torch.Tensor, w: int
) -> tuple[float, float]:
    n = lengths.flatten().long()
    keep = plan.counts - n.clamp(max=w)
    masses, overlaps = [], []
    for h in range(flat.shape[0]):
        k = int(keep[h])
        if k <= 0 or k >= int(n[h]) - w:  # nothing chosen: everything (or nothing) kept
            continue
        exact = plan.indices[h, :k]
        best = float(flat[h, exact].sum())
        masses.append(float(flat[h, kept[h]].sum()) / best if best > 0 else 1.0)
        overlaps.append(np.intersect1d(exact.numpy(), kept[h].numpy()).size / k)
    return float(np.mean(masses)), float(np.mean(overlaps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--capacities", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--sp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--gap", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    w = args.window
    kw = dict(kv_compression="latent", kv_window=w, kv_gap=args.gap, kv_capacity=max(args.capacities))
    llm = LLM(MODEL, device=args.device, policy="dense", **kw)
    text = llm.encode(real_document(args.docs * args.tokens + 2000))
    assert len(text) >= args.docs * args.tokens, "not enough text"
    docs = [text[i * args.tokens : (i + 1) * args.tokens] for i in range(args.docs)]
    captured = [capture_scores(llm, ids, args.gap) for ids in docs]
    layers, hkv = captured[0][1].shape
    rows = []
    for cap in args.capacities:
        learner = ShareLearner(MODEL, layers, hkv, every_requests=1, every_s=0.0, warmup_requests=1)
        for scores, lengths, _ in captured[: args.warmup]:
            flat, plan = exact_plan(scores, lengths, cap, w)
            fr, wt = kept_histogram(plan.indices, plan.counts, lengths.flatten(), w)
            learner.observe(KeepStats(MODEL, fr.view(layers, hkv, -1).numpy(), wt.view(layers, hkv).numpy()))
        learned = torch.from_numpy(learner.mean()).flatten(0, 1)
        uniform = torch.full_like(learned, 1.0 / POSITION_BINS)
        for sp in args.sp:
            row: dict[str, Any] = {"capacity": cap, "sp": sp}
            for name, bins in (("learned", learned), ("length", uniform)):
                got = []
                for scores, lengths, prompt in captured[args.warmup :]:
                    flat, plan = exact_plan(scores, lengths, cap, w)
                    kept = split_keep(flat, lengths, cap, w, sp, prompt, bins)
                    got.append(measure(flat, plan, kept, lengths, w))
                row[f"{name}_mass"] = round(float(np.mean([g[0] for g in got])), 4)
                row[f"{name}_overlap"] = round(float(np.mean([g[1] for g in got])), 4)
            rows.append(row)
            print(row, flush=True)
    meta = {"env": environment(), "model": MODEL, "args": vars(args)}
    columns = ["capacity", "sp", "learned_mass", "length_mass", "learned_overlap", "length_overlap"]
    notes = (
        f"{args.docs - args.warmup} evaluation documents of {args.tokens} SmolLM2 tokens "
        "(consecutive slices of the pydoc topics, `real_document`), the "
        f"table learned from {args.warmup} others; W={w}, N_D={args.gap}, dense prefill. mass: pooled score "
        "mass kept over the exact split's; overlap: part of the exact split's positions kept. "
        "Command: `python benchmarks/sp_split_quality.py`."
    )
    print(
        write_results(
            "sp_split_quality",
            "Learned vs exact SP split of compression capacity",
            columns,
            rows,
            meta,
            notes,
        )
    )


if __name__ == "__main__":
    main()
