"""Scoring a policy through a running server: perplexity and KL against dense over HTTP (issue 16 item 5).

A deployed server is checked for quality with the same numbers as the in-process harness, through the
OpenAI-compatible API only: `POST /v1/completions` with ``echo: true, max_tokens: 0, logprobs: k`` gives,
per prompt token, its logprob under the request's `policy` and the k most likely alternatives
(`HTTPScorer.score` -> `PromptScores`). From two of them (dense, and the policy):

- perplexity: exp(-mean logprob) of tokens 1..n-1 (the first token has none) -- the same number as
  `evaluation.metrics.perplexity(logits, ids, 0, n - 1)` of the harness, from the chosen tokens' exact
  logprobs;
- KL(dense || policy) over the top-k: the server returns k entries per position, not the distribution,
  so the full KL cannot be computed. `topk_kl` computes it over the partition {t} for every token t in
  *both* top-k lists, plus one remainder bucket holding the rest of the vocabulary (probability 1 - the
  listed mass, on each side). Both sides' masses are exact on that partition, so this is the KL of the
  two distributions coarse-grained the same way: a lower bound of the full KL (data-processing
  inequality), 0 when they agree, and equal to it as k grows;
- top-1 agreement: the most likely token of each position agrees.

Top-k entries are keyed by token text (OpenAI's legacy `top_logprobs` shape: tokens that decode to the same
text merge, the less likely one's value kept, as the server builds it). `inprocess_scores` computes the
same `PromptScores` in this process from the harness's prefill (an `LLM`'s engine with the policy's prefill
attention, the logits of every position), so HTTP and in-process numbers are compared like for like.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

import httpx

if TYPE_CHECKING:
    from entropyinfer.shard.llm import LLM

__all__ = [
    "HTTPScorer",
    "PromptScores",
    "TextMetrics",
    "compare",
    "inprocess_scores",
    "perplexity",
    "score_policies",
    "top1_agreement",
    "topk_kl",
]

MAX_TOP_K = 20  # the server's limit of `logprobs` (shard/sampling.py: MAX_LOGPROBS)


@dataclass(frozen=True)
class PromptScores:
    """Per prompt token: its text, its logprob given the tokens before it (None for the first) and the
    top-k alternatives of its position ({token text: logprob}, None for the first)."""

    tokens: list[str]
    logprobs: list[float | None]
    top: list[dict[str, float] | None]

    def __post_init__(self) -> None:
        if not len(self.tokens) == len(self.logprobs) == len(self.top) or len(self.tokens) < 2:
            raise ValueError("PromptScores: tokens, logprobs and top of the same length >= 2")


class TextMetrics(TypedDict, total=False):
    """`compare`'s result: the policy's perplexities always, against dense when dense was given."""

    tokens: int
    ppl: float
    ppl_window: float
    kl_topk_mean: float
    kl_topk_max: float
    top1_agree: float


class HTTPScorer:
    """Prompt logprobs of a text under a policy, from a server's `/v1/completions` (plain HTTP)."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        top_k: int = MAX_TOP_K,
        timeout_s: float = 600.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"top_k: 1..{MAX_TOP_K}, got {top_k}")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.top_k = top_k
        self._http = httpx.Client(
            base_url=url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport
        )

    def __enter__(self) -> HTTPScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def score(self, text: str, policy: str | None = None) -> PromptScores:
        """The text's prompt logprobs under `policy` (None: the server's default)."""
        body: dict[str, Any] = {"prompt": text, "echo": True, "max_tokens": 0, "logprobs": self.top_k}
        if policy is not None:
            body["policy"] = policy
        if self.model is not None:
            body["model"] = self.model
        resp = self._http.post("/v1/completions", json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"POST /v1/completions: HTTP {resp.status_code}: {resp.text[:500]}")
        lp = resp.json()["choices"][0]["logprobs"]
        return PromptScores(list(lp["tokens"]), list(lp["token_logprobs"]), list(lp["top_logprobs"]))


