"""Quality of sparse attention on a real model: retrieval in real prose, perplexity and KL against dense.

- `corpus`: real English text (CPython's pydoc topics): documents for the demo, prose for the haystacks;
- `tasks`: retrieval cases (`Case`): a 5-digit code hidden at a depth of a prompt of a given length;
- `metrics`: exact-match scoring, perplexity, KL and top-1 agreement against dense;
- `plans`: what a run runs (`QualityPlan`: lengths x `PolicySpec`s x tasks x depths) and records;
- `runner`: one case, the whole matrix (resumable), a whole run with its report;
- `report`: summary rows, the target verdict, notes, markdown and JSON files.

`entropyinfer bench quality` and `benchmarks/quality.py` run it. Nothing below `evaluation/` imports it.
"""
