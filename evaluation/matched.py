"""Budget rules compared at matched density (issue 12): calibrate each rule's knob to a target density, then
retrieval on the cases dense solves and KL / perplexity against dense on real text that does not repeat.

- `Family`: one budget rule and its knob (`fixed` takes `target_density` itself; the entropy modes a base
  budget or the spread factor), `Family.spec(value)` the `PolicySpec` at a knob value.
- `prefill_density`, `calibrate`: a prompt set's mean density at a knob value; the knob whose mean density is
  closest to a target (bisection: density does not decrease with the knob).
- `text_metrics`: over the sparse positions of a real-text prompt (every position from the first sparse
  segment on, so every segment counts, not only the prompt's end): KL(dense || policy) per position, top-1
  agreement, perplexity, and the same KL over the last `window` positions.
- `summarize_matched`, `matched_verdict`: one row per (level, configuration) and the issue's target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from entropyinfer.evaluation.plans import PolicySpec
from entropyinfer.policies.config import SparsePrefillConfig
from entropyinfer.shard.attention import build_prefill_attention

if TYPE_CHECKING:
    from entropyinfer.shard.llm import LLM

__all__ = [
    "Family",
    "calibrate",
    "matched_verdict",
    "prefill_density",
    "prefill_logits",
    "summarize_matched",
    "text_metrics",
]


@dataclass(frozen=True)
class Family:
    """A budget rule with one knob: `knob` (a SparsePrefillConfig field) in [lo, hi], integer steps of
    `step` when it is a token budget (0: continuous, bisected in log space); `fixed` overrides always hold."""

    name: str
    policy: str  # "entropy" | "fixed"
    knob: str
    lo: float
    hi: float
    step: int = 0
    fixed: tuple[tuple[str, Any], ...] = ()

    def spec(self, value: float) -> PolicySpec:
        v: float | int = int(value) if self.step else round(float(value), 6)
        return PolicySpec(f"{self.name} {self.knob}={v:g}", self.policy, (*self.fixed, (self.knob, v)))


def prefill_logits(
    llm: LLM, ids: Sequence[int], spec: PolicySpec, base: SparsePrefillConfig, all_logits: bool
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One prefill of `ids` under `spec`: (logits of every position [N, vocab] or of the last one, stats)."""
    attention = build_prefill_attention(spec.policy, spec.config(base))
    cache = llm.engine.new_cache(1, len(ids))
    with torch.inference_mode():
        out = llm.engine.prefill(
            torch.tensor(list(ids), dtype=torch.long), cache, 0, attention, all_logits=all_logits
        )
    return out, dict(attention.stats())


def prefill_density(
    llm: LLM, prompts: Sequence[Sequence[int]], spec: PolicySpec, base: SparsePrefillConfig
) -> float:
    """Mean density (as `SparsePrefill` reports it) of `spec` over `prompts`."""
    return sum(float(prefill_logits(llm, ids, spec, base, False)[1]["density"]) for ids in prompts) / len(
        prompts
    )


def calibrate(
    llm: LLM,
    prompts: Sequence[Sequence[int]],
    family: Family,
    base: SparsePrefillConfig,
    target: float,
    iters: int = 8,
) -> tuple[float, float, list[tuple[float, float]]]:
    """(knob value, its mean density over `prompts`, every (value, density) tried) closest to `target`."""
    lo, hi = family.lo, family.hi
    tried: list[tuple[float, float]] = []

    def at(v: float) -> float:
        d = prefill_density(llm, prompts, family.spec(v), base)
        tried.append((v, d))
        return d

    for _ in range(iters):  # bisection in log space (budgets: on multiples of `step`)
        mid = math.sqrt(lo * hi)
        if family.step:
            mid = float(max(round(mid / family.step), 1) * family.step)
            if mid in (lo, hi):
                break
        if at(mid) < target:
            lo = mid
        else:
            hi = mid
    best = min(tried, key=lambda t: abs(t[1] - target)) if tried else (lo, at(lo))
    return best[0], best[1], tried


