"""In-prompt recall: retrieval that sparse prefill itself has to do (issue 12).

The retrieval tasks of `evaluation/tasks.py` ask their question at the prompt's end, and the prompt's last
segment runs dense (and decoding is dense while KV compression is off), so the answer can always attend to
the needle: what sparse prefill changes there is only how the needle's own tokens were encoded. Here the
retrieval happens *inside* the prompt, at positions whose keys the sparse prefill chooses (the budget sets
how many blocks, the block ranking which).

A prompt is real prose (`haystack_tokens`) with `pairs` definitions ("Code name Willow Anchor: 48213.", a
two-word name drawn from `RECALL_KEYS`) in its first part and, later, the same sentence again for each, in
another order, so the distances vary. Teacher-forced, one prefill gives every probe: a probe is the repeated
sentence's code, and it is correct when the model's top-1 prediction is the right digit at each of its code
tokens given the true tokens before (the first digit alone is reported as well). The codes are the only digits
of the prompt, and each occurs exactly twice.

Pilot (SmolLM2-135M dense, 4096 tokens, 8 pairs): with the wording "The secret code of the castle is X."
and the recall "As said before, the secret code of the castle is X." dense got 3 of 8; with the two-word
names and the definition repeated word for word, 7 of 8.

- `recall_prompt(llm, length, seed)`: a `RecallPrompt` of exactly `length` tokens (ids, probes);
- `score_recall(logits, prompt)`: per probe, (all code tokens right, first code token right).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from entropyinfer.evaluation.tasks import haystack_tokens

if TYPE_CHECKING:
    from entropyinfer.shard.llm import LLM

__all__ = ["RECALL_KEYS", "Probe", "RecallPrompt", "recall_prompt", "score_recall"]

DEFINITION = "Code name {key}: {code}."
RECALL = "Code name {key}: {code}."
RECALL_KEYS = (
    "castle", "violin", "harbor", "meadow", "rocket", "lantern", "glacier", "orchard", "falcon", "compass",
    "saddle", "kettle", "canyon", "pebble", "trumpet", "walnut", "copper", "thistle", "beacon", "marble",
    "willow", "anchor", "cobalt", "juniper", "quarry", "tundra", "velvet", "zephyr", "almond", "bramble",
)  # fmt: skip


@dataclass(frozen=True)
class Probe:
    """One recall: the key, its code, where its definition and its recall's code tokens sit."""

    key: str
    code: str
    defined_at: int  # token index of the definition's first code token
    code_tokens: tuple[
        int, ...
    ]  # token indices of the recall's code tokens (each predicted from the one before)

    @property
    def distance(self) -> int:
        return self.code_tokens[0] - self.defined_at


@dataclass(frozen=True)
class RecallPrompt:
    """A recall prompt's token ids (exactly `length`) and its probes, in prompt order."""

    length: int
    seed: int
    ids: list[int]
    probes: list[Probe]


def recall_prompt(
    llm: LLM,
    length: int,
    seed: int = 0,
    pairs: int = 8,
    define_span: tuple[float, float] = (0.05, 0.45),
    recall_span: tuple[float, float] = (0.5, 0.9),
) -> RecallPrompt:
    """`pairs` definitions spread over `define_span` of a `length`-token prompt of real prose, one recall of
    each over `recall_span` in a shuffled order. Pieces are tokenized on their own (with a leading space) and
    spliced in at token boundaries just after a full stop of the haystack, so token positions are exact."""
    if not 1 <= 2 * pairs <= len(RECALL_KEYS):
        raise ValueError(f"recall_prompt: pairs must be between 1 and {len(RECALL_KEYS) // 2}, got {pairs}")
    rng = random.Random(f"recall/{length}/{seed}")
    tok = llm.tokenizer
    words = rng.sample(RECALL_KEYS, 2 * pairs)
    keys = [f"{words[2 * i].title()} {words[2 * i + 1].title()}" for i in range(pairs)]
    codes: list[str] = []
    while len(codes) < pairs:
        c = str(rng.randrange(10000, 100000))
        if c not in codes:
            codes.append(c)
    order = list(range(pairs))
    rng.shuffle(order)

    def enc(text: str) -> list[int]:
        return list(tok.encode(" " + text, add_special_tokens=False))

    defs = [enc(DEFINITION.format(key=k, code=c)) for k, c in zip(keys, codes, strict=True)]
    recs = [enc(RECALL.format(key=keys[i], code=codes[i])) for i in order]
    extra = sum(map(len, defs)) + sum(map(len, recs))
    hay = haystack_tokens(llm, length - extra)
    period = set(tok.encode(".", add_special_tokens=False)) | set(tok.encode(". ", add_special_tokens=False))

    def cut(frac: float) -> int:  # a token index just after a full stop near `frac` of the haystack
        at = round(frac * len(hay))
        for j in range(at, max(at - 200, 1), -1):
            if hay[j - 1] in period:
                return j
        return at

    def spread(span: tuple[float, float], n: int) -> list[float]:
        lo, hi = span
        return [lo + (hi - lo) * (i + 0.5) / n for i in range(n)]

    # (cut, piece, pair, is_recall); spliced from the end so earlier cuts stay put
    spots = [
        (cut(f), d, i, False) for i, (f, d) in enumerate(zip(spread(define_span, pairs), defs, strict=True))
    ]
    spots += [
        (cut(f), r, order[j], True)
        for j, (f, r) in enumerate(zip(spread(recall_span, pairs), recs, strict=True))
    ]
    spots.sort(key=lambda s: s[0])
    ids = list(hay)
    for at, piece, _, _ in reversed(spots):
        ids[at:at] = piece
    if len(ids) != length:
        raise ValueError(f"recall prompt: built {len(ids)} tokens, wanted {length}")
    defined: dict[int, int] = {}
    recalled: dict[int, list[int]] = {}
    shift = 0
    for at, piece, i, is_recall in spots:
        where = _code_tokens(tok, piece, codes[i], at + shift)
        if is_recall:
            recalled[i] = where
        else:
            defined[i] = where[0]
        shift += len(piece)
    probes = [
        Probe(key=keys[i], code=codes[i], defined_at=defined[i], code_tokens=tuple(recalled[i]))
        for i in range(pairs)
    ]
    return RecallPrompt(length=length, seed=seed, ids=ids, probes=sorted(probes, key=lambda p: p.code_tokens))


def _code_tokens(tok: object, piece: list[int], code: str, start: int) -> list[int]:
    """Absolute indices of the tokens of `piece` (spliced at `start`) that spell `code`'s digits."""
    texts = [tok.decode([t]) for t in piece]  # type: ignore[attr-defined]
    idx = [j for j, t in enumerate(texts) if t.strip().isdigit()]
    if "".join(texts[j].strip() for j in idx) != code:
        raise ValueError(f"recall prompt: the code {code} does not tokenize into digit tokens")
    return [start + j for j in idx]


def score_recall(logits: torch.Tensor, prompt: RecallPrompt) -> list[tuple[bool, bool]]:
    """Per probe (in `prompt.probes` order): (every code token is the top-1 prediction of the position
    before it, the first code token is). `logits`: [length, vocab] of every prompt position."""
    ids = torch.tensor(prompt.ids, device=logits.device)
    out = []
    for p in prompt.probes:
        at = torch.tensor(p.code_tokens, device=logits.device)
        hit = logits[at - 1].argmax(-1) == ids[at]
        out.append((bool(hit.all()), bool(hit[0])))
    return out
