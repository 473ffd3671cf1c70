"""The quality harness over HTTP (issue 16 item 5, evaluation/http_scorer.py): a policy scored through the
session's server (real SmolLM2 on CPU) with prompt logprobs gives the perplexity the harness computes in
process, and the top-k KL against dense computed over HTTP equals the in-process one computed the same
way (and stays below the full KL, of which it is a lower bound). Here, not in tests/evaluation/: it needs
the session's Serve app, whose fixture lives in tests/cluster/conftest.py."""

from __future__ import annotations

import math
import time

import pytest
import torch

from entropyinfer.cluster.launcher import EmbeddedServer
from entropyinfer.evaluation.corpus import prose_text
from entropyinfer.evaluation.http_scorer import (
    HTTPScorer,
    PromptScores,
    compare,
    inprocess_scores,
    perplexity,
    top1_agreement,
    topk_kl,
)
from entropyinfer.evaluation.metrics import perplexity as harness_perplexity
from entropyinfer.shard.attention import build_prefill_attention
from entropyinfer.shard.llm import LLM

from .conftest import API_KEY

WINDOW = 256
POLICY = "fixed"  # sparse past 512 tokens at SmolLM2's preset (budget 256): a KL clearly above 0


def _text(llm: LLM, tokens: int = 1100) -> str:
    words = prose_text().split(" ")
    text = " ".join(words[: tokens // 2])
    while llm.count_tokens(text) < tokens:
        text = " ".join(words[: len(text.split(" ")) + 50])
    return text


def _full_logprobs(llm: LLM, text: str, policy: str) -> torch.Tensor:
    ids = llm.encode(text)
    cache = llm.engine.new_cache(1, len(ids))
    attention = build_prefill_attention(policy, llm.config.sparse)
    with torch.inference_mode():
        logits = llm.engine.prefill(torch.tensor(ids), cache, 0, attention, all_logits=True)
    return torch.log_softmax(logits.float(), dim=-1)


def test_topk_kl_is_zero_for_equal_scores_and_counts_the_remainder() -> None:
    a = PromptScores(["x", "y", "z"], [None, -0.1, -0.2], [None, {"y": -0.1, "q": -3.0}, {"z": -0.2}])
    assert topk_kl(a, a) == [0.0, 0.0] and top1_agreement(a, a) == 1.0
    # the other side moves mass from "y" into tokens outside both lists: the remainder bucket sees it
    b = PromptScores(["x", "y", "z"], [None, -1.0, -0.2], [None, {"y": -1.0, "q": -3.0}, {"z": -0.2}])
    p, q = math.exp(-0.1), math.exp(-1.0)
    pr, qr = 1 - p - math.exp(-3.0), 1 - q - math.exp(-3.0)
    assert topk_kl(a, b)[0] == pytest.approx(p * (-0.1 + 1.0) + pr * math.log(pr / qr))
    assert perplexity(a) == pytest.approx(math.exp(0.15)) and perplexity(a, 1) == pytest.approx(math.exp(0.2))
    with pytest.raises(ValueError, match="different token sequences"):
        topk_kl(a, PromptScores(["x", "y", "w"], a.logprobs, a.top))


@pytest.mark.serve
def test_perplexity_and_kl_over_http_equal_the_in_process_numbers(
    server: EmbeddedServer, smollm2: LLM
) -> None:
    text = _text(smollm2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the harness's setting: the sparse reference is faster on one thread here
    try:
        _compare_over_http_and_in_process(server, smollm2, text)
    finally:
        torch.set_num_threads(threads)


def _compare_over_http_and_in_process(server: EmbeddedServer, smollm2: LLM, text: str) -> None:
    t0 = time.monotonic()
    with HTTPScorer(server.url, api_key=API_KEY, top_k=20) as scorer:
        http_dense, http_sparse = scorer.score(text, "dense"), scorer.score(text, POLICY)
    http_s = time.monotonic() - t0
    ids = smollm2.encode(text)
    n = len(ids)
    assert http_dense.tokens == [smollm2.tokenizer.decode([t]) for t in ids]  # the same tokenization

    local_dense, local_sparse = (
        inprocess_scores(smollm2, text, "dense"),
        inprocess_scores(smollm2, text, POLICY),
    )
    over_http = compare(http_sparse, http_dense, WINDOW)
    in_process = compare(local_sparse, local_dense, WINDOW)

    # perplexity: the harness's own number from the logits of every position
    full_dense, full_sparse = _full_logprobs(smollm2, text, "dense"), _full_logprobs(smollm2, text, POLICY)
    harness_ppl = harness_perplexity(full_sparse, ids, 0, n - 1)
    assert perplexity(http_dense) == pytest.approx(harness_perplexity(full_dense, ids, 0, n - 1), rel=1e-3)
    assert over_http["ppl"] == pytest.approx(harness_ppl, rel=1e-3)
    assert over_http["ppl_window"] == pytest.approx(in_process["ppl_window"], rel=1e-3)
    # KL over the top-k: HTTP and in-process computed the same way agree; it is a lower bound of the full KL
    assert over_http["kl_topk_mean"] == pytest.approx(in_process["kl_topk_mean"], rel=0.02, abs=1e-5)
    assert over_http["kl_topk_max"] == pytest.approx(in_process["kl_topk_max"], rel=0.02, abs=1e-5)
    assert abs(over_http["top1_agree"] - in_process["top1_agree"]) <= 2 / WINDOW
    w = slice(n - 1 - WINDOW, n - 1)
    full_kl = (full_dense[w].exp() * (full_dense[w] - full_sparse[w])).sum(-1)
    assert over_http["kl_topk_mean"] <= float(full_kl.mean()) * 1.01 + 1e-6
    assert over_http["kl_topk_mean"] > 1e-4  # the policy is sparse here: the comparison is not trivial
    print(
        f"FIGURE http quality ({n} tokens, SmolLM2, policy {POLICY} vs dense, window {WINDOW}, top-20): "
        f"ppl http {over_http['ppl']:.4f} / harness {harness_ppl:.4f}; kl_topk_mean http "
        f"{over_http['kl_topk_mean']:.5f} / in-process {in_process['kl_topk_mean']:.5f} (full KL "
        f"{float(full_kl.mean()):.5f}); top1 http {over_http['top1_agree']:.3f} / in-process "
        f"{in_process['top1_agree']:.3f}; two HTTP scorings {http_s:.1f}s"
    )
