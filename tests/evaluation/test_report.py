"""Summaries, the target verdict, notes and files (evaluation/report.py), from records made by hand."""

from __future__ import annotations

import json

from entropyinfer.evaluation.plans import DENSE, PolicySpec, QualityPlan, entropy_spec, fixed_spec
from entropyinfer.evaluation.report import (
    SUMMARY_COLUMNS,
    file_writer,
    load_previous,
    markdown_table,
    report_notes,
    summarize,
    summary_columns,
    target_verdict,
)
from entropyinfer.policies.config import load_sparse_config

PLAN = QualityPlan(
    name="test",
    preset="entropy_short",
    tasks=("passkey",),
    lengths=(8176,),
    depths=(0.1, 0.5),
    main=(DENSE, entropy_spec(128), fixed_spec(256)),
    sweep=(),
    sweep_lengths=(),
)

BASE = load_sparse_config("entropy_short")


def rec(spec: PolicySpec, depth: float, correct: bool, density: float) -> dict:
    return {
        **spec.describe(BASE),
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


RECORDS = [
    rec(DENSE, 0.1, True, 1.0),
    rec(DENSE, 0.5, True, 1.0),
    rec(entropy_spec(128), 0.1, True, 0.2),
    rec(entropy_spec(128), 0.5, True, 0.2),
    rec(fixed_spec(256), 0.1, False, 0.15),
    rec(fixed_spec(256), 0.5, True, 0.15),
]


def _meta(records: list[dict]) -> dict:
    rows = summarize(records)
    return {
        "target": target_verdict(rows, PLAN, records),
        "complete": True,
        "command": "test",
        "run_seconds": 60.0,
        "cases": records,
        "preset": {"segment_size": 128, "block_size": 8, "threshold_len": 512},
    }


def test_summary_verdict_and_notes_from_records():
    rows = summarize(RECORDS)
    assert [r["config"] for r in rows] == ["dense", "entropy B0=128", "fixed 256"]
    assert [r["vs_dense_pts"] for r in rows] == [0.0, 0.0, -50.0]
    verdict = target_verdict(rows, PLAN, RECORDS)
    assert verdict["met"] and verdict["met_by"] == ["entropy B0=128"]
    assert verdict["entropy"][0]["solves_of_dense"] == 2
    notes = report_notes(PLAN, _meta(RECORDS))
    assert "MET by: entropy B0=128." in notes
    assert "- 8176: dense 2/2; entropy B0=128 2/2 (0.20); fixed 256 1/2 (0.15)" in notes


def test_summary_rows_agreement_means_and_missing_logits():
    rows = summarize(RECORDS)
    fixed = rows[2]
    assert fixed["passkey"] == "1/2" and fixed["multikey"] is None and fixed["cases"] == 2
    assert fixed["accuracy_%"] == 50.0 and fixed["agree_dense_%"] == 50.0
    assert fixed["density"] == 0.15 and fixed["rigid"] == 0.0 and fixed["budget_mean"] is None
    assert fixed["ppl"] is None and fixed["kl_mean"] is None
    assert (fixed["budget"], fixed["mode"]) == (256, None)
    assert (rows[1]["budget"], rows[1]["mode"]) == (128, "per_head")


def test_verdict_not_met_when_entropy_loses_a_case():
    records = [*RECORDS[:3], {**RECORDS[3], "correct": False, "answer": "54321"}]
    verdict = target_verdict(summarize(records), PLAN, records)
    assert not verdict["met"] and verdict["met_by"] == []
    assert verdict["dense_accuracy_%"] == 100.0 and verdict["dense_solved"] == ["passkey@0.1", "passkey@0.5"]
    assert verdict["entropy"][0]["vs_dense_pts"] == -50.0 and verdict["entropy"][0]["solves_of_dense"] == 1
    assert "NOT MET by any entropy configuration" in report_notes(PLAN, _meta(records))


def test_columns_follow_the_plans_tasks():
    assert summary_columns(["passkey"])[:3] == ["length", "config", "passkey"]
    assert "multikey" not in summary_columns(["passkey"])
    assert SUMMARY_COLUMNS[:4] == ["length", "config", "passkey", "multikey"]


def test_markdown_table_formats_values():
    rows = [{"a": 1, "b": 0.123456, "c": None}, {"a": "x", "b": 1234.5}]
    assert markdown_table(["a", "b", "c"], rows) == (
        "| a | b | c |\n|---|---|---|\n| 1 | 0.123 | - |\n| x | 1234 | - |"
    )


def test_file_writer_and_load_previous_round_trip(tmp_path):
    write = file_writer(str(tmp_path / "out"), "quality_test")
    rows = summarize(RECORDS)
    meta = {**_meta(RECORDS), "env": {"torch": "2.x", "gpu": None}}
    write("Title", ["length", "config", "passkey"], rows, meta, "the notes")
    md = (tmp_path / "out" / "quality_test.md").read_text()
    assert md.startswith("# Title\n\ntorch: 2.x\n\n| length | config | passkey |")
    assert md.endswith("the notes\n") and "gpu" not in md
    data = load_previous(str(tmp_path / "out" / "quality_test.json"))
    assert data == json.loads(json.dumps({"meta": meta, "rows": rows}))
    assert load_previous(str(tmp_path / "missing.json")) is None
    (tmp_path / "bad.json").write_text("not json")
    assert load_previous(str(tmp_path / "bad.json")) is None
    (tmp_path / "list.json").write_text("[1, 2]")
    assert load_previous(str(tmp_path / "list.json")) is None
