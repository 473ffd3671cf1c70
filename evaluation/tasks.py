"""Retrieval cases in real prose: a 5-digit code hidden at a given depth of a prompt of a given length.

- `passkey_case`: a 5-digit code ("The secret number is X. Remember it. X is the secret number.") hidden at
  a given depth of real prose (`haystack_tokens`: `evaluation.corpus.prose_text`, no code, no digits), asked
  through the chat template with the answer started ("The secret number is");
- `multikey_case`: several "secret code of the X" key-value pairs hidden at several depths, one of them
  asked for.

Both build a prompt of a given token length (or at most 16 tokens fewer) and record where the needle landed
(`Case.needle_token`, `Case.depth_actual`). `TASKS` maps a task name to its builder: a new retrieval task is
one function `(llm, length, depth, seed=0) -> Case` added there.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from entropyinfer.evaluation.corpus import prose_text

if TYPE_CHECKING:
    from entropyinfer.shard.llm import LLM

__all__ = [
    "CODE_RE",
    "FILLER_TOKENS",
    "MULTIKEY_DEPTHS",
    "PASSKEY_ANSWER_PREFIX",
    "PASSKEY_NEEDLE",
    "PASSKEY_QUESTION",
    "TASKS",
    "Case",
    "TaskBuilder",
    "haystack_tokens",
    "multikey_case",
    "passkey_case",
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


@dataclass(frozen=True)
class _Prompt:
    """What `_build` fills real text around: the user message's parts, the needles and the asked one."""

    instruction: str
    question: str
    needles: list[tuple[float, str]]  # (depth, sentence) pairs hidden in the haystack
    asked: str  # the needle whose code is the answer
    expected: str  # that code
    answer_prefix: str  # the assistant turn's start
    keys: dict[str, str] = field(default_factory=dict)


FILLER_TOKENS = 16384
"""Tokens of real text tokenized once per tokenizer; every haystack is a prefix of them."""

_FILLER: dict[int, list[int]] = {}


def haystack_tokens(llm: LLM, n: int) -> list[int]:
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


def _build(llm: LLM, task: str, length: int, depth: float, p: _Prompt) -> Case:
    """Fill real text around `p.needles` so that the prompt has `length` tokens. The prompt is the chat
    template's rendering of one user message (instruction, haystack, question) with the assistant turn
    started by `p.answer_prefix`."""
    tok = llm.tokenizer
    prefix_ids = list(tok.encode(p.answer_prefix, add_special_tokens=False)) if p.answer_prefix else []
    filler_n = length  # adjusted until the prompt has `length` tokens (or a few fewer, never more)
    best: tuple[int, list[int], str, list[dict[str, str]]] | None = None
    tried: set[int] = set()
    for _ in range(12):
        tried.add(filler_n)
        text = tok.decode(haystack_tokens(llm, filler_n))
        pieces: list[str] = []
        prev = 0
        for d, sentence in sorted(p.needles):
            cut = max(prev, _sentence_cut(text, round(d * len(text))))
            pieces.append(text[prev:cut])
            pieces.append(("" if cut == 0 or text[cut - 1].isspace() else " ") + sentence + " ")
            prev = cut
        pieces.append(text[prev:])
        haystack = "".join(pieces).strip()
        messages = [{"role": "user", "content": f"{p.instruction}\n\n{haystack}\n\n{p.question}"}]
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
    enc = tok(rendered + p.answer_prefix, add_special_tokens=False)
    if list(enc["input_ids"]) != list(ids):
        raise ValueError(f"{task} prompt: the rendered chat template tokenizes differently from encode()")
    hay_at = rendered.index(haystack)
    code_at = rendered.index(p.asked, hay_at) + p.asked.index(p.expected)
    span = (int(enc.char_to_token(hay_at)), int(enc.char_to_token(hay_at + len(haystack) - 1)) + 1)
    return Case(
        task=task,
        length=length,
        depth=depth,
        messages=messages,
        prompt_ids=ids,
        expected=p.expected,
        needle_token=int(enc.char_to_token(code_at)),
        haystack_span=span,
        keys=p.keys,
        answer_prefix=p.answer_prefix,
    )


def passkey_case(llm: LLM, length: int, depth: float, seed: int = 0) -> Case:
    """A 5-digit code (the "secret number") hidden at `depth` (0..1) of real prose, in a prompt of `length`
    tokens that ends with the answer's start ("The secret number is")."""
    rng = random.Random(f"passkey/{length}/{depth:g}/{seed}")
    (code,) = _codes(rng, 1, llm.tokenizer.decode(haystack_tokens(llm, length)))
    needle = PASSKEY_NEEDLE.format(code=code)
    prompt = _Prompt(
        instruction=PASSKEY_INSTRUCTION,
        question=PASSKEY_QUESTION,
        needles=[(depth, needle)],
        asked=needle,
        expected=code,
        answer_prefix=PASSKEY_ANSWER_PREFIX,
    )
    return _build(llm, "passkey", length, depth, prompt)


def multikey_case(llm: LLM, length: int, depth: float, seed: int = 0) -> Case:
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
    prompt = _Prompt(
        instruction=MULTIKEY_INSTRUCTION,
        question=MULTIKEY_QUESTION.format(key=keys[i]),
        needles=needles,
        asked=needles[i][1],
        expected=codes[i],
        answer_prefix=MULTIKEY_ANSWER_PREFIX.format(key=keys[i]),
        keys=dict(zip(keys, codes, strict=True)),
    )
    return _build(llm, "multikey", length, depth, prompt)


class TaskBuilder(Protocol):
    """Builds the case of one task at one (length, depth)."""

    def __call__(self, llm: LLM, length: int, depth: float, seed: int = 0) -> Case: ...


TASKS: dict[str, TaskBuilder] = {"passkey": passkey_case, "multikey": multikey_case}
"""Task name -> case builder; the names a `QualityPlan.tasks` may hold."""
