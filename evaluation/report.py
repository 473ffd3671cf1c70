"""From records to results: summary rows, the issue's target verdict, the notes, markdown and JSON files.

- `summarize`: one row per (length, configuration) for the results table (`SUMMARY_COLUMNS`);
- `target_verdict`: the issue's target at the plan's `target_length`;
- `report_notes`: the text under the table (what was run, the verdict, how to read the columns);
- `markdown_table`, `file_writer`, `load_previous`: writing a run's `<name>.{json,md}` and reading it back
  to resume.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypedDict

from entropyinfer.evaluation.metrics import HaystackMetrics, extract_code
from entropyinfer.evaluation.plans import CaseRecord, QualityPlan
from entropyinfer.evaluation.tasks import MULTIKEY_DEPTHS, TASKS

__all__ = [
    "MODEL_NOTE",
    "SUMMARY_COLUMNS",
    "RunMeta",
    "SummaryRow",
    "TargetVerdict",
    "WriteFn",
    "file_writer",
    "load_previous",
    "machine",
    "markdown_table",
    "report_notes",
    "summarize",
    "summary_columns",
    "target_verdict",
]

MODEL_NOTE = "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized to fp32), CPU, torch reference kernels"

_METRIC_COLUMNS = (
    "accuracy_%",
    "vs_dense_pts",
    "agree_dense_%",
    "density",
    "rigid",
    "budget_mean",
    "ppl",
    "ppl_window",
    "kl_mean",
    "top1_agree",
    "prefill_s",
)


def summary_columns(tasks: Sequence[str]) -> list[str]:
    """The results table's columns for a plan of `tasks`: one "correct/cases" column per task."""
    return ["length", "config", *tasks, *_METRIC_COLUMNS]


SUMMARY_COLUMNS = summary_columns(list(TASKS))
"""The results table's columns with every task of `TASKS`."""

SummaryRow = dict[str, Any]
"""A results-table row, column name -> JSON value (int, float, str or None): one "correct/cases" column per
task of `TASKS`, so its keys follow the registered tasks."""

_Candidate = TypedDict(
    "_Candidate",
    {
        "config": str,
        "accuracy_%": float,
        "vs_dense_pts": float | None,
        "density": float,
        "cases": int,
        "kl_mean": float | None,
    },
)


class Candidate(_Candidate, total=False):
    """An entropy configuration at the target length, and how many of dense's solved cases it solves."""

    solves_of_dense: int


TargetVerdict = TypedDict(
    "TargetVerdict",
    {
        "length": int,
        "dense_accuracy_%": float | None,
        "dense_solved": list[str],  # "task@depth" of the cases dense answers
        "entropy": list[Candidate],
        "met": bool,
        "met_by": list[str],
    },
)
"""`target_verdict`'s result."""


class RunMeta(TypedDict):
    """The "meta" half of a run's JSON: where and how it ran, the plan, the verdict and every record."""

    env: dict[str, object]
    model: str
    command: str
    complete: bool
    run_seconds: float
    plan: dict[str, Any]  # QualityPlan.to_dict()
    preset: dict[str, Any]  # the preset's SparsePrefillConfig as a dict
    target: TargetVerdict
    cases: list[CaseRecord]


WriteFn = Callable[[str, list[str], list[SummaryRow], RunMeta, str], object]
"""`write(title, columns, rows, meta, notes)`: persist the table and meta (JSON + markdown)."""


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 4) if present else None


def _config_order(record: CaseRecord) -> tuple[int, int, str]:
    order = {"dense": 0, "entropy": 1, "fixed": 2}
    return (order.get(record["policy"], 3), record.get("budget") or 0, record.get("mode") or "")


def summarize(records: Sequence[CaseRecord]) -> list[SummaryRow]:
    """One row per (length, configuration), longest first, dense first: accuracy per task (correct/cases)
    and overall, the difference to dense in points, how often the answer's code equals dense's answer
    (right or wrong), mean density / rigid fraction / budget, the perplexity / KL of the logits case."""
    groups: dict[tuple[int, str], list[CaseRecord]] = {}
    dense_answers = {
        (r["task"], r["length"], r["depth"]): extract_code(r["answer"])
        for r in records
        if r["policy"] == "dense"
    }
    for r in records:
        groups.setdefault((r["length"], r["config"]), []).append(r)
    rows: list[SummaryRow] = []
    dense_acc: dict[int, float] = {}
    for (length, config), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], _config_order(kv[1][0]))):
        row: SummaryRow = {"length": length, "config": config, "policy": rs[0]["policy"]}
        row["budget"], row["mode"] = rs[0].get("budget"), rs[0].get("mode")
        for task in TASKS:
            t = [r for r in rs if r["task"] == task]
            row[task] = f"{sum(r['correct'] for r in t)}/{len(t)}" if t else None
        acc = 100.0 * sum(r["correct"] for r in rs) / len(rs)
        row["cases"] = len(rs)
        row["accuracy_%"] = round(acc, 1)
        if config == "dense":
            dense_acc[length] = acc
        row["vs_dense_pts"] = round(acc - dense_acc[length], 1) if length in dense_acc else None
        same = [
            extract_code(r["answer"]) == dense_answers[key]
            for r in rs
            if (key := (r["task"], r["length"], r["depth"])) in dense_answers
        ]
        row["agree_dense_%"] = round(100.0 * sum(same) / len(same), 1) if same else None
        row["density"] = _mean([r.get("density") for r in rs])
        row["budget_mean"] = _mean([r.get("budget_mean") for r in rs])
        row["prefill_s"] = _mean([r.get("prefill_s") for r in rs])
        row["rigid"] = _mean([r.get("rigid_fraction") for r in rs])
        row.update(_haystack_columns(next((r for r in rs if "ppl" in r), None)))
        rows.append(row)
    return rows