def text_metrics(
    logits: torch.Tensor, dense_lp: torch.Tensor, ids: Sequence[int], start: int, window: int
) -> dict[str, float]:
    """Over positions ``start .. N-2`` (predicting tokens ``start+1 .. N-1``): KL(dense || this) mean (nats)
    per position, top-1 agreement with dense, perplexity and dense's perplexity; KL over the last `window`.
    `dense_lp`: dense log-probabilities over the same positions."""
    n = len(ids)
    lp = torch.log_softmax(logits[start : n - 1].float(), dim=-1)
    kl = (dense_lp.exp() * (dense_lp - lp)).sum(-1)
    tgt = torch.tensor(list(ids[start + 1 : n]), dtype=torch.long, device=lp.device)
    nll = -lp.gather(1, tgt[:, None]).mean()
    dense_nll = -dense_lp.gather(1, tgt[:, None]).mean()
    return {
        "kl_all": float(kl.mean()),
        "kl_window": float(kl[-window:].mean()),
        "top1_agree": float((lp.argmax(-1) == dense_lp.argmax(-1)).float().mean()),
        "ppl": float(nll.exp()),
        "ppl_dense": float(dense_nll.exp()),
    }


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def summarize_matched(
    retrieval: Sequence[dict[str, Any]], text: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per (level, config): retrieval correct / cases, mean density of the retrieval cases and of
    the text prompts, and the text metrics' means (KL per position, top-1, perplexity relative to dense)."""
    keys = sorted(
        {(r["level"], r["family"], r["config"]) for r in [*retrieval, *text]},
        key=lambda k: (-1.0 if k[0] is None else k[0], k[1]),
    )
    rows = []
    for level, family, config in keys:
        rs = [r for r in retrieval if (r["level"], r["config"]) == (level, config)]
        ts = [t for t in text if (t["level"], t["config"]) == (level, config)]
        ppl = [t["ppl"] / t["ppl_dense"] for t in ts if "ppl" in t]
        rows.append(
            {
                "level": level,
                "family": family,
                "config": config,
                "correct": sum(bool(r["correct"]) for r in rs),
                "cases": len(rs),
                "density": _mean([r["density"] for r in rs]),
                "density_text": _mean([t["density"] for t in ts]),
                "kl_all": _mean([t.get("kl_all") for t in ts]),
                "kl_window": _mean([t.get("kl_window") for t in ts]),
                "top1_agree": _mean([t.get("top1_agree") for t in ts]),
                "ppl_ratio": _mean(ppl),
            }
        )
    return rows


def matched_verdict(
    rows: Sequence[dict[str, Any]],
    candidate: str,
    baseline: str,
    max_density: float = 0.30,
    tol: float = 0.01,
) -> list[dict[str, Any]]:
    """Per level: `candidate` family vs `baseline` family (densities within `tol` on both the retrieval cases
    and the text prompts; strictly more retrieval cases and strictly lower KL per position), and the
    candidate within one case of dense at a density <= `max_density`."""
    dense = next((r for r in rows if r["family"] == "dense"), None)
    out = []
    for level in sorted({r["level"] for r in rows if r["level"] is not None}):
        c = next((r for r in rows if r["level"] == level and r["family"] == candidate), None)
        b = next((r for r in rows if r["level"] == level and r["family"] == baseline), None)
        if c is None or b is None or c["density"] is None or b["density"] is None:
            continue
        matched = abs(c["density"] - b["density"]) <= tol and (
            c["density_text"] is None
            or b["density_text"] is None
            or abs(c["density_text"] - b["density_text"]) <= tol
        )
        kl_better = c["kl_all"] is not None and b["kl_all"] is not None and c["kl_all"] < b["kl_all"]
        near_dense = (
            dense is not None and c["correct"] >= dense["correct"] - 1 and c["density"] <= max_density
        )
        out.append(
            {
                "level": level,
                "candidate": c["config"],
                "baseline": b["config"],
                "density": (round(c["density"], 4), round(b["density"], 4)),
                "matched_within_tol": matched,
                "retrieval": (c["correct"], b["correct"], c["cases"]),
                "retrieval_strictly_better": c["correct"] > b["correct"],
                "kl_all": (c["kl_all"], b["kl_all"]),
                "kl_strictly_better": kl_better,
                "within_one_case_of_dense_at_max_density": near_dense,
                "target_met": matched and c["correct"] > b["correct"] and kl_better and near_dense,
            }
        )
    return out