def inprocess_scores(llm: LLM, text: str, policy: str, top_k: int = MAX_TOP_K) -> PromptScores:
    """The same `PromptScores` in this process: the harness's prefill (`llm.engine`, the policy's prefill
    attention with the LLM's sparse config, logits of every position), tokens decoded one by one and top-k
    keyed by text as the server does."""
    import torch

    from entropyinfer.shard.attention import build_prefill_attention

    ids = llm.encode(text)
    engine = llm.engine
    cache = engine.new_cache(1, len(ids))
    attention = build_prefill_attention(policy, llm.config.sparse)
    with torch.inference_mode():
        logits = engine.prefill(torch.tensor(ids, dtype=torch.long), cache, 0, attention, all_logits=True)
    lp = torch.log_softmax(logits.float(), dim=-1)
    values, indices = torch.topk(lp[:-1], top_k, dim=-1)
    chosen = lp[:-1].gather(1, torch.tensor(ids[1:], device=lp.device)[:, None])[:, 0]
    decode = llm.tokenizer.decode
    top: list[dict[str, float] | None] = [None]
    for vals, idx in zip(values.tolist(), indices.tolist(), strict=True):
        top.append({str(decode([t])): v for t, v in zip(idx, vals, strict=True)})
    logprobs: list[float | None] = [None, *chosen.tolist()]
    return PromptScores([str(decode([t])) for t in ids], logprobs, top)


def perplexity(scores: PromptScores, window: int | None = None) -> float:
    """exp(-mean logprob) of tokens 1..n-1, or of the last `window` of them."""
    values = [v for v in scores.logprobs[1:] if v is not None]
    if window is not None:
        values = values[-window:]
    return math.exp(-sum(values) / len(values))


def topk_kl(dense: PromptScores, other: PromptScores, window: int | None = None) -> list[float]:
    """KL(dense || other) per position over the shared top-k support plus a remainder bucket (the
    module's docstring): one value per token 1..n-1 (or the last `window`), in nats."""
    _same_tokens(dense, other)
    out: list[float] = []
    rows = list(zip(dense.top[1:], other.top[1:], strict=True))
    for p_top, q_top in rows[-window:] if window is not None else rows:
        assert p_top is not None and q_top is not None, "positions 1.. have top-k entries"
        shared = [t for t in p_top if t in q_top]
        kl, p_mass, q_mass = 0.0, 0.0, 0.0
        for t in shared:
            p, q = math.exp(p_top[t]), math.exp(q_top[t])
            kl += p * (p_top[t] - q_top[t])
            p_mass, q_mass = p_mass + p, q_mass + q
        p_rest, q_rest = max(0.0, 1.0 - p_mass), max(1e-12, 1.0 - q_mass)
        if p_rest > 1e-12:
            kl += p_rest * math.log(p_rest / q_rest)
        out.append(max(0.0, kl))
    return out


def top1_agreement(dense: PromptScores, other: PromptScores, window: int | None = None) -> float:
    """The fraction of positions whose most likely token is the same under both."""
    _same_tokens(dense, other)
    pairs = [
        (max(p, key=p.__getitem__), max(q, key=q.__getitem__))
        for p, q in zip(dense.top[1:], other.top[1:], strict=True)
        if p is not None and q is not None
    ]
    if window is not None:
        pairs = pairs[-window:]
    return sum(a == b for a, b in pairs) / len(pairs)


def compare(other: PromptScores, dense: PromptScores | None = None, window: int = 256) -> TextMetrics:
    """The policy's perplexity (all tokens, and the last `window`) and, against dense: the top-k KL mean
    and max and the top-1 agreement over the last `window` positions."""
    out: TextMetrics = {
        "tokens": len(other.tokens),
        "ppl": perplexity(other),
        "ppl_window": perplexity(other, window),
    }
    if dense is not None:
        kl = topk_kl(dense, other, window)
        out["kl_topk_mean"] = sum(kl) / len(kl)
        out["kl_topk_max"] = max(kl)
        out["top1_agree"] = top1_agreement(dense, other, window)
    return out


def _same_tokens(a: PromptScores, b: PromptScores) -> None:
    if a.tokens != b.tokens:
        raise ValueError("the two scores are of different token sequences (different texts or tokenizers)")


def score_policies(
    scorer: HTTPScorer, text: str, policies: Sequence[str], window: int = 256
) -> dict[str, TextMetrics]:
    """Every policy's metrics over HTTP, dense first (the reference of the others)."""
    dense = scorer.score(text, "dense")
    results: dict[str, TextMetrics] = {"dense": compare(dense, None, window)}
    for policy in policies:
        if policy != "dense":
            results[policy] = compare(scorer.score(text, policy), dense, window)
    return results
