"""Scoring answers and comparing logits: exact match of the code, perplexity, KL and top-1 against dense.

- `extract_code`, `score`: exact match of the answer's first 5-digit number with the expected code;
- `haystack_metrics`: a prefill with logits at every position gives the perplexity of the haystack (real
  text) and, against the dense log-probabilities of the same prompt, KL(dense || sparse) and top-1
  agreement over the haystack's last positions (`kl_window`).

Pure functions over strings and tensors: no model, no policy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypedDict

import torch

from entropyinfer.evaluation.tasks import CODE_RE, Case

__all__ = ["HaystackMetrics", "extract_code", "haystack_metrics", "kl_window", "perplexity", "score"]


def extract_code(text: str) -> str | None:
    """The first 5-digit number of an answer (no digit on either side), or None."""
    m = CODE_RE.search(text)
    return m.group(0) if m else None


def score(answer_text: str, expected: str) -> bool:
    """Exact match: the answer's first 5-digit number is the expected code."""
    return extract_code(answer_text) == expected


class HaystackMetrics(TypedDict, total=False):
    """`haystack_metrics`' result: the perplexities always, the comparison with dense when it was given."""

    ppl: float
    ppl_window: float
    kl_mean: float
    kl_max: float
    top1_agree: float


def kl_window(case: Case, window: int) -> tuple[int, int]:
    """[lo, hi): the haystack's last `window` positions (clipped to the haystack)."""
    lo, hi = case.haystack_span
    return max(lo, hi - window), hi


def haystack_metrics(
    logits: torch.Tensor, case: Case, window: int, dense_logprobs: torch.Tensor | None
) -> HaystackMetrics:
    """Perplexity of the haystack's real text (positions inside the haystack predicting the next haystack
    token), perplexity over the last `window` positions, and against dense (`dense_logprobs`: the dense
    log-probabilities over that window): KL(dense || this) mean and max (nats) and top-1 agreement."""
    lo, hi = case.haystack_span
    w_lo, w_hi = kl_window(case, window)
    ids = case.prompt_ids
    out: HaystackMetrics = {
        "ppl": perplexity(logits, ids, lo, hi - 1),
        "ppl_window": perplexity(logits, ids, w_lo, w_hi - 1),
    }
    if dense_logprobs is not None:
        lp = torch.log_softmax(logits[w_lo:w_hi], dim=-1)
        kl = (dense_logprobs.exp() * (dense_logprobs - lp)).sum(-1)
        out["kl_mean"] = float(kl.mean())
        out["kl_max"] = float(kl.max())
        out["top1_agree"] = float((lp.argmax(-1) == dense_logprobs.argmax(-1)).float().mean())
    return out


def perplexity(logits: torch.Tensor, ids: Sequence[int], lo: int, hi: int) -> float:
    """exp(mean NLL) of positions lo..hi-1 predicting tokens lo+1..hi."""
    targets = torch.tensor(list(ids[lo + 1 : hi + 1]), dtype=torch.long, device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits[lo:hi].float(), targets, reduction="mean")
    return float(math.exp(nll.item()))
