"""The quality harness (shard/quality.py): task builders put the needle where asked, scoring is exact, and
the real model answers one dense passkey case of about 1k tokens."""

from __future__ import annotations

import pytest

from entropyinfer.shard import quality as Q

LENGTH = 1024


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_passkey_prompt_holds_the_code_at_the_asked_depth(smollm2, depth):
    case = Q.passkey_case(smollm2, LENGTH, depth)
    ids = case.prompt_ids
    assert LENGTH - 16 <= len(ids) <= LENGTH
    assert ids == smollm2.encode(case.messages)  # the chat template, as the engine would tokenize it
    content = case.messages[0]["content"]
    assert content.count(case.expected) == 2  # "The pass key is X. Remember it. X is the pass key."
    assert content.endswith(Q.PASSKEY_QUESTION)
    assert Q.CODE_RE.fullmatch(case.expected)
    # The code's tokens sit at needle_token, at the asked depth of the haystack (by tokens).
    code_ids = smollm2.tokenizer.encode(case.expected, add_special_tokens=False)
    assert ids[case.needle_token : case.needle_token + len(code_ids)] == code_ids
    assert abs(case.depth_actual - depth) < 0.05
    lo, hi = case.haystack_span
    assert 0 < lo < case.needle_token < hi < len(ids)
    assert len(ids) - hi < 40  # only the question and the template's tail follow the haystack
    # Deterministic: the same case is built again identically.
    assert Q.passkey_case(smollm2, LENGTH, depth).prompt_ids == ids


def test_multikey_prompt_holds_every_pair_and_asks_for_the_one_at_depth(smollm2):
    cases = [Q.multikey_case(smollm2, LENGTH, d) for d in (0.1, 0.5, 0.9)]
    keys = cases[0].keys
    assert len(keys) == len(Q.MULTIKEY_DEPTHS) and len(set(keys.values())) == len(keys)
    for case, depth in zip(cases, (0.1, 0.5, 0.9), strict=True):
        content = case.messages[0]["content"]
        assert case.keys == keys  # one haystack per length: the cases differ in the question only
        for key, code in keys.items():
            assert Q.MULTIKEY_NEEDLE.format(key=key, code=code) in content
        asked = next(k for k, c in keys.items() if c == case.expected)
        assert content.endswith(Q.MULTIKEY_QUESTION.format(key=asked))
        assert abs(case.depth_actual - depth) < 0.05
    # The keys appear in depth order, the asked one at the asked depth.
    order = sorted(keys, key=lambda k: cases[0].messages[0]["content"].index(keys[k]))
    assert [keys[k] for k in order] == [c.expected for c in cases]


def test_scoring_is_exact_match_of_the_first_five_digit_code():
    assert Q.score("The pass key is 12345.", "12345")
    assert Q.score("12345", "12345")
    assert Q.score("The code is 12345 (not 67890)", "12345")
    assert not Q.score("The code is 67890 (not 12345)", "12345")
    assert not Q.score("The pass key is 123456", "12345")  # six digits is not the code
    assert not Q.score("The pass key is 1234", "12345")
    assert not Q.score("The pass key is 1 2 3 4 5", "12345")
    assert not Q.score("", "12345")
    assert Q.extract_code("a 123456 b 54321 c") == "54321"


def test_dense_passkey_is_answered_and_matrix_resumes(smollm2):
    plan = Q.QualityPlan(
        name="test",
        preset="entropy_short",
        tasks=("passkey",),
        lengths=(LENGTH,),
        depths=(0.5,),
        main=(Q.DENSE,),
        sweep=(),
        sweep_lengths=(),
        kl_window=256,
        target_length=LENGTH,
    )
    lines: list[str] = []
    records = Q.run_matrix(smollm2, plan, log=lines.append)
    (r,) = records
    assert r["correct"], f"dense answered {r['answer']!r}, expected {r['expected']}"
    assert r["density"] == 1.0 and r["tokens"] <= LENGTH
    assert 1.0 < r["ppl_window"] < 100.0 and 1.0 < r["ppl"] < 100.0  # real text, a trained model
    rows = Q.summarize(records)
    assert (
        rows[0]["passkey"] == "1/1" and rows[0]["accuracy_%"] == 100.0 and rows[0]["agree_dense_%"] == 100.0
    )
    # Resuming with the finished record runs nothing.
    assert Q.run_matrix(smollm2, plan, done=records, log=lines.append) == records
    assert len(lines) == 1
