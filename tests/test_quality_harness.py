"""The quality harness (shard/quality.py): the haystack is digit-free prose, task builders put the needle
where asked and end the prompt with the answer's start, scoring is exact, and the real model answers one
dense passkey case of about 1k tokens."""

from __future__ import annotations

import re

import pytest

from entropyinfer.policies.config import load_sparse_config
from entropyinfer.shard import quality as Q

LENGTH = 1024


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_passkey_prompt_holds_the_code_at_the_asked_depth(smollm2, depth):
    case = Q.passkey_case(smollm2, LENGTH, depth)
    ids = case.prompt_ids
    assert LENGTH - 16 <= len(ids) <= LENGTH
    content = case.messages[0]["content"]
    # "The secret number is X. Remember it. X is the secret number.": the only digits of the prompt.
    assert re.findall(r"\d+", content) == [case.expected, case.expected]
    assert content.endswith(Q.PASSKEY_QUESTION)
    # The prompt ends with the answer's start, after the chat template's assistant header.
    prefix_ids = smollm2.tokenizer.encode(Q.PASSKEY_ANSWER_PREFIX, add_special_tokens=False)
    assert case.answer_prefix == Q.PASSKEY_ANSWER_PREFIX
    assert ids == smollm2.encode(case.messages) + prefix_ids
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
        assert case.answer_prefix == Q.MULTIKEY_ANSWER_PREFIX.format(key=asked)
        assert smollm2.tokenizer.decode(case.prompt_ids).endswith("assistant\n" + case.answer_prefix)
        assert abs(case.depth_actual - depth) < 0.05
    # The keys appear in depth order, the asked one at the asked depth.
    order = sorted(keys, key=lambda k: cases[0].messages[0]["content"].index(keys[k]))
    assert [keys[k] for k in order] == [c.expected for c in cases]


def test_haystack_is_digit_free_prose(smollm2):
    text = Q.prose_text()
    assert text == Q.prose_text()  # deterministic
    paragraphs = text.split("\n\n")
    assert len(paragraphs) > 200
    for para in paragraphs:
        assert not any(c.isdigit() for c in para) and para.endswith(".") and "\n" not in para
        assert not para.startswith(" ")
    assert "The pass key" not in text and "secret number" not in text
    # Enough of it for the longest prompt (8k tokens) with room to spare.
    assert len(Q.haystack_tokens(smollm2, Q.FILLER_TOKENS)) == Q.FILLER_TOKENS


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


def test_summary_verdict_and_notes_from_records():
    plan = Q.QualityPlan(
        name="test",
        preset="entropy_short",
        tasks=("passkey",),
        lengths=(8176,),
        depths=(0.1, 0.5),
        main=(Q.DENSE, Q.entropy_spec(128), Q.fixed_spec(256)),
        sweep=(),
        sweep_lengths=(),
    )

    base = load_sparse_config("entropy_short")

    def rec(spec: Q.PolicySpec, depth: float, correct: bool, density: float) -> dict:
        return {
            **spec.describe(base),
            "task": "passkey",
            "length": 8176,
            "depth": depth,
            "answer": "12345" if correct else "54321",
            "correct": correct,
            "density": density,
            "rigid_fraction": 0.0,
            "budget_mean": None,
            "prefill_s": 1.0,
        }

    records = [
        rec(Q.DENSE, 0.1, True, 1.0),
        rec(Q.DENSE, 0.5, True, 1.0),
        rec(Q.entropy_spec(128), 0.1, True, 0.2),
        rec(Q.entropy_spec(128), 0.5, True, 0.2),
        rec(Q.fixed_spec(256), 0.1, False, 0.15),
        rec(Q.fixed_spec(256), 0.5, True, 0.15),
    ]
    rows = Q.summarize(records)
    assert [r["config"] for r in rows] == ["dense", "entropy B0=128", "fixed 256"]
    assert [r["vs_dense_pts"] for r in rows] == [0.0, 0.0, -50.0]
    verdict = Q.target_verdict(rows, plan, records)
    assert verdict["met"] and verdict["met_by"] == ["entropy B0=128"]
    assert verdict["entropy"][0]["solves_of_dense"] == 2
    meta = {
        "target": verdict,
        "complete": True,
        "command": "test",
        "run_seconds": 60.0,
        "cases": records,
        "preset": {"segment_size": 128, "block_size": 8, "threshold_len": 512},
    }
    notes = Q.report_notes(plan, meta)
    assert "MET by: entropy B0=128." in notes
    assert "- 8176: dense 2/2; entropy B0=128 2/2 (0.20); fixed 256 1/2 (0.15)" in notes
