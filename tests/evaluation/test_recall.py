"""In-prompt recall prompts (evaluation/recall.py) on the real tokenizer and model: exact length, each code
spelled at its definition and at its recall and nowhere else, recalls after their definitions; dense
SmolLM2 copies the codes, and a sparse prefill with the box ranking loses probes that query ranking keeps."""

from __future__ import annotations

import pytest
import torch

from entropyinfer.evaluation.matched import prefill_logits
from entropyinfer.evaluation.plans import DENSE, PolicySpec
from entropyinfer.evaluation.recall import recall_prompt, score_recall
from entropyinfer.policies.config import load_sparse_config


@pytest.mark.parametrize(("length", "seed", "pairs"), [(1536, 0, 4), (2048, 3, 8)])
def test_prompt_places_each_code_twice_recall_after_definition(smollm2, length, seed, pairs):
    p = recall_prompt(smollm2, length, seed, pairs=pairs)
    tok = smollm2.tokenizer
    assert len(p.ids) == length and len(p.probes) == pairs
    text = tok.decode(p.ids)
    digits = [t for t in p.ids if tok.decode([t]).strip().isdigit()]
    assert len(digits) == 2 * 5 * pairs  # the codes are the only digits
    for probe in p.probes:
        assert text.count(probe.code) == 2
        assert tok.decode([p.ids[i] for i in probe.code_tokens]).replace(" ", "") == probe.code
        assert tok.decode(p.ids[probe.defined_at : probe.defined_at + 5]).replace(" ", "") == probe.code
        assert 0 < probe.defined_at < probe.code_tokens[0] < length - 128  # before the dense last segment
        assert probe.key in tok.decode(p.ids[probe.code_tokens[0] - 8 : probe.code_tokens[0]])
    assert [q.code_tokens for q in p.probes] == sorted(q.code_tokens for q in p.probes)
    assert recall_prompt(smollm2, length, seed, pairs=pairs).ids == p.ids  # deterministic
    with pytest.raises(ValueError, match="pairs"):
        recall_prompt(smollm2, length, seed, pairs=0)


def test_dense_copies_the_codes_and_query_ranking_keeps_what_box_ranking_loses(smollm2):
    """2048 tokens, 8 probes, `fixed` at density 0.4. Measured on the 2-core CPU (fp32): dense 8 of 8, box
    0 (also 0 at density 0.5), queries 5 (6 at 0.5)."""
    p = recall_prompt(smollm2, 2048, 1, pairs=8)
    base = load_sparse_config("entropy_short")
    logits, _ = prefill_logits(smollm2, p.ids, DENSE, base, True)
    dense = [ok for ok, _ in score_recall(logits, p)]
    assert sum(dense) >= 7
    right = {}
    for ranking in ("box", "queries"):
        spec = PolicySpec("fixed", "fixed", (("target_density", 0.4), ("ranking", ranking)))
        logits, stats = prefill_logits(smollm2, p.ids, spec, base, True)
        assert stats["density"] == pytest.approx(0.4, abs=0.01)
        right[ranking] = sum(ok for (ok, _), d in zip(score_recall(logits, p), dense, strict=True) if d)
    assert right["box"] <= 1
    assert right["queries"] >= right["box"] + 3
    assert torch.isfinite(logits).all()
