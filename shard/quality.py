"""Quality of sparse prefill on a real model: retrieval tasks, scoring, perplexity and logit KL against dense.

Pure functions over an `LLM` (the engine is driven directly, so one loaded model serves every policy and
budget of a sweep):

- `passkey_case`: a 5-digit code ("The secret number is X. Remember it. X is the secret number.") hidden at
  a given depth of real prose (`prose_text`: the plain-sentence paragraphs of CPython's pydoc topics, no
  code, no digits), asked through the chat template with the answer started ("The secret number is");
  `multikey_case`: several "secret code of the X" key-value pairs hidden at several depths, one of them
  asked for. Both build a prompt of a given token length (or at most 16 tokens fewer) and record where the
  needle landed (`Case.needle_token`, `Case.depth_actual`).
- `run_case`: prefill through a policy configuration, then greedy decoding that stops as soon as a 5-digit
  number is complete (or at EOS); `score`: exact match of the answer's first 5-digit number with the code.
- `haystack_metrics`: the same prefill with logits at every position gives the perplexity of the haystack
  (real text) and, against the dense log-probabilities of the same prompt, KL(dense || sparse) and top-1
  agreement over the haystack's last positions (no extra prefill: the passkey case at one depth per length
  computes them).
- `run_matrix`: the whole grid of a `QualityPlan` (lengths x policy configurations x tasks x depths),
  resumable: finished records are passed back in and skipped.
- `run_and_report`: a whole run that saves its partial results after every case.
- `summarize`, `target_verdict`: rows per (length, configuration) for the results table; the issue's target.

`entropyinfer bench quality` and `benchmarks/quality.py` run it.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from entropyinfer.policies.config import SparsePrefillConfig
from entropyinfer.shard.attention import PrefillAttention, build_prefill_attention
from entropyinfer.shard.embedded import real_documents

__all__ = [
    "FULL_PLAN",
    "QUICK_PLAN",
    "Case",
    "PolicySpec",
    "QualityPlan",
    "build_cases",
    "entropy_spec",
    "extract_code",
    "fixed_spec",
    "haystack_metrics",
    "haystack_tokens",
    "markdown_table",
    "multikey_case",
    "passkey_case",
    "run_case",
    "run_matrix",
    "score",
    "summarize",
    "target_verdict",
]

CODE_RE = re.compile(r"(?<!\d)\d{5}(?!\d)")
"""A 5-digit code: five digits with no digit on either side."""

PASSKEY_INSTRUCTION = (
    "A secret number is hidden inside the following text. Find it and remember it. "
    "Then answer: what is the secret number?"
)
PASSKEY_NEEDLE = "The secret number is {code}. Remember it. {code} is the secret number."
PASSKEY_QUESTION = "What is the secret number? Look for it in the text above."
PASSKEY_ANSWER_PREFIX = "The secret number is"
"""The pass-key task (Mohtashami & Jaggi 2023) with "secret number" for "pass key", the question asked before
and after the text, and the assistant turn started with "The secret number is" (the prompt's last tokens).
Pilot, SmolLM2-135M dense, this prose haystack, depths 0.1/0.3/0.5/0.7/0.9:
- the former wording (needle "The pass key is X. Remember it. X is the pass key.", question "What is the pass
  key? Answer with the 5-digit number only."): 1/5 at 4k. In Python's reference "pass" is a statement: the
  model answers 'The pass key is "pass".' (on the whole pydoc topics: "The pass key is a special attribute
  of the class ...");
- "magic number" asked with "Answer with the 5-digit number only.": 0/5 at 4k ("The magic number is 1000.");
  with the answer started ("The magic number is"): 4/5;
- "secret number", the answer started, question only after the text: 5/5 at 4k, 3/5 at 6k (depths 0.1 and
  0.3 lost: " 13." for 13400, " 456." for 45386: the first digits, then a full stop);
- this wording: 4/4 at 4k (0.3 not piloted), 4/5 at 6k (0.1 lost: " 134.");
- the classic synthetic filler ("The grass is green. The sky is blue. ...") is solved at 4k and 6k by every
  wording tried: it tests less than real prose."""

MULTIKEY_INSTRUCTION = (
    "Several secret codes are hidden inside a lot of irrelevant text. Find them and memorize them. "
    "I will quiz you about one of them."
)
MULTIKEY_NEEDLE = "The secret code of the {key} is {code}. Remember it: the {key} has the code {code}."
MULTIKEY_QUESTION = "What is the secret code of the {key}?"
MULTIKEY_ANSWER_PREFIX = "The secret code of the {key} is"
MULTIKEY_KEYS = ("castle", "violin", "harbor", "meadow", "rocket", "lantern", "glacier", "orchard")
MULTIKEY_DEPTHS = (0.1, 0.5, 0.9)
"""Depths of the hidden pairs of a multi-key case (plus the asked depth if it is not one of them). With five
pairs SmolLM2-135M answers 5 of 12 pilot cases densely at 2k-4k, with three 7 of 12: three keep the task
informative (dense must mostly succeed for a sparse policy's loss to show). In the full run with the former
wording dense answered only the last pair's case at every length (1 of 3 at 2k, 4k and 8k: it answers the
last code it read), and with the prose haystack and the answer started the 4k depth-0.1 case still gets the
last pair's code: the task is kept but left out of the plans."""


# ----------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One retrieval prompt (chat messages and their token ids) and the expected 5-digit answer."""

    task: str  # "passkey" | "multikey"
    length: int  # asked prompt length in tokens; the prompt has exactly that many or up to 16 fewer
    depth: float  # asked depth of the needle in the haystack, 0 (start) .. 1 (end)
    messages: list[dict[str, str]]
    prompt_ids: list[int]
    expected: str
    needle_token: int  # index in prompt_ids of the asked needle's first code digit
    haystack_span: tuple[int, int]  # [start, end) token indices of the haystack (filler + needles)
    keys: dict[str, str] = field(default_factory=dict)  # multikey: every hidden key -> code
    answer_prefix: str = ""  # the assistant turn's start, the prompt's last tokens (after the template)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.length}/{self.depth:g}"

    @property
    def depth_actual(self) -> float:
        """Where the asked needle sits in the haystack, by tokens (0 .. 1)."""
        lo, hi = self.haystack_span
        return (self.needle_token - lo) / max(hi - lo, 1)


FILLER_TOKENS = 16384
"""Tokens of real text tokenized once per tokenizer; every haystack is a prefix of them."""

_FILLER: dict[int, list[int]] = {}

_PROSE_CHARS = frozenset(" ,.;:'\"()-?!")


def prose_text() -> str:
    """Real English prose: the paragraphs of CPython's pydoc topics (`shard/embedded.py`, the Language
    Reference; same topics, same order) that are plain sentences: no indented (code or grammar) line, no
    digit, at least 120 characters ending with a full stop, at most 2% of characters other than letters,
    spaces and ,.;:'"()-?!. About 320 paragraphs, 96,000 characters, 21,000 SmolLM2 tokens on Python 3.11.

    Without digits the hidden 5-digit code is the only number of the haystack, and without code the text is
    one register; on the whole topics (grammar rules, code, numbers) SmolLM2-135M answers 1 of 5 dense
    4k-token pass-key cases, on this prose with the same wording also 1 of 5 (the wording was the problem,
    see `PASSKEY_NEEDLE`), but the prose keeps the task about retrieval, not about telling a code from the
    numbers around it."""
    paragraphs: list[str] = []
    for doc in real_documents(len(_topic_names())):
        for para in re.split(r"\n\s*\n", doc):
            lines = para.split("\n")
            if any(line.startswith(" ") for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text) < 120 or not text.endswith(".") or any(c.isdigit() for c in text):
                continue
            if sum(not (c.isalpha() or c in _PROSE_CHARS) for c in text) > 0.02 * len(text):
                continue
            paragraphs.append(text)
    return "\n\n".join(paragraphs)


def _topic_names() -> list[str]:
    from pydoc_data.topics import topics

    from entropyinfer.shard.embedded import MIN_TOPIC_CHARS

    return [name for name in topics if len(topics[name].strip()) >= MIN_TOPIC_CHARS]


def haystack_tokens(llm: Any, n: int) -> list[int]:
    """The first `n` tokens of real English prose (`prose_text`, tokenized once without special tokens),
    so the haystack of a length does not depend on what was built before."""
    key = id(llm.tokenizer)
    if key not in _FILLER:
        _FILLER[key] = list(llm.tokenizer.encode(prose_text(), add_special_tokens=False))[:FILLER_TOKENS]
    tokens = _FILLER[key]
    if not 0 < n <= len(tokens):
        raise ValueError(f"haystack_tokens: n must be between 1 and {len(tokens)}, got {n}")
    return tokens[:n]


def _codes(rng: random.Random, n: int, avoid: str) -> list[str]:
    """`n` distinct 5-digit codes (no leading zero) that do not occur in `avoid`."""
    out: list[str] = []
    while len(out) < n:
        c = str(rng.randrange(10000, 100000))
        if c not in out and c not in avoid:
            out.append(c)
    return out


def _sentence_cut(text: str, at: int) -> int:
    """A character index near `at` just after a sentence or line end (so needles do not split words)."""
    lo = max(0, at - 400)
    window = text[lo:at]
    best = max(window.rfind(". "), window.rfind(".\n"), window.rfind("\n"))
    if best < 0:
        space = window.rfind(" ")
        return lo + space + 1 if space >= 0 else at
    return lo + best + (2 if window[best] == "." else 1)


def _build(
    llm: Any,
    task: str,
    length: int,
    depth: float,
    instruction: str,
    question: str,
    needles: list[tuple[float, str]],
    asked: str,
    expected: str,
    keys: dict[str, str],
    answer_prefix: str,
) -> Case:
    """Fill real text around `needles` ((depth, sentence) pairs) so that the prompt has `length` tokens.
    The prompt is the chat template's rendering of one user message (instruction, haystack, question) with
    the assistant turn started by `answer_prefix`."""
    tok = llm.tokenizer
    prefix_ids = list(tok.encode(answer_prefix, add_special_tokens=False)) if answer_prefix else []
    filler_n = length  # adjusted until the prompt has `length` tokens (or a few fewer, never more)
    best: tuple[int, list[int], str, list[dict[str, str]]] | None = None
    tried: set[int] = set()
    for _ in range(12):
        tried.add(filler_n)
        text = tok.decode(haystack_tokens(llm, filler_n))
        pieces: list[str] = []
        prev = 0
        for d, sentence in sorted(needles):
            cut = max(prev, _sentence_cut(text, round(d * len(text))))
            pieces.append(text[prev:cut])
            pieces.append(("" if cut == 0 or text[cut - 1].isspace() else " ") + sentence + " ")
            prev = cut
        pieces.append(text[prev:])
        haystack = "".join(pieces).strip()
        messages = [{"role": "user", "content": f"{instruction}\n\n{haystack}\n\n{question}"}]
        ids = llm.encode(messages) + prefix_ids
        if len(ids) <= length and (best is None or len(ids) > len(best[1])):
            best = (filler_n, ids, haystack, messages)
        if len(ids) == length:
            break
        step = length - len(ids)
        nxt = filler_n + step
        while nxt in tried:  # oscillating around the target: creep down one token at a time
            nxt -= 1
        filler_n = max(nxt, 1)
    if best is None or len(best[1]) < length - 16:
        raise ValueError(f"could not build a {task} prompt of {length} tokens")
    _, ids, haystack, messages = best
    # Where the haystack and the asked code sit, in tokens (through the fast tokenizer's offsets).
    rendered = str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    enc = tok(rendered + answer_prefix, add_special_tokens=False)
    if list(enc["input_ids"]) != list(ids):
        raise ValueError(f"{task} prompt: the rendered chat template tokenizes differently from encode()")
    hay_at = rendered.index(haystack)
    code_at = rendered.index(asked, hay_at) + asked.index(expected)
    needle_token = enc.char_to_token(code_at)
    span = (enc.char_to_token(hay_at), enc.char_to_token(hay_at + len(haystack) - 1) + 1)
    return Case(
        task=task,
        length=length,
        depth=depth,
        messages=messages,
        prompt_ids=ids,
        expected=expected,
        needle_token=needle_token,
        haystack_span=span,
        keys=keys,
        answer_prefix=answer_prefix,
    )


def passkey_case(llm: Any, length: int, depth: float, seed: int = 0) -> Case:
    """A 5-digit code (the "magic number") hidden at `depth` (0..1) of real prose, in a prompt of `length`
    tokens that ends with the answer's start ("The magic number is")."""
    rng = random.Random(f"passkey/{length}/{depth:g}/{seed}")
    (code,) = _codes(rng, 1, llm.tokenizer.decode(haystack_tokens(llm, length)))
    needle = PASSKEY_NEEDLE.format(code=code)
    return _build(
        llm,
        "passkey",
        length,
        depth,
        PASSKEY_INSTRUCTION,
        PASSKEY_QUESTION,
        [(depth, needle)],
        needle,
        code,
        {},
        PASSKEY_ANSWER_PREFIX,
    )


def multikey_case(llm: Any, length: int, depth: float, seed: int = 0) -> Case:
    """Key-value pairs hidden at `MULTIKEY_DEPTHS` (and `depth`); the question asks for the one at `depth`.

    The pairs and codes depend on (length, seed) only, so the cases of one length share their haystack and
    differ in the question."""
    rng = random.Random(f"multikey/{length}/{seed}")
    depths = sorted({*MULTIKEY_DEPTHS, depth})
    keys = rng.sample(MULTIKEY_KEYS, len(depths))
    codes = _codes(rng, len(depths), llm.tokenizer.decode(haystack_tokens(llm, length)))
    needles = [
        (d, MULTIKEY_NEEDLE.format(key=k, code=c)) for d, k, c in zip(depths, keys, codes, strict=True)
    ]
    i = depths.index(depth)
    return _build(
        llm,
        "multikey",
        length,
        depth,
        MULTIKEY_INSTRUCTION,
        MULTIKEY_QUESTION.format(key=keys[i]),
        needles,
        needles[i][1],
        codes[i],
        dict(zip(keys, codes, strict=True)),
        MULTIKEY_ANSWER_PREFIX.format(key=keys[i]),
    )


TASKS: dict[str, Callable[..., Case]] = {"passkey": passkey_case, "multikey": multikey_case}


# ----------------------------------------------------------------------------------------------------------
# Answering and scoring
# ----------------------------------------------------------------------------------------------------------


def extract_code(text: str) -> str | None:
    """The first 5-digit number of an answer (no digit on either side), or None."""
    m = CODE_RE.search(text)
    return m.group(0) if m else None


def score(answer_text: str, expected: str) -> bool:
    """Exact match: the answer's first 5-digit number is the expected code."""
    return extract_code(answer_text) == expected


# ----------------------------------------------------------------------------------------------------------
# The matrix
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicySpec:
    """A policy configuration of the matrix: `policy` with sparse-config `overrides` on the plan's preset."""

    name: str
    policy: str  # "dense" | "entropy" | "fixed"
    overrides: tuple[tuple[str, Any], ...] = ()

    def config(self, base: SparsePrefillConfig) -> SparsePrefillConfig:
        return dataclasses.replace(base, **dict(self.overrides))

    def describe(self, base: SparsePrefillConfig) -> dict[str, Any]:
        cfg = self.config(base)
        if self.policy == "dense":
            return {"config": self.name, "policy": "dense", "budget": None, "mode": None}
        budget = cfg.base_budget if self.policy == "entropy" else cfg.fixed_budget
        mode = cfg.mode if self.policy == "entropy" else None
        return {"config": self.name, "policy": self.policy, "budget": budget, "mode": mode}


def entropy_spec(b0: int, mode: str = "per_head") -> PolicySpec:
    suffix = "" if mode == "per_head" else f" {mode}"
    return PolicySpec(f"entropy B0={b0}{suffix}", "entropy", (("base_budget", b0), ("mode", mode)))


def fixed_spec(budget: int) -> PolicySpec:
    return PolicySpec(f"fixed {budget}", "fixed", (("fixed_budget", budget),))


DENSE = PolicySpec("dense", "dense")


@dataclass(frozen=True)
class QualityPlan:
    """What `run_matrix` runs. `main` configurations run at every length, `sweep` ones at `sweep_lengths`.

    At every length the passkey case at `logits_depth` also returns the logits of every position: perplexity
    of its haystack (real text) and KL(dense || sparse) over the haystack's last `kl_window` positions."""

    name: str
    preset: str
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    main: tuple[PolicySpec, ...]
    sweep: tuple[PolicySpec, ...]
    sweep_lengths: tuple[int, ...]
    logits_depth: float = 0.5
    kl_window: int = 1024
    max_tokens: int = 16
    target_length: int = 8176
    target_density: float = 0.30
    target_points: float = 2.0

    def specs_at(self, length: int) -> list[PolicySpec]:
        specs = list(self.main) + (
            [s for s in self.sweep if s not in self.main] if length in self.sweep_lengths else []
        )
        return sorted(specs, key=lambda s: s.policy != "dense")  # dense first: KL needs its log-probs

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["main"] = [s.name for s in self.main]
        d["sweep"] = [s.name for s in self.sweep]
        return d


FULL_PLAN = QualityPlan(
    name="full",
    preset="entropy_short",
    tasks=("passkey",),
    # Longest first (the target is at 8k). 8176 + up to 16 generated tokens = SmolLM2's 8192. Fixed budgets
    # of about the entropy configurations' densities: fixed 256 ~ entropy B0=128, fixed 512 ~ B0=256 at 8k.
    # About 55 minutes on the shared 2-core machine (one torch thread).
    lengths=(8176, 6144, 4096, 2048),
    depths=(0.1, 0.3, 0.5, 0.7, 0.9),
    main=(DENSE, entropy_spec(128), entropy_spec(256), fixed_spec(256), fixed_spec(512)),
    sweep=(entropy_spec(384), entropy_spec(512), entropy_spec(256, "reference"), fixed_spec(128)),
    sweep_lengths=(8176,),
)

QUICK_PLAN = QualityPlan(
    name="quick",
    preset="entropy_short",
    tasks=("passkey",),
    lengths=(2048, 1024),
    depths=(0.5,),
    main=(DENSE, entropy_spec(256), fixed_spec(256)),
    sweep=(entropy_spec(128),),
    sweep_lengths=(2048,),
    kl_window=512,
    target_length=2048,
)


def _record_key(config: str, task: str, length: int, depth: float) -> str:
    return f"{config}|{task}|{length}|{depth:g}"


def _prompt_hash(ids: Sequence[int]) -> str:
    import hashlib

    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:16]


def run_case(
    llm: Any,
    case: Case,
    spec: PolicySpec,
    base: SparsePrefillConfig,
    *,
    max_tokens: int = 16,
    logits: bool = False,
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Answer one case under one configuration; with `logits`, also return the fp32 logits of every prompt
    position (for perplexity and KL). Returns the record and the logits (or None)."""
    attention = build_prefill_attention(spec.policy, spec.config(base))
    text, stats, all_logits = _answer(llm, case.prompt_ids, attention, max_tokens, logits)
    budget = stats.get("budget_tokens") or {}
    record: dict[str, Any] = {
        **spec.describe(base),
        "task": case.task,
        "length": case.length,
        "tokens": len(case.prompt_ids),
        "depth": case.depth,
        "depth_actual": round(case.depth_actual, 4),
        "prompt_sha": _prompt_hash(case.prompt_ids),
        "expected": case.expected,
        "answer": text,
        "correct": score(text, case.expected),
        "density": stats.get("density"),
        "rigid_fraction": stats.get("rigid_fraction"),
        "budget_mean": budget.get("mean"),
        "prefill_s": round(stats["prefill_s"], 2),
        "decode_s": round(stats["decode_s"], 2),
        "generated_tokens": stats["generated_tokens"],
    }
    return record, all_logits


def _answer(
    llm: Any, prompt_ids: Sequence[int], attention: PrefillAttention, max_tokens: int, all_logits: bool
) -> tuple[str, dict[str, Any], torch.Tensor | None]:
    engine = llm.engine
    n = len(prompt_ids)
    cache = engine.new_cache(1, n + max_tokens)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = engine.prefill(
            torch.tensor(list(prompt_ids), dtype=torch.long), cache, 0, attention, all_logits=all_logits
        )
    prefill_s = time.perf_counter() - t0
    first = out[-1] if all_logits else out
    t1 = time.perf_counter()
    text, generated = _greedy(llm, cache, n, int(first.argmax()), max_tokens)
    stats = dict(attention.stats())
    stats.pop("rigid_fraction_per_layer", None)
    stats.update(prefill_s=prefill_s, decode_s=time.perf_counter() - t1, generated_tokens=generated)
    return text, stats, (out.float() if all_logits else None)


@torch.inference_mode()
def _greedy(llm: Any, cache: Any, n: int, token: int, max_tokens: int) -> tuple[str, int]:
    """Greedy decode from the first token; stops at EOS, at `max_tokens`, or once a 5-digit number is
    complete (followed by a non-digit). Returns the text and the number of generated tokens."""
    engine = llm.engine
    pos = torch.tensor([n], dtype=torch.long, device=engine.device)
    generated: list[int] = []
    text = ""
    while token not in llm.eos_token_ids and len(generated) < max_tokens:
        generated.append(token)
        text = llm.tokenizer.decode(generated, skip_special_tokens=True)
        m = CODE_RE.search(text)
        if (m and m.end() < len(text.rstrip())) or len(generated) >= max_tokens:
            break
        logits = engine.decode_step(torch.tensor([token], device=engine.device), pos, cache)[0]
        pos += 1
        token = int(logits.argmax())
        if m and not llm.tokenizer.decode([token]).lstrip()[:1].isdigit():
            break  # the code is complete: the next token is not a digit
    return text, len(generated)


def _kl_window(case: Case, window: int) -> tuple[int, int]:
    """[lo, hi): the haystack's last `window` positions (clipped to the haystack)."""
    lo, hi = case.haystack_span
    return max(lo, hi - window), hi


def haystack_metrics(
    logits: torch.Tensor, case: Case, window: int, dense_logprobs: torch.Tensor | None
) -> dict[str, float]:
    """Perplexity of the haystack's real text (positions inside the haystack predicting the next haystack
    token), perplexity over the last `window` positions, and against dense: KL(dense || this) mean and max
    (nats) and top-1 agreement over that window."""
    lo, hi = case.haystack_span
    w_lo, w_hi = _kl_window(case, window)
    ids = case.prompt_ids
    out = {
        "ppl": _ppl(logits, ids, lo, hi - 1),
        "ppl_window": _ppl(logits, ids, w_lo, w_hi - 1),
    }
    if dense_logprobs is not None:
        lp = torch.log_softmax(logits[w_lo:w_hi], dim=-1)
        kl = (dense_logprobs.exp() * (dense_logprobs - lp)).sum(-1)
        out["kl_mean"] = float(kl.mean())
        out["kl_max"] = float(kl.max())
        out["top1_agree"] = float((lp.argmax(-1) == dense_logprobs.argmax(-1)).float().mean())
    return out


def _ppl(logits: torch.Tensor, ids: Sequence[int], lo: int, hi: int) -> float:
    """exp(mean NLL) of positions lo..hi-1 predicting tokens lo+1..hi."""
    targets = torch.tensor(list(ids[lo + 1 : hi + 1]), dtype=torch.long, device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits[lo:hi].float(), targets, reduction="mean")
    return float(math.exp(nll.item()))


def build_cases(llm: Any, plan: QualityPlan) -> list[Case]:
    return [TASKS[t](llm, n, d) for n in plan.lengths for t in plan.tasks for d in plan.depths]


def run_matrix(
    llm: Any,
    plan: QualityPlan,
    done: Iterable[dict[str, Any]] = (),
    on_record: Callable[[list[dict[str, Any]]], object] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every (length, configuration, task, depth) of `plan`, skipping those in `done` (records of an
    earlier, interrupted run whose prompt is unchanged). Calls `on_record(records)` after every new record,
    so the caller can save partial results. Returns all records of the plan, in run order."""
    from entropyinfer.policies.config import load_sparse_config

    base = load_sparse_config(plan.preset)
    previous = {
        _record_key(r["config"], r["task"], r["length"], r["depth"]): r for r in done if "config" in r
    }
    records: list[dict[str, Any]] = []
    cases = {c.key: c for c in build_cases(llm, plan)}
    total = sum(len(plan.specs_at(n)) * len(plan.tasks) * len(plan.depths) for n in plan.lengths)
    t_start = time.perf_counter()
    new = 0
    for length in plan.lengths:
        dense_lp: torch.Tensor | None = None
        for spec in plan.specs_at(length):
            for task in plan.tasks:
                for depth in plan.depths:
                    case = cases[f"{task}/{length}/{depth:g}"]
                    key = _record_key(spec.name, task, length, depth)
                    want_logits = task == "passkey" and depth == plan.logits_depth
                    old = previous.get(key)
                    if old is not None and old.get("prompt_sha") == _prompt_hash(case.prompt_ids):
                        records.append(old)
                        continue
                    if want_logits and spec.policy != "dense" and dense_lp is None:
                        dense_lp = _dense_logprobs(llm, case, base, plan)
                    record, logits = run_case(
                        llm, case, spec, base, max_tokens=plan.max_tokens, logits=want_logits
                    )
                    if logits is not None:
                        if spec.policy == "dense":
                            w_lo, w_hi = _kl_window(case, plan.kl_window)
                            dense_lp = torch.log_softmax(logits[w_lo:w_hi], dim=-1)
                        record.update(
                            haystack_metrics(
                                logits, case, plan.kl_window, dense_lp if spec.policy != "dense" else None
                            )
                        )
                        del logits
                    records.append(record)
                    new += 1
                    elapsed = time.perf_counter() - t_start
                    log(
                        f"[{len(records)}/{total}] {key}: {'ok ' if record['correct'] else 'MISS'} "
                        f"{record['answer']!r} (expected {case.expected}) density {record['density']:.3f} "
                        f"prefill {record['prefill_s']:.1f}s; {new} new in {elapsed / 60:.1f} min"
                    )
                    if on_record is not None:
                        on_record(records)
    return records


def _dense_logprobs(llm: Any, case: Case, base: SparsePrefillConfig, plan: QualityPlan) -> torch.Tensor:
    """Dense log-probabilities over the KL window of `case` (when resuming after the dense record)."""
    attention = build_prefill_attention("dense", base)
    n = len(case.prompt_ids)
    cache = llm.engine.new_cache(1, n)
    with torch.inference_mode():
        logits = llm.engine.prefill(
            torch.tensor(case.prompt_ids, dtype=torch.long), cache, 0, attention, all_logits=True
        )
    w_lo, w_hi = _kl_window(case, plan.kl_window)
    return torch.log_softmax(logits[w_lo:w_hi].float(), dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = [
    "length",
    "config",
    "passkey",
    "multikey",
    "accuracy_%",
    "vs_dense_pts",
    "agree_dense_%",
    "density",
    "rigid",
    "budget_mean",
    "ppl",
    "ppl_window",
    "kl_mean",
    "top1_agree",
    "prefill_s",
]


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (length, configuration): accuracy per task (correct/cases) and overall, the difference
    to dense in points, how often the answer's code equals dense's answer (right or wrong), mean density /
    rigid fraction / budget, the perplexity / KL of the logits case."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    dense_answers = {
        (r["task"], r["length"], r["depth"]): extract_code(r["answer"])
        for r in records
        if r["policy"] == "dense"
    }
    for r in records:
        groups.setdefault((r["length"], r["config"]), []).append(r)
    rows: list[dict[str, Any]] = []
    dense_acc: dict[int, float] = {}
    for (length, config), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], _config_order(kv[1][0]))):
        row: dict[str, Any] = {"length": length, "config": config, "policy": rs[0]["policy"]}
        row["budget"], row["mode"] = rs[0].get("budget"), rs[0].get("mode")
        for task in ("passkey", "multikey"):
            t = [r for r in rs if r["task"] == task]
            row[task] = f"{sum(r['correct'] for r in t)}/{len(t)}" if t else None
        acc = 100.0 * sum(r["correct"] for r in rs) / len(rs)
        row["cases"] = len(rs)
        row["accuracy_%"] = round(acc, 1)
        if config == "dense":
            dense_acc[length] = acc
        row["vs_dense_pts"] = round(acc - dense_acc[length], 1) if length in dense_acc else None
        same = [
            extract_code(r["answer"]) == dense_answers[key]
            for r in rs
            if (key := (r["task"], r["length"], r["depth"])) in dense_answers
        ]
        row["agree_dense_%"] = round(100.0 * sum(same) / len(same), 1) if same else None
        for k in ("density", "rigid_fraction", "budget_mean", "prefill_s"):
            vals = [r[k] for r in rs if r.get(k) is not None]
            row[k] = round(sum(vals) / len(vals), 4) if vals else None
        row["rigid"] = row.pop("rigid_fraction")
        with_logits = [r for r in rs if "ppl" in r]
        for k in ("ppl", "ppl_window", "kl_mean", "kl_max", "top1_agree"):
            row[k] = round(with_logits[0][k], 4) if with_logits and k in with_logits[0] else None
        rows.append(row)
    return rows


def _config_order(record: dict[str, Any]) -> tuple[int, int, str]:
    order = {"dense": 0, "entropy": 1, "fixed": 2}
    return (order.get(record["policy"], 3), record.get("budget") or 0, record.get("mode") or "")


def target_verdict(
    rows: Sequence[dict[str, Any]], plan: QualityPlan, records: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """The issue's target at `plan.target_length`: an entropy configuration within `target_points` of dense
    accuracy at a density of at most `target_density`. With `records`, also which cases dense solves there
    and how many of those each entropy configuration solves too."""
    at = [r for r in rows if r["length"] == plan.target_length]
    dense = next((r for r in at if r["config"] == "dense"), None)
    solved = {
        (r["task"], r["depth"])
        for r in records
        if r["length"] == plan.target_length and r["policy"] == "dense" and r["correct"]
    }
    candidates = []
    for r in at:
        if r["policy"] != "entropy" or r["density"] is None:
            continue
        c = {k: r[k] for k in ("config", "accuracy_%", "vs_dense_pts", "density", "cases", "kl_mean")}
        if records:
            c["solves_of_dense"] = sum(
                1
                for x in records
                if x["length"] == plan.target_length
                and x["config"] == r["config"]
                and x["correct"]
                and (x["task"], x["depth"]) in solved
            )
        candidates.append(c)
    met = [
        c
        for c in candidates
        if c["density"] <= plan.target_density
        and c["vs_dense_pts"] is not None
        and c["vs_dense_pts"] >= -plan.target_points
    ]
    return {
        "length": plan.target_length,
        "dense_accuracy_%": dense["accuracy_%"] if dense else None,
        "dense_solved": sorted(f"{t}@{d:g}" for t, d in solved),
        "entropy": candidates,
        "met": bool(met),
        "met_by": [c["config"] for c in met],
    }


def markdown_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# A whole run: resumable, saved after every case
# ----------------------------------------------------------------------------------------------------------

WriteFn = Callable[[str, list[str], list[dict[str, Any]], dict[str, Any], str], Any]
"""`write(title, columns, rows, meta, notes)`: persist the table and meta (JSON + markdown)."""

DEFAULT_THREADS = 1
"""torch CPU threads of a quality run. On a shared 2-core machine one thread is much faster: the sparse
prefill's torch reference runs thousands of small ops, each a parallel region whose threads wait for one
another when the cores are busy (measured, 2k tokens, entropy prefill: 8 s with 1 thread, 95-112 s with 2;
dense: 8 s against 18 s)."""

MODEL_NOTE = "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized to fp32), CPU, torch reference kernels"


def machine() -> dict[str, Any]:
    """Date, versions and CPU facts for the results header (model name, cores, torch threads)."""
    import datetime
    import os
    import platform

    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def run_and_report(
    plan: QualityPlan,
    write: WriteFn,
    *,
    previous: dict[str, Any] | None = None,
    env: dict[str, Any] | None = None,
    command: str = "",
    llm: Any = None,
    threads: int | None = DEFAULT_THREADS,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run `plan` on SmolLM2 (or `llm`), calling `write` after every case (partial results, `complete`
    False) and once at the end. `previous` is the JSON of an earlier run of the plan ({"meta", "rows"}):
    its finished cases are kept, and its run time is added to this one's. `threads`: torch CPU threads
    (None leaves torch's default). Returns the final meta."""
    if threads is not None:
        torch.set_num_threads(threads)
    if llm is None:
        from entropyinfer import LLM

        llm = LLM("smollm2-135m", device="cpu")
    from entropyinfer.policies.config import load_sparse_config

    prev_meta = (previous or {}).get("meta", {})
    done = prev_meta.get("cases", []) if prev_meta.get("plan", {}).get("name") == plan.name else []
    prior_s = float(prev_meta.get("run_seconds", 0.0)) if done else 0.0
    t0 = time.perf_counter()
    base = load_sparse_config(plan.preset)
    title = f"Quality of sparse prefill vs dense: {MODEL_NOTE} ({plan.name} plan)"

    def save(records: list[dict[str, Any]], complete: bool = False) -> dict[str, Any]:
        rows = summarize(records)
        verdict = target_verdict(rows, plan, records)
        meta = {
            "env": {**(env or {}), **machine()},
            "model": MODEL_NOTE,
            "command": command,
            "complete": complete,
            "run_seconds": round(prior_s + time.perf_counter() - t0, 1),
            "plan": plan.to_dict(),
            "preset": dataclasses.asdict(base),
            "target": verdict,
            "cases": records,
        }
        columns = [c for c in SUMMARY_COLUMNS if c not in TASKS or c in plan.tasks]
        write(title, columns, rows, meta, report_notes(plan, meta))
        return meta

    if done:
        log(f"resuming: {len(done)} finished cases from the earlier run")
    records = run_matrix(llm, plan, done, on_record=save, log=log)
    return save(records, complete=True)


def report_notes(plan: QualityPlan, meta: dict[str, Any]) -> str:
    """The text under the results table: what was run, the target verdict, how to read the columns."""
    v = meta["target"]
    cases_at_target = len(plan.tasks) * len(plan.depths)
    status = "complete" if meta["complete"] else "PARTIAL (still running or interrupted)"
    cfg = meta["preset"]
    depths = ", ".join(f"{d:g}" for d in plan.depths)
    key_depths = ", ".join(f"{d:g}" for d in MULTIKEY_DEPTHS)
    verdict = (
        f"MET by: {', '.join(v['met_by'])}."
        if v["met"]
        else "NOT MET by any entropy configuration run at a density <= the target."
    )
    lines = [
        f"Run: `{meta['command']}`; {status}, {meta['run_seconds'] / 60:.1f} min of wall time, "
        f"{len(meta['cases'])} cases.",
        "",
        f"Tasks: {', '.join(plan.tasks)}; prompt lengths {', '.join(map(str, plan.lengths))} tokens "
        f"(chat template included); depths {depths}; greedy, exact match of the 5-digit code. "
        "Haystack: real prose (the plain-sentence paragraphs of CPython's pydoc topics: no code, no "
        "digits). Passkey: needle 'The secret number is X. Remember it. X is the secret number.', "
        "question before and after the text, assistant turn started with 'The secret number is'."
        + (
            f" Multi-key: {len(MULTIKEY_DEPTHS)} pairs 'The secret code of the K is X. ...' at depths "
            f"{key_depths} (plus the asked depth), one asked, answer started with "
            "'The secret code of the K is'."
            if "multikey" in plan.tasks
            else ""
        ),
        f"Preset `{plan.preset}` (S={cfg['segment_size']}, b={cfg['block_size']}, threshold "
        f"{cfg['threshold_len']}); `entropy B0=x`: base budget x (per_head mode unless named); `fixed x`: "
        "x tokens per (KV head, segment). Sweep configurations run only at "
        f"{', '.join(map(str, plan.sweep_lengths))} tokens.",
        "density: fraction of the causal QK work computed, averaged over layers (layer 0 is dense) and "
        "cases; rigid: rigid (layer, KV head) fraction; budget_mean: mean tokens per (KV head, sparse "
        "segment).",
        "agree_dense_%: cases whose answer code equals dense's (right or wrong). ppl: perplexity of the "
        f"haystack (real text) of the passkey prompt at depth {plan.logits_depth:g}, from the same "
        "prefill; ppl_window, kl_mean (KL(dense || policy), nats, mean per position), top1_agree: over "
        f"the haystack's last {plan.kl_window} positions. The pydoc topics repeat some sections, so the "
        "haystack repeats paragraphs; where the window holds repeats of earlier paragraphs (at 8176 tokens: "
        "dense ppl_window about 4 against 10-14 elsewhere) dense predicts them by copying from far back, "
        "and kl_mean there measures long-range copying more than local text.",
        "",
        f"Target (issue 3): entropy within {plan.target_points:g} points of dense accuracy at a density "
        f"of at most {plan.target_density:.0%} at {v['length']} tokens. Dense accuracy there: "
        f"{v['dense_accuracy_%']}% over {cases_at_target} cases (one case = "
        f"{100 / cases_at_target:.1f} points, so 'within 2 points' means no case lost). {verdict}",
    ]
    solved = v.get("dense_solved", [])
    for c in v["entropy"]:
        also = f", solves {c['solves_of_dense']} of dense's {len(solved)}" if "solves_of_dense" in c else ""
        kl = f", KL {c['kl_mean']:.3g} nats" if c.get("kl_mean") is not None else ""
        lines.append(
            f"- {c['config']}: accuracy {c['accuracy_%']}% ({c['vs_dense_pts']:+} points vs dense), "
            f"density {c['density']:.3f}{kl}{also}"
        )
    if solved:
        lines += [
            "",
            f"Dense solves at {v['length']} tokens: {', '.join(solved)} (task@depth); the accuracy "
            "comparison there rests on those cases.",
        ]
    correct: dict[tuple[int, str], int] = {}
    for x in meta["cases"]:
        correct[(x["length"], x["config"])] = correct.get((x["length"], x["config"]), 0) + bool(x["correct"])
    per_length = []
    for length in plan.lengths:
        parts = [
            f"{r['config']} {correct[(length, r['config'])]}/{r['cases']}"
            + (f" ({r['density']:.2f})" if r["density"] is not None and r["policy"] != "dense" else "")
            for r in summarize(meta["cases"])
            if r["length"] == length
        ]
        if parts:
            per_length.append(f"- {length}: " + "; ".join(parts))
    if per_length:
        lines += ["", "Correct cases per length (mean density):", *per_length, ""]
    lines.append(
        "Reading the retrieval numbers: the question, and so the answer, sit in the prompt's last segment, "
        "which every policy computes densely (ALGORITHM.md, step 8), and every segment attends its own keys: "
        "retrieval tests whether the needle's keys and values survive the sparse layers below, a weaker test "
        "than KL / perplexity over the haystack's sparse segments."
    )
    return "\n".join(lines)


def file_writer(folder: str, name: str) -> WriteFn:
    """A `WriteFn` writing `<name>.json` ({"meta", "rows"}) and `<name>.md` into `folder`."""
    import json
    from pathlib import Path

    def write(
        title: str, columns: list[str], rows: list[dict[str, Any]], meta: dict[str, Any], notes: str
    ) -> None:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        env = ", ".join(f"{k}: {v}" for k, v in meta.get("env", {}).items() if v is not None)
        text = f"# {title}\n\n{env}\n\n{markdown_table(columns, rows)}\n\n{notes}\n"
        (out / f"{name}.md").write_text(text)

    return write


def load_previous(path: str) -> dict[str, Any] | None:
    """The JSON of an earlier run at `path`, or None if there is none (or it is unreadable)."""
    import json

    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
