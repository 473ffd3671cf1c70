"""Scoring and logit metrics (evaluation/metrics.py): exact match of the first 5-digit code; perplexity,
KL and top-1 agreement on logits whose values are known."""

from __future__ import annotations

import math

import pytest
import torch

from entropyinfer.evaluation.metrics import extract_code, haystack_metrics, kl_window, perplexity, score
from entropyinfer.evaluation.tasks import Case


def test_scoring_is_exact_match_of_the_first_five_digit_code():
    assert score("The pass key is 12345.", "12345")
    assert score("12345", "12345")
    assert score("The code is 12345 (not 67890)", "12345")
    assert not score("The code is 67890 (not 12345)", "12345")
    assert not score("The pass key is 123456", "12345")  # six digits is not the code
    assert not score("The pass key is 1234", "12345")
    assert not score("The pass key is 1 2 3 4 5", "12345")
    assert not score("", "12345")
    assert extract_code("a 123456 b 54321 c") == "54321"
    assert extract_code("no code here") is None


def _case(n: int, span: tuple[int, int]) -> Case:
    return Case(
        task="passkey",
        length=n,
        depth=0.5,
        messages=[],
        prompt_ids=[i % 7 for i in range(n)],
        expected="12345",
        needle_token=span[0] + 1,
        haystack_span=span,
    )


def test_kl_window_is_the_haystacks_last_positions():
    case = _case(40, (5, 30))
    assert kl_window(case, 10) == (20, 30)
    assert kl_window(case, 100) == (5, 30)  # clipped to the haystack


def test_perplexity_of_uniform_and_of_certain_logits():
    vocab, n = 11, 20
    ids = [i % 7 for i in range(n)]
    assert perplexity(torch.zeros(n, vocab), ids, 0, n - 1) == pytest.approx(vocab)
    certain = torch.full((n, vocab), -1e4)
    certain[torch.arange(n - 1), torch.tensor(ids[1:])] = 0.0  # position i predicts token i+1 surely
    assert perplexity(certain, ids, 3, 15) == pytest.approx(1.0)


def test_haystack_metrics_against_dense():
    torch.manual_seed(0)
    vocab = 13
    case = _case(40, (5, 30))
    dense = torch.randn(40, vocab)
    w_lo, w_hi = kl_window(case, 8)
    dense_lp = torch.log_softmax(dense[w_lo:w_hi], dim=-1)
    alone = haystack_metrics(dense, case, 8, None)
    assert set(alone) == {"ppl", "ppl_window"}
    assert alone["ppl"] == pytest.approx(perplexity(dense, case.prompt_ids, 5, 29))
    same = haystack_metrics(dense, case, 8, dense_lp)
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-6) and same["kl_max"] == pytest.approx(0.0, abs=1e-6)
    assert same["top1_agree"] == 1.0
    # A uniform prediction: KL(dense || uniform) = log(vocab) - H(dense) per position.
    flat = haystack_metrics(torch.zeros(40, vocab), case, 8, dense_lp)
    entropy = -(dense_lp.exp() * dense_lp).sum(-1)
    assert flat["kl_mean"] == pytest.approx(float((math.log(vocab) - entropy).mean()), rel=1e-5)
    assert flat["kl_max"] >= flat["kl_mean"] > 0.0
    assert flat["ppl_window"] == pytest.approx(vocab)