def _haystack_columns(record: HaystackMetrics | None) -> dict[str, float | None]:
    """The haystack metrics of the logits case (None where a configuration has none)."""
    m: HaystackMetrics = record or {}
    values = {
        "ppl": m.get("ppl"),
        "ppl_window": m.get("ppl_window"),
        "kl_mean": m.get("kl_mean"),
        "kl_max": m.get("kl_max"),
        "top1_agree": m.get("top1_agree"),
    }
    return {k: None if v is None else round(v, 4) for k, v in values.items()}


def target_verdict(
    rows: Sequence[SummaryRow], plan: QualityPlan, records: Sequence[CaseRecord] = ()
) -> TargetVerdict:
    """The issue's target at `plan.target_length`: an entropy configuration within `target_points` of dense
    accuracy at a density of at most `target_density`. With `records`, also which cases dense solves there
    and how many of those each entropy configuration solves too."""
    at = [r for r in rows if r["length"] == plan.target_length]
    dense = next((r for r in at if r["config"] == "dense"), None)
    solved = {
        (r["task"], r["depth"])
        for r in records
        if r["length"] == plan.target_length and r["policy"] == "dense" and r["correct"]
    }
    candidates: list[Candidate] = []
    for r in at:
        if r["policy"] != "entropy" or r["density"] is None:
            continue
        c: Candidate = {
            "config": r["config"],
            "accuracy_%": r["accuracy_%"],
            "vs_dense_pts": r["vs_dense_pts"],
            "density": r["density"],
            "cases": r["cases"],
            "kl_mean": r["kl_mean"],
        }
        if records:
            c["solves_of_dense"] = sum(
                1
                for x in records
                if x["length"] == plan.target_length
                and x["config"] == r["config"]
                and x["correct"]
                and (x["task"], x["depth"]) in solved
            )
        candidates.append(c)
    met = [
        c
        for c in candidates
        if c["density"] <= plan.target_density
        and c["vs_dense_pts"] is not None
        and c["vs_dense_pts"] >= -plan.target_points
    ]
    return {
        "length": plan.target_length,
        "dense_accuracy_%": dense["accuracy_%"] if dense else None,
        "dense_solved": sorted(f"{t}@{d:g}" for t, d in solved),
        "entropy": candidates,
        "met": bool(met),
        "met_by": [c["config"] for c in met],
    }


