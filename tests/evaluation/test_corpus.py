"""Real English text (evaluation/corpus.py): whole pydoc topics for documents, their plain-sentence
paragraphs for the retrieval haystack; importing it loads no model code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from entropyinfer.evaluation import corpus
from entropyinfer.evaluation.corpus import prose_text, real_document, real_documents


def test_haystack_is_digit_free_prose():
    text = prose_text()
    assert text == prose_text()  # deterministic
    paragraphs = text.split("\n\n")
    assert len(paragraphs) > 200
    for para in paragraphs:
        assert not any(c.isdigit() for c in para) and para.endswith(".") and "\n" not in para
        assert not para.startswith(" ")
    assert "The pass key" not in text and "secret number" not in text


def test_real_document_is_long_real_english(smollm2):
    tokenizer = smollm2.tokenizer
    one = real_document()
    assert len(one) >= corpus.MIN_TOPIC_CHARS
    assert " the " in one
    long = real_document(3000)
    assert long == real_document(3000)  # deterministic
    n_tokens = len(tokenizer.encode(long))
    assert n_tokens > 3000
    assert n_tokens < 3000 + 20_000  # overshoot: at most about one (the last) whole topic
    assert long.startswith(one)
    big = real_document(150_000)  # more than all topics: they repeat
    assert len(big) >= 150_000 * corpus.CHARS_PER_TOKEN_UPPER


def test_real_documents_are_distinct_whole_topics():
    from pydoc_data.topics import topics

    docs = real_documents(5)
    assert len(docs) == 5
    assert len(set(docs)) == 5
    whole = {t.strip() for t in topics.values()}
    assert all(d in whole for d in docs)
    assert real_documents(0) == []
    with pytest.raises(ValueError, match="between 0 and"):
        real_documents(10_000)


def test_importing_the_corpus_loads_no_model_code():
    code = (
        "import sys; import entropyinfer.evaluation.corpus; "
        "print(sorted(m for m in ('torch', 'transformers', 'entropyinfer.shard') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
