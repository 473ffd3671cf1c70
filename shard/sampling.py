"""Sampling parameters (validated on construction, against one table of limits) and the token sampler.

`LIMITS` is the one place the accepted ranges live: the HTTP edge (cluster/schemas.py) builds a
`SamplingParams`, so a request is checked once, here, and its `InvalidRequestError` names the field.
Ranges follow OpenAI's own (temperature [0, 2], top_p (0, 1]); `max_tokens` is capped again by a
server's config (`limits.max_tokens`) in the ingress.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from entropyinfer.errors import InvalidRequestError

if TYPE_CHECKING:  # torch is imported where tokens are sampled: the HTTP edge and the client never need it
    import torch


@dataclass(frozen=True)
class Range:
    """A closed range [lo, hi], or (lo, hi] when `lo_open`."""

    lo: float
    hi: float
    lo_open: bool = False

    def __contains__(self, value: float) -> bool:
        return (self.lo < value if self.lo_open else self.lo <= value) and value <= self.hi

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}]"


MAX_TOKENS_LIMIT = 1 << 20
MAX_STOP_SEQUENCES = 8
MAX_LOGPROBS = 20  # top alternatives per token (vLLM's default max_logprobs; OpenAI's top_logprobs limit)
MAX_N = 16  # sequences per request
LIMITS: dict[str, Range] = {
    "max_tokens": Range(1, MAX_TOKENS_LIMIT),
    "temperature": Range(0.0, 2.0),
    "top_p": Range(0.0, 1.0, lo_open=True),
    "top_k": Range(0, 1 << 31),  # 0 = off
    "seed": Range(0, 2**63 - 1),
    "logprobs": Range(0, MAX_LOGPROBS),
    "prompt_logprobs": Range(0, MAX_LOGPROBS),
    "n": Range(1, MAX_N),
}
_INTEGERS = ("max_tokens", "top_k", "seed", "logprobs", "prompt_logprobs", "n")
_OPTIONAL = ("seed", "logprobs", "prompt_logprobs")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off.

    logprobs=k (vLLM's meaning): every generated token carries its own logprob and the k most likely
    alternatives' (log_softmax of the model's raw logits, fp32); prompt_logprobs=k: every prompt token's
    logprob given its prefix, and its k alternatives (the first token has none). n: sequences per
    request (`LLM.generate` and the HTTP edge fan a request out; each sequence its own seed)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name} {why} (got {getattr(self, name)!r})", field=name)

        for name, bounds in LIMITS.items():
            v = getattr(self, name)
            if name in _OPTIONAL and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int if name in _INTEGERS else (int, float)):
                raise bad(name, "must be an integer" if name in _INTEGERS else "must be a number")
            if isinstance(v, float) and not math.isfinite(v):
                raise bad(name, "must be a finite number")
            if v not in bounds:
                raise bad(name, f"must be in {bounds}")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is not None:
            if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
                raise bad("stop", "must be a non-empty string or a list of non-empty strings")
            if len(stop) > MAX_STOP_SEQUENCES:
                raise bad("stop", f"must have at most {MAX_STOP_SEQUENCES} sequences")
            object.__setattr__(self, "stop", list(stop))
        ids = self.stop_token_ids
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids
        ):
            raise bad("stop_token_ids", "must be a list of token ids")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be true or false")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def fork(self, j: int) -> SamplingParams:
        """The sampling of sequence j of an n-sequence request: n=1, and seed + j (its own stream) when a
        seed is given."""
        seed = None if self.seed is None else (self.seed + j) % 2**63
        return dataclasses.replace(self, n=1, seed=seed)

    def to_dict(self) -> dict[str, object]:
        """Plain data (JSON and msgpack): every field, `stop` as a list or None."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> SamplingParams:
        """The inverse of `to_dict` (missing fields take their defaults); an unknown key is an
        InvalidRequestError naming it, like a value out of range."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise InvalidRequestError(f"{key}: not a sampling parameter", field=str(key))
        return cls(**data)  # type: ignore[arg-type]  # the values are checked in __post_init__


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _plain(value: object) -> object:
    return list(value) if isinstance(value, (list, tuple)) else value


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    import torch

    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from one row of fp32 logits [vocab]."""
    import torch

    if params.greedy:
        return int(torch.argmax(logits).item())
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = sorted_probs.cumsum(-1)
        drop = cumulative - sorted_probs > params.top_p  # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())


TokenLogprobs = dict[int, float]  # token id -> logprob: the chosen token's and the top-k alternatives'


def logprobs_of(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """Rows of logits [R, vocab] and the token chosen at each row [R] -> per row {token: logprob} of the
    chosen token and the k most likely (log_softmax in fp32; k+1 entries when the chosen one is not
    among the top k)."""
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    picked = lp.gather(-1, chosen.to(lp.device).long()[:, None])[:, 0].tolist()
    out: list[TokenLogprobs] = []
    if k > 0:
        top = torch.topk(lp, k, dim=-1)
        values, ids = top.values.tolist(), top.indices.tolist()
    for r, token in enumerate(chosen.tolist()):
        row: TokenLogprobs = {int(token): float(picked[r])}
        if k > 0:
            row.update(zip(ids[r], values[r], strict=True))
            row[int(token)] = float(picked[r])
        out.append(row)
    return out


def top_logprobs(row: TokenLogprobs, k: int) -> list[tuple[int, float]]:
    """The k most likely of one position's entries, most likely first."""
    return sorted(row.items(), key=lambda item: -item[1])[:k]