def markdown_table(columns: Sequence[str], rows: Sequence[SummaryRow]) -> str:
    """A markdown table of `rows` in `columns` ("-" for a missing value, floats to 3 significant digits)."""

    def fmt(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> dict[str, object]:
    """Date, versions and CPU facts for the results header (model name, cores, torch threads)."""
    import datetime
    import os
    import platform

    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def report_notes(plan: QualityPlan, meta: RunMeta) -> str:
    """The text under the results table: what was run, the target verdict, how to read the columns."""
    v = meta["target"]
    cases_at_target = len(plan.tasks) * len(plan.depths)
    status = "complete" if meta["complete"] else "PARTIAL (still running or interrupted)"
    cfg = meta["preset"]
    depths = ", ".join(f"{d:g}" for d in plan.depths)
    key_depths = ", ".join(f"{d:g}" for d in MULTIKEY_DEPTHS)
    verdict = (
        f"MET by: {', '.join(v['met_by'])}."
        if v["met"]
        else "NOT MET by any entropy configuration run at a density <= the target."
    )
    lines = [
        f"Run: `{meta['command']}`; {status}, {meta['run_seconds'] / 60:.1f} min of wall time, "
        f"{len(meta['cases'])} cases.",
        "",
        f"Tasks: {', '.join(plan.tasks)}; prompt lengths {', '.join(map(str, plan.lengths))} tokens "
        f"(chat template included); depths {depths}; greedy, exact match of the 5-digit code. "
        "Haystack: real prose (the plain-sentence paragraphs of CPython's pydoc topics: no code, no "
        "digits). Passkey: needle 'The secret number is X. Remember it. X is the secret number.', "
        "question before and after the text, assistant turn started with 'The secret number is'."
        + (
            f" Multi-key: {len(MULTIKEY_DEPTHS)} pairs 'The secret code of the K is X. ...' at depths "
            f"{key_depths} (plus the asked depth), one asked, answer started with "
            "'The secret code of the K is'."
            if "multikey" in plan.tasks
            else ""
        ),
        f"Preset `{plan.preset}` (S={cfg['segment_size']}, b={cfg['block_size']}, threshold "
        f"{cfg['threshold_len']}); `entropy B0=x`: base budget x (per_head mode unless named); `fixed x`: "
        "x tokens per (KV head, segment). Sweep configurations run only at "
        f"{', '.join(map(str, plan.sweep_lengths))} tokens.",
        "density: fraction of the causal QK work computed, averaged over layers (layer 0 is dense) and "
        "cases; rigid: rigid (layer, KV head) fraction; budget_mean: mean tokens per (KV head, sparse "
        "segment).",
        "agree_dense_%: cases whose answer code equals dense's (right or wrong). ppl: perplexity of the "
        f"haystack (real text) of the passkey prompt at depth {plan.logits_depth:g}, from the same "
        "prefill; ppl_window, kl_mean (KL(dense || policy), nats, mean per position), top1_agree: over "
        f"the haystack's last {plan.kl_window} positions. The pydoc topics repeat some sections, so the "
        "haystack repeats paragraphs; where the window holds repeats of earlier paragraphs (at 8176 tokens: "
        "dense ppl_window about 4 against 10-14 elsewhere) dense predicts them by copying from far back, "
        "and kl_mean there measures long-range copying more than local text.",
        "",
        f"Target (issue 3): entropy within {plan.target_points:g} points of dense accuracy at a density "
        f"of at most {plan.target_density:.0%} at {v['length']} tokens. Dense accuracy there: "
        f"{v['dense_accuracy_%']}% over {cases_at_target} cases (one case = "
        f"{100 / cases_at_target:.1f} points, so 'within 2 points' means no case lost). {verdict}",
    ]
    solved = v.get("dense_solved", [])
    for c in v["entropy"]:
        also = f", solves {c['solves_of_dense']} of dense's {len(solved)}" if "solves_of_dense" in c else ""
        kl = f", KL {c['kl_mean']:.3g} nats" if c.get("kl_mean") is not None else ""
        lines.append(
            f"- {c['config']}: accuracy {c['accuracy_%']}% ({c['vs_dense_pts']:+} points vs dense), "
            f"density {c['density']:.3f}{kl}{also}"
        )
    if solved:
        lines += [
            "",
            f"Dense solves at {v['length']} tokens: {', '.join(solved)} (task@depth); the accuracy "
            "comparison there rests on those cases.",
        ]
    correct: dict[tuple[int, str], int] = {}
    for x in meta["cases"]:
        correct[(x["length"], x["config"])] = correct.get((x["length"], x["config"]), 0) + bool(x["correct"])
    rows = summarize(meta["cases"])
    per_length = []
    for length in plan.lengths:
        parts = [
            f"{r['config']} {correct[(length, r['config'])]}/{r['cases']}"
            + (f" ({r['density']:.2f})" if r["density"] is not None and r["policy"] != "dense" else "")
            for r in rows
            if r["length"] == length
        ]
        if parts:
            per_length.append(f"- {length}: " + "; ".join(parts))
    if per_length:
        lines += ["", "Correct cases per length (mean density):", *per_length, ""]
    lines.append(
        "Reading the retrieval numbers: the question, and so the answer, sit in the prompt's last segment, "
        "which every policy computes densely (ALGORITHM.md, step 8), and every segment attends its own keys: "
        "retrieval tests whether the needle's keys and values survive the sparse layers below, a weaker test "
        "than KL / perplexity over the haystack's sparse segments."
    )
    return "\n".join(lines)


def file_writer(folder: str, name: str) -> WriteFn:
    """A `WriteFn` writing `<name>.json` ({"meta", "rows"}) and `<name>.md` into `folder`."""

    def write(title: str, columns: list[str], rows: list[SummaryRow], meta: RunMeta, notes: str) -> None:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        env = ", ".join(f"{k}: {v}" for k, v in meta.get("env", {}).items() if v is not None)
        text = f"# {title}\n\n{env}\n\n{markdown_table(columns, rows)}\n\n{notes}\n"
        (out / f"{name}.md").write_text(text)

    return write


def load_previous(path: str) -> dict[str, Any] | None:
    """The JSON of an earlier run at `path` ({"meta", "rows"}), or None if there is none (or it is
    unreadable)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
