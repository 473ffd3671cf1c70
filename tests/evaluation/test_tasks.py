"""Retrieval cases (evaluation/tasks.py) on the real tokenizer: the needle sits where asked, the prompt
ends with the answer's start, and the haystack is a prefix of one tokenized prose text."""

from __future__ import annotations

import re

import pytest

from entropyinfer.evaluation import tasks as T
from entropyinfer.evaluation.corpus import prose_text

LENGTH = 1024


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_passkey_prompt_holds_the_code_at_the_asked_depth(smollm2, depth):
    case = T.passkey_case(smollm2, LENGTH, depth)
    ids = case.prompt_ids
    assert LENGTH - 16 <= len(ids) <= LENGTH
    content = case.messages[0]["content"]
    # "The secret number is X. Remember it. X is the secret number.": the only digits of the prompt.
    assert re.findall(r"\d+", content) == [case.expected, case.expected]
    assert content.endswith(T.PASSKEY_QUESTION)
    # The prompt ends with the answer's start, after the chat template's assistant header.
    prefix_ids = smollm2.tokenizer.encode(T.PASSKEY_ANSWER_PREFIX, add_special_tokens=False)
    assert case.answer_prefix == T.PASSKEY_ANSWER_PREFIX
    assert ids == smollm2.encode(case.messages) + prefix_ids
    assert T.CODE_RE.fullmatch(case.expected)
    # The code's tokens sit at needle_token, at the asked depth of the haystack (by tokens).
    code_ids = smollm2.tokenizer.encode(case.expected, add_special_tokens=False)
    assert ids[case.needle_token : case.needle_token + len(code_ids)] == code_ids
    assert abs(case.depth_actual - depth) < 0.05
    lo, hi = case.haystack_span
    assert 0 < lo < case.needle_token < hi < len(ids)
    assert len(ids) - hi < 40  # only the question and the template's tail follow the haystack
    # Deterministic: the same case is built again identically.
    assert T.passkey_case(smollm2, LENGTH, depth).prompt_ids == ids
    assert case.key == f"passkey/{LENGTH}/{depth:g}"


def test_multikey_prompt_holds_every_pair_and_asks_for_the_one_at_depth(smollm2):
    cases = [T.multikey_case(smollm2, LENGTH, d) for d in (0.1, 0.5, 0.9)]
    keys = cases[0].keys
    assert len(keys) == len(T.MULTIKEY_DEPTHS) and len(set(keys.values())) == len(keys)
    for case, depth in zip(cases, (0.1, 0.5, 0.9), strict=True):
        content = case.messages[0]["content"]
        assert case.keys == keys  # one haystack per length: the cases differ in the question only
        for key, code in keys.items():
            assert T.MULTIKEY_NEEDLE.format(key=key, code=code) in content
        asked = next(k for k, c in keys.items() if c == case.expected)
        assert content.endswith(T.MULTIKEY_QUESTION.format(key=asked))
        assert case.answer_prefix == T.MULTIKEY_ANSWER_PREFIX.format(key=asked)
        assert smollm2.tokenizer.decode(case.prompt_ids).endswith("assistant\n" + case.answer_prefix)
        assert abs(case.depth_actual - depth) < 0.05
    # The keys appear in depth order, the asked one at the asked depth.
    order = sorted(keys, key=lambda k: cases[0].messages[0]["content"].index(keys[k]))
    assert [keys[k] for k in order] == [c.expected for c in cases]


def test_haystack_is_a_prefix_of_the_tokenized_prose(smollm2):
    # Enough of it for the longest prompt (8k tokens) with room to spare.
    full = T.haystack_tokens(smollm2, T.FILLER_TOKENS)
    assert len(full) == T.FILLER_TOKENS
    assert T.haystack_tokens(smollm2, 100) == full[:100]
    assert prose_text().startswith(smollm2.tokenizer.decode(full[:200]))
    for bad in (0, T.FILLER_TOKENS + 1):
        with pytest.raises(ValueError, match="between 1 and"):
            T.haystack_tokens(smollm2, bad)


def test_every_task_builds_its_own_case(smollm2):
    assert set(T.TASKS) == {"passkey", "multikey"}
    for name, build in T.TASKS.items():
        case = build(smollm2, 512, 0.5)
        assert case.task == name and case.length == 512 and case.depth == 0.5
        assert 512 - 16 <= len(case.prompt_ids) <= 512
