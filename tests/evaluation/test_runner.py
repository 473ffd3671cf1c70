"""The runner (evaluation/runner.py) on the real model: a dense passkey case of about 1k tokens is answered,
the matrix resumes from finished records, and a whole run writes after every case and resumes from its
JSON."""

from __future__ import annotations

from entropyinfer.evaluation.plans import DENSE, QualityPlan
from entropyinfer.evaluation.report import summarize
from entropyinfer.evaluation.runner import run_and_report, run_matrix

LENGTH = 1024

PLAN = QualityPlan(
    name="test",
    preset="entropy_short",
    tasks=("passkey",),
    lengths=(LENGTH,),
    depths=(0.5,),
    main=(DENSE,),
    sweep=(),
    sweep_lengths=(),
    kl_window=256,
    target_length=LENGTH,
)


def test_dense_passkey_is_answered_and_matrix_resumes(smollm2):
    lines: list[str] = []
    records = run_matrix(smollm2, PLAN, log=lines.append)
    (r,) = records
    assert r["correct"], f"dense answered {r['answer']!r}, expected {r['expected']}"
    assert r["density"] == 1.0 and r["tokens"] <= LENGTH
    assert 1.0 < r["ppl_window"] < 100.0 and 1.0 < r["ppl"] < 100.0  # real text, a trained model
    rows = summarize(records)
    assert (
        rows[0]["passkey"] == "1/1" and rows[0]["accuracy_%"] == 100.0 and rows[0]["agree_dense_%"] == 100.0
    )
    # Resuming with the finished record runs nothing.
    assert run_matrix(smollm2, PLAN, done=records, log=lines.append) == records
    assert len(lines) == 1


def test_run_and_report_writes_after_every_case_and_resumes(smollm2):
    writes: list[tuple[str, list[str], list[dict], dict, str]] = []

    def write(title, columns, rows, meta, notes) -> None:  # type: ignore[no-untyped-def]
        writes.append((title, columns, rows, meta, notes))

    lines: list[str] = []
    meta = run_and_report(PLAN, write, command="test run", llm=smollm2, threads=None, log=lines.append)
    # Once after the case (partial), once at the end (complete).
    assert [w[3]["complete"] for w in writes] == [False, True]
    title, columns, rows, last, notes = writes[-1]
    assert last is meta and meta["complete"] and meta["command"] == "test run"
    assert "(test plan)" in title
    assert columns[:3] == ["length", "config", "passkey"] and "multikey" not in columns
    assert rows == summarize(meta["cases"]) and len(meta["cases"]) == 1
    assert meta["plan"]["name"] == "test" and meta["plan"]["main"] == ["dense"]
    assert meta["preset"]["segment_size"] > 0 and meta["env"]["torch_threads"] >= 1
    assert meta["target"]["dense_accuracy_%"] == 100.0
    assert "Run: `test run`; complete" in notes
    # Resuming from the run's JSON keeps its case and adds its run time.
    writes.clear()
    again = run_and_report(PLAN, write, previous={"meta": meta}, llm=smollm2, threads=None, log=lines.append)
    assert again["cases"] == meta["cases"]
    assert again["run_seconds"] >= meta["run_seconds"]
    assert lines[-1] == "resuming: 1 finished cases from the earlier run"
    # An earlier run of another plan is not resumed from: its case runs again.
    lines.clear()
    other = {"meta": {**meta, "plan": {"name": "another"}}}
    fresh = run_and_report(PLAN, write, previous=other, llm=smollm2, threads=None, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("[1/1] dense|passkey|1024|0.5: ok")
    assert fresh["cases"][0]["answer"] == meta["cases"][0]["answer"]
