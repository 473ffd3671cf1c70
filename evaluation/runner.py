"""Running a quality plan on a real model: one case, the whole matrix, a whole resumable run with its report.

Pure functions over an `LLM` (the engine is driven directly, so one loaded model serves every policy and
budget of a sweep):

- `run_case`: prefill through a policy configuration, then greedy decoding that stops as soon as a 5-digit
  number is complete (or at EOS); the record holds the answer, its score and the prefill's statistics;
- `run_matrix`: the whole grid of a `QualityPlan` (lengths x policy configurations x tasks x depths),
  resumable: finished records are passed back in and skipped while their prompt is unchanged; the passkey
  case at the plan's `logits_depth` also gives the haystack metrics (no extra prefill);
- `run_and_report`: a whole run on SmolLM2 that saves its partial results after every case.

`entropyinfer bench quality` and `benchmarks/quality.py` run it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from entropyinfer.evaluation.metrics import haystack_metrics, kl_window, score
from entropyinfer.evaluation.plans import CaseRecord, PolicySpec, QualityPlan
from entropyinfer.evaluation.report import (
    MODEL_NOTE,
    RunMeta,
    WriteFn,
    machine,
    report_notes,
    summarize,
    summary_columns,
    target_verdict,
)
from entropyinfer.evaluation.tasks import CODE_RE, TASKS, Case
from entropyinfer.policies.config import SparsePrefillConfig, load_sparse_config
from entropyinfer.shard.attention import PrefillAttention, build_prefill_attention

if TYPE_CHECKING:
    from entropyinfer.shard.kv_cache import KVCache
    from entropyinfer.shard.llm import LLM

__all__ = ["DEFAULT_THREADS", "build_cases", "run_and_report", "run_case", "run_matrix"]

DEFAULT_THREADS = 1
"""torch CPU threads of a quality run. On a shared 2-core machine one thread is much faster: the sparse
prefill's torch reference runs thousands of small ops, each a parallel region whose threads wait for one
another when the cores are busy (measured, 2k tokens, entropy prefill: 8 s with 1 thread, 95-112 s with 2;
dense: 8 s against 18 s)."""


def _record_key(config: str, task: str, length: int, depth: float) -> str:
    return f"{config}|{task}|{length}|{depth:g}"


def _prompt_hash(ids: Sequence[int]) -> str:
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:16]


def run_case(
    llm: LLM,
    case: Case,
    spec: PolicySpec,
    base: SparsePrefillConfig,
    *,
    max_tokens: int = 16,
    logits: bool = False,
) -> tuple[CaseRecord, torch.Tensor | None]:
    """Answer one case under one configuration; with `logits`, also return the fp32 logits of every prompt
    position (for perplexity and KL). Returns the record and the logits (or None)."""
    attention = build_prefill_attention(spec.policy, spec.config(base))
    text, stats, all_logits = _answer(llm, case.prompt_ids, attention, max_tokens, logits)
    budget = stats.get("budget_tokens") or {}
    record: CaseRecord = {
        **spec.describe(base),
        "task": case.task,
        "length": case.length,
        "tokens": len(case.prompt_ids),
        "depth": case.depth,
        "depth_actual": round(case.depth_actual, 4),
        "prompt_sha": _prompt_hash(case.prompt_ids),
        "expected": case.expected,
        "answer": text,
        "correct": score(text, case.expected),
        "density": stats.get("density"),
        "rigid_fraction": stats.get("rigid_fraction"),
        "budget_mean": budget.get("mean"),
        "prefill_s": round(stats["prefill_s"], 2),
        "decode_s": round(stats["decode_s"], 2),
        "generated_tokens": stats["generated_tokens"],
    }
    return record, all_logits


def _answer(
    llm: LLM, prompt_ids: Sequence[int], attention: PrefillAttention, max_tokens: int, all_logits: bool
) -> tuple[str, dict[str, Any], torch.Tensor | None]:
    """Prefill and greedy answer; the attention's statistics (`PrefillAttention.stats`, untyped) plus the
    prefill and decode seconds and the generated token count."""
    engine = llm.engine
    n = len(prompt_ids)
    cache = engine.new_cache(1, n + max_tokens)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = engine.prefill(
            torch.tensor(list(prompt_ids), dtype=torch.long), cache, 0, attention, all_logits=all_logits
        )
    prefill_s = time.perf_counter() - t0
    first = out[-1] if all_logits else out
    t1 = time.perf_counter()
    text, generated = _greedy(llm, cache, n, int(first.argmax()), max_tokens)
    stats = dict(attention.stats())
    stats.pop("rigid_fraction_per_layer", None)
    stats.update(prefill_s=prefill_s, decode_s=time.perf_counter() - t1, generated_tokens=generated)
    return text, stats, (out.float() if all_logits else None)


@torch.inference_mode()
def _greedy(llm: LLM, cache: KVCache, n: int, token: int, max_tokens: int) -> tuple[str, int]:
    """Greedy decode from the first token; stops at EOS, at `max_tokens`, or once a 5-digit number is
    complete (followed by a non-digit). Returns the text and the number of generated tokens."""
    engine = llm.engine
    pos = torch.tensor([n], dtype=torch.long, device=engine.device)
    generated: list[int] = []
    text = ""
    while token not in llm.eos_token_ids and len(generated) < max_tokens:
        generated.append(token)
        text = llm.tokenizer.decode(generated, skip_special_tokens=True)
        m = CODE_RE.search(text)
        if (m and m.end() < len(text.rstrip())) or len(generated) >= max_tokens:
            break
        logits = engine.decode_step(torch.tensor([token], device=engine.device), pos, cache)[0]
        pos += 1
        token = int(logits.argmax())
        if m and not llm.tokenizer.decode([token]).lstrip()[:1].isdigit():
            break  # the code is complete: the next token is not a digit
    return text, len(generated)


def build_cases(llm: LLM, plan: QualityPlan) -> list[Case]:
    """Every case of `plan`: each task at each length and depth (the configurations share them)."""
    return [TASKS[t](llm, n, d) for n in plan.lengths for t in plan.tasks for d in plan.depths]


def run_matrix(
    llm: LLM,
    plan: QualityPlan,
    done: Iterable[CaseRecord] = (),
    on_record: Callable[[list[CaseRecord]], object] | None = None,
    log: Callable[[str], None] = print,
) -> list[CaseRecord]:
    """Run every (length, configuration, task, depth) of `plan`, skipping those in `done` (records of an
    earlier, interrupted run whose prompt is unchanged). Calls `on_record(records)` after every new record,
    so the caller can save partial results. Returns all records of the plan, in run order."""
    base = load_sparse_config(plan.preset)
    previous = {
        _record_key(r["config"], r["task"], r["length"], r["depth"]): r for r in done if "config" in r
    }
    records: list[CaseRecord] = []
    cases = {c.key: c for c in build_cases(llm, plan)}
    total = sum(plan.cases_at(n) for n in plan.lengths)
    t_start = time.perf_counter()
    new = 0
    for length in plan.lengths:
        dense_lp: torch.Tensor | None = None
        for spec in plan.specs_at(length):
            for task in plan.tasks:
                for depth in plan.depths:
                    case = cases[f"{task}/{length}/{depth:g}"]
                    key = _record_key(spec.name, task, length, depth)
                    want_logits = task == "passkey" and depth == plan.logits_depth
                    old = previous.get(key)
                    if old is not None and old.get("prompt_sha") == _prompt_hash(case.prompt_ids):
                        records.append(old)
                        continue
                    if want_logits and spec.policy != "dense" and dense_lp is None:
                        dense_lp = _dense_logprobs(llm, case, base, plan)
                    record, logits = run_case(
                        llm, case, spec, base, max_tokens=plan.max_tokens, logits=want_logits
                    )
                    if logits is not None:
                        if spec.policy == "dense":
                            w_lo, w_hi = kl_window(case, plan.kl_window)
                            dense_lp = torch.log_softmax(logits[w_lo:w_hi], dim=-1)
                        record.update(
                            haystack_metrics(
                                logits, case, plan.kl_window, dense_lp if spec.policy != "dense" else None
                            )
                        )
                        del logits
                    records.append(record)
                    new += 1
                    elapsed = time.perf_counter() - t_start
                    log(
                        f"[{len(records)}/{total}] {key}: {'ok ' if record['correct'] else 'MISS'} "
                        f"{record['answer']!r} (expected {case.expected}) density {record['density']:.3f} "
                        f"prefill {record['prefill_s']:.1f}s; {new} new in {elapsed / 60:.1f} min"
                    )
                    if on_record is not None:
                        on_record(records)
    return records


def _dense_logprobs(llm: LLM, case: Case, base: SparsePrefillConfig, plan: QualityPlan) -> torch.Tensor:
    """Dense log-probabilities over the KL window of `case` (when resuming after the dense record)."""
    attention = build_prefill_attention("dense", base)
    n = len(case.prompt_ids)
    cache = llm.engine.new_cache(1, n)
    with torch.inference_mode():
        logits = llm.engine.prefill(
            torch.tensor(case.prompt_ids, dtype=torch.long), cache, 0, attention, all_logits=True
        )
    w_lo, w_hi = kl_window(case, plan.kl_window)
    return torch.log_softmax(logits[w_lo:w_hi].float(), dim=-1)


def run_and_report(
    plan: QualityPlan,
    write: WriteFn,
    *,
    previous: dict[str, Any] | None = None,
    env: dict[str, object] | None = None,
    command: str = "",
    llm: LLM | None = None,
    threads: int | None = DEFAULT_THREADS,
    log: Callable[[str], None] = print,
) -> RunMeta:
    """Run `plan` on SmolLM2 (or `llm`), calling `write` after every case (partial results, `complete`
    False) and once at the end. `previous` is the JSON of an earlier run of the plan ({"meta", "rows"}, as
    `report.load_previous` reads it): its finished cases are kept, and its run time is added to this one's.
    `threads`: torch CPU threads (None leaves torch's default). Returns the final meta."""
    if threads is not None:
        torch.set_num_threads(threads)
    if llm is None:
        from entropyinfer.shard.llm import LLM

        llm = LLM("smollm2-135m", device="cpu")

    prev_meta = (previous or {}).get("meta", {})
    done: list[CaseRecord] = (
        prev_meta.get("cases", []) if prev_meta.get("plan", {}).get("name") == plan.name else []
    )
    prior_s = float(prev_meta.get("run_seconds", 0.0)) if done else 0.0
    t0 = time.perf_counter()
    base = load_sparse_config(plan.preset)
    title = f"Quality of sparse prefill vs dense: {MODEL_NOTE} ({plan.name} plan)"

    def save(records: list[CaseRecord], complete: bool = False) -> RunMeta:
        rows = summarize(records)
        meta: RunMeta = {
            "env": {**(env or {}), **machine()},
            "model": MODEL_NOTE,
            "command": command,
            "complete": complete,
            "run_seconds": round(prior_s + time.perf_counter() - t0, 1),
            "plan": plan.to_dict(),
            "preset": dataclasses.asdict(base),
            "target": target_verdict(rows, plan, records),
            "cases": records,
        }
        write(title, summary_columns(plan.tasks), rows, meta, report_notes(plan, meta))
        return meta

    if done:
        log(f"resuming: {len(done)} finished cases from the earlier run")
    records = run_matrix(llm, plan, done, on_record=save, log=log)
    return save(records, complete=True)
