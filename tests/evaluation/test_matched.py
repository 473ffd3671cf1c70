"""Matched-density comparison helpers (`evaluation/matched.py`) on synthetic records (no model)."""

from __future__ import annotations

import torch

from entropyinfer.evaluation.matched import Family, matched_verdict, summarize_matched, text_metrics


def test_family_spec_rounds_budgets_and_keeps_fixed_overrides() -> None:
    fam = Family("entropy per_head", "entropy", "base_budget", 8, 2048, step=8, fixed=(("mode", "per_head"),))
    spec = fam.spec(264.0)
    assert spec.name == "entropy per_head base_budget=264"
    assert dict(spec.overrides) == {"mode": "per_head", "base_budget": 264}
    assert Family("s", "entropy", "spread_factor", 0.01, 4).spec(0.1234567).overrides == (
        ("spread_factor", 0.123457),
    )


def test_text_metrics_zero_against_itself() -> None:
    logits = torch.randn(40, 11)
    ids = list(torch.randint(0, 11, (40,)).tolist())
    dense_lp = torch.log_softmax(logits[8:39], dim=-1)
    m = text_metrics(logits, dense_lp, ids, 8, 16)
    assert abs(m["kl_all"]) < 1e-6 and m["top1_agree"] == 1.0 and abs(m["ppl"] - m["ppl_dense"]) < 1e-4


def _rows(spread_correct: int, spread_kl: float, spread_density: float) -> list[dict]:
    retrieval = [{"level": None, "family": "dense", "config": "dense", "correct": True, "density": 1.0}] * 10
    for fam, cfg, ok, dens in (("fixed", "fixed t", 8, 0.3), ("entropy spread", "spread f", spread_correct,
                                                              spread_density)):  # fmt: skip
        retrieval += [{"level": 0.3, "family": fam, "config": cfg, "correct": i < ok, "density": dens}
                      for i in range(10)]  # fmt: skip
    text = [
        {"level": 0.3, "family": "fixed", "config": "fixed t", "density": 0.3, "kl_all": 0.1,
         "kl_window": 0.1, "top1_agree": 0.9, "ppl": 11.0, "ppl_dense": 10.0},
        {"level": 0.3, "family": "entropy spread", "config": "spread f", "density": spread_density,
         "kl_all": spread_kl, "kl_window": 0.1, "top1_agree": 0.9, "ppl": 10.5, "ppl_dense": 10.0},
    ]  # fmt: skip
    return summarize_matched(retrieval, text)


def test_summary_and_verdict() -> None:
    rows = _rows(9, 0.08, 0.305)
    dense = next(r for r in rows if r["family"] == "dense")
    assert (dense["correct"], dense["cases"]) == (10, 10)
    spread = next(r for r in rows if r["family"] == "entropy spread")
    assert spread["correct"] == 9 and abs(spread["ppl_ratio"] - 1.05) < 1e-9
    (v,) = matched_verdict(rows, "entropy spread", "fixed")
    assert v["matched_within_tol"] and v["retrieval_strictly_better"] and v["kl_strictly_better"]
    assert v["within_one_case_of_dense_at_max_density"] is False  # density 0.305 > 0.30
    assert not v["target_met"]
    (v,) = matched_verdict(_rows(9, 0.08, 0.295), "entropy spread", "fixed")
    assert v["target_met"]
    (v,) = matched_verdict(_rows(9, 0.08, 0.32), "entropy spread", "fixed")  # not matched within 0.01
    assert not v["matched_within_tol"] and not v["target_met"]
    (v,) = matched_verdict(_rows(8, 0.08, 0.295), "entropy spread", "fixed")  # a tie is not strictly better
    assert not v["retrieval_strictly_better"] and not v["target_met"]
