"""Real English text that ships with every CPython: what the demo reads and the evaluation hides needles in.

The text is the "pydoc topics" (``pydoc_data.topics.topics``, a dict of topic name -> text), the plain-text
renderings of the Python Language Reference sections that ``help("assert")`` and friends show, generated
from CPython's ``Doc/`` folder (PSF documentation licence). Topics are used whole, in sorted name order,
skipping ones shorter than `MIN_TOPIC_CHARS`; the text is therefore deterministic for a given Python version
(it changes slightly between Python versions). On Python 3.11 the topics total about 465,000 characters,
about 113,000 SmolLM2 tokens.

- `real_documents(n)`: `n` whole topics (the demo's batch of documents);
- `real_document(min_tokens_hint)`: one long document of whole topics (the offline demo, tests, the KV
  compression benchmark);
- `prose_text()`: the topics' plain-sentence paragraphs, no code and no digits (the retrieval haystack of
  `evaluation/tasks.py`).

No model code: this module imports nothing of the package, so `cluster/`, the CLI and the evaluation all
read it.
"""

from __future__ import annotations

import re

__all__ = [
    "CHARS_PER_TOKEN_UPPER",
    "MIN_TOPIC_CHARS",
    "prose_text",
    "real_document",
    "real_documents",
    "unique_prose_text",
]

MIN_TOPIC_CHARS = 1500
"""Topics shorter than this (one-paragraph entries) are skipped."""

CHARS_PER_TOKEN_UPPER = 5.5
"""Upper bound of characters per token for the topics (SmolLM2's tokenizer: 3.6-5.2, mean 4.2 per topic);
`real_document` sizes its text with it, so it errs long."""

_SEPARATOR = "\n\n"

_PROSE_CHARS = frozenset(" ,.;:'\"()-?!")


def _topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics) if len(topics[name].strip()) >= MIN_TOPIC_CHARS]


def real_documents(n: int) -> list[str]:
    """`n` different real English documents: whole pydoc topics (CPython's Language Reference), in
    sorted topic-name order. Raises ValueError when `n` exceeds the number of topics (about 40)."""
    topics = _topics()
    if not 0 <= n <= len(topics):
        raise ValueError(f"real_documents: n must be between 0 and {len(topics)} (the pydoc topics), got {n}")
    return topics[:n]


def real_document(min_tokens_hint: int | None = None) -> str:
    """Real English text: one whole pydoc topic, or, when `min_tokens_hint` is given, whole topics joined
    by blank lines until the text holds at least that many tokens (sized with `CHARS_PER_TOKEN_UPPER`, so
    with SmolLM2's tokenizer it is at least `min_tokens_hint` tokens, plus up to one whole topic, which can
    be 15,000 tokens: truncate after tokenizing if an exact length is needed). Asking for more than all
    topics hold (about 100k tokens) repeats them from the start. Deterministic for a Python version."""
    topics = _topics()
    if min_tokens_hint is None or min_tokens_hint <= 0:
        return topics[0]
    want_chars = int(min_tokens_hint * CHARS_PER_TOKEN_UPPER)
    parts: list[str] = []
    size = 0
    i = 0
    while size < want_chars:
        part = topics[i % len(topics)]
        parts.append(part)
        size += len(part) + len(_SEPARATOR)
        i += 1
    return _SEPARATOR.join(parts)


def prose_text() -> str:
    """Real English prose: the paragraphs of the pydoc topics (same topics, same order as
    `real_documents`) that are plain sentences: no indented (code or grammar) line, no digit, at least 120
    characters ending with a full stop, at most 2% of characters other than letters, spaces and
    ,.;:'"()-?!. About 320 paragraphs, 96,000 characters, 21,000 SmolLM2 tokens on Python 3.11.

    Without digits the hidden 5-digit code is the only number of the haystack, and without code the text is
    one register; on the whole topics (grammar rules, code, numbers) SmolLM2-135M answers 1 of 5 dense
    4k-token pass-key cases, on this prose with the same wording also 1 of 5 (the wording was the problem,
    see `evaluation.tasks.PASSKEY_NEEDLE`), but the prose keeps the task about retrieval, not about telling a
    code from the numbers around it."""
    paragraphs: list[str] = []
    for doc in _topics():
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


def unique_prose_text() -> str:
    """`prose_text` with every repeated paragraph kept once (the topics repeat some sections: 284 paragraphs,
    233 distinct on Python 3.11, about 16,000 SmolLM2 tokens): real text that does not repeat, for perplexity
    and KL against dense, where a repeat would be predicted by copying from far back."""
    seen: set[str] = set()
    kept: list[str] = []
    for para in prose_text().split(_SEPARATOR):
        if para not in seen:
            seen.add(para)
            kept.append(para)
    return _SEPARATOR.join(kept)
