"""Sparse prefill policies inside the engine, on the real SmolLM2 model (CPU: torch reference paths)."""

from __future__ import annotations

import pytest

from entropyinfer import LLM, SamplingParams
from entropyinfer.cli import main as cli_main
from entropyinfer.evaluation.corpus import real_document
from entropyinfer.policies.config import load_sparse_config


@pytest.fixture(scope="module")
def long_prompt(smollm2):
    ids = smollm2.tokenizer.encode(real_document(1500))[:1400]
    return [{"role": "user", "content": smollm2.tokenizer.decode(ids) + "\n\nWhat is this text about?"}]


def test_entropy_and_fixed_prefill_report_density_rigidity_and_budgets(smollm2, long_prompt):
    cfg = smollm2.sparse_config  # the short-context preset for an 8k model
    assert (cfg.segment_size, cfg.base_budget, cfg.threshold_len) == (128, 256, 512)
    params = SamplingParams(max_tokens=4)
    ent = smollm2.generate(long_prompt, params, policy="entropy")[0].stats
    fix = smollm2.generate(long_prompt, params, policy="fixed")[0].stats
    dense = smollm2.generate(long_prompt, params, policy="dense")[0].stats
    assert dense["density"] == 1.0
    for stats in (ent, fix):
        assert 0.2 < stats["density"] < 1.0
        per_layer = stats["rigid_fraction_per_layer"]
        assert len(per_layer) == smollm2.arch.num_layers and per_layer[0] is None  # layer 0 is dense
        assert all(r is not None and 0.0 <= r <= 1.0 for r in per_layer[1:])
    lo, hi = cfg.base_budget, 3 * cfg.base_budget
    assert lo <= ent["budget_tokens"]["min"] <= ent["budget_tokens"]["max"] <= hi
    assert fix["budget_tokens"]["min"] == fix["budget_tokens"]["max"] == cfg.fixed_budget
    assert ent["policy"] == "entropy" and fix["policy"] == "fixed"


def test_short_prompts_run_dense_under_a_sparse_policy(smollm2):
    stats = smollm2.generate("The three primary colors are", SamplingParams(max_tokens=2), policy="entropy")[
        0
    ]
    assert stats.stats["density"] == 1.0


def test_policy_overrides_from_a_config_file_and_keywords(tmp_path, long_prompt):
    path = tmp_path / "tight.yaml"
    path.write_text(
        "segment_size: 128\nblock_size: 8\nbase_budget: 128\nthreshold_len: 256\nfixed_budget: 64\n"
    )
    llm = LLM("smollm2-135m", policy="fixed", policy_config=str(path), fixed_budget=32, device="cpu")
    assert llm.sparse_config.base_budget == 128 and llm.sparse_config.fixed_budget == 32
    stats = llm.generate(long_prompt, SamplingParams(max_tokens=2))[0].stats
    assert stats["budget_tokens"]["max"] == 32 and stats["density"] < 0.5


@pytest.mark.slow  # the CLI loads its default model, SmolLM2
def test_cli_generate_answers_a_question_about_a_file(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(
        "The harbour master of Port Elbe is named Ingrid Sorensen. She has held the post since 1998."
    )
    assert (
        cli_main(
            [
                "generate",
                "--prompt-file",
                str(doc),
                "--question",
                "Who is the harbour master?",
                "--max-tokens",
                "12",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    assert "Ingrid" in out.out
    assert '"prompt_tokens"' in out.err


def test_warm_up_lengths_cover_every_kernel_size_class():
    from entropyinfer.shard.sparse_warm_up import warm_up_lengths

    for preset, max_len in (("entropy_long", 1 << 20), ("entropy_short", 8192)):
        cfg = load_sparse_config(preset)
        s, bps = cfg.segment_size, cfg.segment_size // cfg.block_size
        lengths = warm_up_lengths(cfg, max_len)
        shortest = max(cfg.threshold_len, s) + s + 1
        assert lengths and all(shortest <= n <= max_len for n in lengths)

        def size_class(n: int, s: int = s, bps: int = bps) -> int:  # the profiling kernels' row chunk
            nblk = (-(-n // s) - 1) * bps
            return min(1 << (nblk - 1).bit_length(), 8192)

        wanted = {size_class(n) for n in range(shortest, max_len + 1, s)}
        assert {size_class(n) for n in lengths} == wanted
        assert any(n % 16 for n in lengths) and any(n % 16 == 0 for n in lengths)
