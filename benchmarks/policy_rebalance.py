"""Does the policy actor's rebalancing help? (issue 13 item 6) SmolLM2-135M-Instruct, `entropy_short`.

1. Warm-up, per level (`--budgets`: the default rule's base budget B0): prefill `--warmup` real documents
   (pydoc topics from the end of the list, `evaluation.corpus.real_documents`; the evaluation's prose comes
   from the first topics) under the default entropy rule (`mode: causal`) at that B0 (what an actor serving
   at that B0 would see; before 2026-12-02 the warm-up ran at the preset's B0 = 256 for every level),
   collect each request's head statistics (`shard/head_report.py`, with the captured-mass proxy) into a
   `HeadProfile`, and make each `--variants` table (`policies.head_budgets.rebalance` with `move_budget`,
   budget-neutral; `VARIANTS`). Reports the rigid set's stability across the documents (mean Jaccard of
   consecutive documents) and the tables.
2. Per level: the default rule at B0, and the same rule with each table pinned, its B0 bisected (multiples
   of 8) so that its density matches the default's on each prompt (matched density, as
   `benchmarks/budget_quality.py` does for its rules).
3. Quality, both rules and dense: pass-key retrieval (`evaluation.tasks.passkey_case`) at every length x
   depth, and KL(dense || rule), top-1 agreement and perplexity on slices of real prose that does not repeat
   (`evaluation.corpus.unique_prose_text`), every sparse position.
   `--depths ''`: no pass-key cases (every rule solved them at 2k on CPU).
4. `<--name>.{json,md}` in `--out`, and each level's profile and first table as
   `<--name>_profile_b<B0>.json`.

CPU (2 cores, ~15 min): `python benchmarks/policy_rebalance.py --depths '' --text-slices 2 --warmup 6
  --budgets 16 --name policy_rebalance_cpu_matched_warmup --out benchmarks/results`
GPU (the lead's H200 call): `python benchmarks/policy_rebalance.py --device cuda --lengths 4096,8000
  --depths 0.1,0.3,0.5,0.7,0.9 --text-lengths 8000 --text-slices 4 --warmup 16 --budgets 32,64,128
  --out $OUT`
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment

from entropyinfer import LLM
from entropyinfer.evaluation.corpus import real_documents, unique_prose_text
from entropyinfer.evaluation.matched import text_metrics
from entropyinfer.evaluation.metrics import score
from entropyinfer.evaluation.runner import _answer
from entropyinfer.evaluation.tasks import passkey_case
from entropyinfer.policies.config import SparsePrefillConfig, load_sparse_config
from entropyinfer.policies.head_budgets import HeadBudgetTable, RebalanceConfig, rebalance, save_profile
from entropyinfer.policies.head_stats import HeadProfile
from entropyinfer.shard.attention import DensePrefill, PrefillAttention
from entropyinfer.shard.head_report import head_stats
from entropyinfer.shard.sparse_attention import SparsePrefill

MODEL = "smollm2-135m"


def sparse(cfg: SparsePrefillConfig, table: HeadBudgetTable | None, mass: bool = False) -> SparsePrefill:
    attention = SparsePrefill("entropy", cfg)
    if table is not None:
        attention.pin_table(torch.from_numpy(table.scales), table.version)
    attention.collect_mass = mass
    return attention


def prefill(llm: LLM, ids: list[int], attention: PrefillAttention, all_logits: bool) -> torch.Tensor:
    cache = llm.engine.new_cache(1, len(ids))
    with torch.inference_mode():
        return llm.engine.prefill(
            torch.tensor(ids, dtype=torch.long), cache, 0, attention, all_logits=all_logits
        )


def density(llm: LLM, ids: list[int], cfg: SparsePrefillConfig, table: HeadBudgetTable | None) -> float:
    attention = sparse(cfg, table)
    prefill(llm, ids, attention, False)
    return float(attention.stats()["density"])


def matched_budget(
    llm: LLM, ids: list[int], cfg: SparsePrefillConfig, table: HeadBudgetTable, target: float, tol: float
) -> tuple[int, float]:
    """The B0 (multiple of 8) whose density with the table is closest to `target` on `ids`: the rule's own
    B0 when it is within `tol` already (the table is budget-neutral), else bisected."""
    own = density(llm, ids, cfg, table)
    if abs(own - target) <= tol:
        return cfg.base_budget, own
    lo, hi, tried = 8, 4 * cfg.base_budget, {cfg.base_budget: own}
    while hi - lo > 8:
        mid = (lo + hi) // 16 * 8
        tried[mid] = density(llm, ids, dataclasses.replace(cfg, base_budget=mid), table)
        lo, hi = (mid, hi) if tried[mid] < target else (lo, mid)
    for b in (lo, hi):
        if b not in tried:
            tried[b] = density(llm, ids, dataclasses.replace(cfg, base_budget=b), table)
    best = min(tried, key=lambda b: abs(tried[b] - target))
    return best, tried[best]


# the tables compared with the default rule: RebalanceConfig fields over move_budget=True
VARIANTS: dict[str, dict[str, Any]] = {
    # session 5's rule: reliably rigid and saturated heads give half, low-mass heads take (<= 2x)
    "rebalanced": {"rigid_donors": True, "donor_scale": 0.5, "max_scale": 2.0},
    # RebalanceConfig's defaults since session 6: rigid heads keep theirs, saturated give a quarter, <= 1.5x
    "gentle": {},
}


def make_table(profile: HeadProfile, variant: str) -> HeadBudgetTable:
    cfg = RebalanceConfig(
        min_requests=max(2, profile.total_requests // 2), move_budget=True, **VARIANTS[variant]
    )
    return HeadBudgetTable(MODEL, 1, rebalance(profile, cfg), profile.total_requests, time.time())


def table_summary(table: HeadBudgetTable) -> dict[str, Any]:
    return {
        "donors": int((table.scales < 1).sum()),
        "receivers": int((table.scales > 1).sum()),
        "min": float(table.scales.min()),
        "max": float(table.scales.max()),
        "scales": table.scales.tolist(),
    }


def warm_up(llm: LLM, cfg: SparsePrefillConfig, docs: int, length: int) -> HeadProfile:
    arch = llm.engine.arch
    profile = HeadProfile(MODEL, arch.num_layers, arch.num_kv_heads)
    for text in real_documents(40)[-docs:]:
        ids = list(llm.tokenizer.encode(text, add_special_tokens=False))[:length]
        if len(ids) < cfg.threshold_len + 2 * cfg.segment_size:
            continue
        attention = sparse(cfg, None, mass=True)
        prefill(llm, ids, attention, False)
        stats = head_stats(attention, MODEL, arch.num_layers, arch.num_kv_heads)
        if stats is not None:
            profile.add(stats)
    return profile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lengths", default="1536,2048")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--text-lengths", default="2048")
    ap.add_argument("--text-slices", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--budgets", default="32,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tol", type=float, default=0.005, help="densities this close count as matched")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"tables of: {', '.join(VARIANTS)}")
    ap.add_argument("--name", default="policy_rebalance", help="result files <name>.json / .md")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    llm = LLM(MODEL, device=args.device, policy="entropy")
    base = load_sparse_config("entropy_short")
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",") if x.strip()]
    text_lengths = [int(x) for x in args.text_lengths.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "environment": environment(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "rules": ["default", *variants],
        "levels": {},
        "retrieval": [],
        "text": [],
        "complete": False,
    }
    tables: dict[int, dict[str, HeadBudgetTable]] = {}
    for b0 in budgets:
        t0 = time.perf_counter()
        profile = warm_up(
            llm, dataclasses.replace(base, base_budget=b0), args.warmup, max(lengths + text_lengths)
        )
        tables[b0] = {v: make_table(profile, v) for v in variants}
        if variants:
            save_profile(args.out / f"{args.name}_profile_b{b0}.json", profile, tables[b0][variants[0]])
        summary = profile.summary()
        result["levels"][str(b0)] = {
            "warmup_requests": profile.total_requests,
            "warmup_s": round(time.perf_counter() - t0, 1),
            "rigid_jaccard": profile.rigid_jaccard,
            "rigid_frequency_mean": float(np.nanmean(np.array(summary["rigid_frequency"], dtype=float))),
            "captured_mean": float(np.nanmean(np.array(summary["captured_mean"], dtype=float))),
            "tables": {v: table_summary(t) for v, t in tables[b0].items()},
        }
        lv = result["levels"][str(b0)]
        print(f"B0={b0} warm-up: {profile.total_requests} docs, rigid Jaccard {lv['rigid_jaccard']}, tables "
              f"{ {v: {k: x for k, x in t.items() if k != 'scales'} for v, t in lv['tables'].items()} }",
              flush=True)  # fmt: skip

    def matched(cfg: SparsePrefillConfig, ids: list[int], table: HeadBudgetTable, target: float) -> Any:
        b1, _ = matched_budget(llm, ids, cfg, table, target, args.tol)
        return sparse(dataclasses.replace(cfg, base_budget=b1), table), b1

    cases = [passkey_case(llm, n, d) for n in lengths for d in depths]
    dense_ok = {
        c.key: score(_answer(llm, c.prompt_ids, DensePrefill(), 16, False)[0], c.expected) for c in cases
    }
    for b0 in budgets:
        cfg = dataclasses.replace(base, base_budget=b0)
        for c in cases:
            text_d, st_d, _ = _answer(llm, c.prompt_ids, sparse(cfg, None), 16, False)
            row: dict[str, Any] = {
                "b0": b0, "length": c.length, "depth": c.depth, "dense": dense_ok[c.key],
                "default": score(text_d, c.expected), "default_density": st_d["density"],
            }  # fmt: skip
            for v in variants:
                att, b1 = matched(cfg, c.prompt_ids, tables[b0][v], float(st_d["density"]))
                text_r, st_r, _ = _answer(llm, c.prompt_ids, att, 16, False)
                row |= {v: score(text_r, c.expected), f"{v}_density": st_r["density"], f"{v}_b0": b1}
            result["retrieval"].append(row)
            print(row, flush=True)
            save(args.out, args.name, result, t_start)
    tokens = list(llm.tokenizer.encode(unique_prose_text(), add_special_tokens=False))
    start = base.threshold_len
    for n in text_lengths:
        for i in range(args.text_slices):
            off = i * (len(tokens) // 2 - n) // max(args.text_slices - 1, 1)  # the first half of the prose
            ids = tokens[off : off + n]
            dense_lp = torch.log_softmax(
                prefill(llm, ids, DensePrefill(), True)[start : n - 1].float(), dim=-1
            )
            for b0 in budgets:
                cfg = dataclasses.replace(base, base_budget=b0)
                row = {"b0": b0, "length": n, "offset": off}
                att = sparse(cfg, None)
                row["default"] = {**text_metrics(prefill(llm, ids, att, True), dense_lp, ids, start, 512),
                                  "density": att.stats()["density"]}  # fmt: skip
                for v in variants:
                    att, b1 = matched(cfg, ids, tables[b0][v], float(row["default"]["density"]))
                    row[v] = {**text_metrics(prefill(llm, ids, att, True), dense_lp, ids, start, 512),
                              "density": att.stats()["density"], "b0": b1}  # fmt: skip
                result["text"].append(row)
                print(row, flush=True)
                save(args.out, args.name, result, t_start)
    result["complete"] = True
    save(args.out, args.name, result, t_start)
    print(report(result))


def save(out: Path, name: str, result: dict[str, Any], t_start: float) -> None:
    """The results so far (every row; `complete` only after the last)."""
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(report(result))


def report(r: dict[str, Any]) -> str:
    lines = [
        "# Policy actor rebalancing vs the default entropy rule (SmolLM2-135M, entropy_short, causal)",
        "",
        f"Device: {r['args']['device']}. Warm-up per level (B0) on real documents, the tables made from it:",
        "",
    ]
    for b0, lv in r["levels"].items():
        tabs = "; ".join(
            f"{v}: {t['donors']} donor / {t['receivers']} receiver heads, "
            f"factors {t['min']:.2f}..{t['max']:.2f}"
            for v, t in lv["tables"].items()
        )
        jac = "n/a" if lv["rigid_jaccard"] is None else f"{lv['rigid_jaccard']:.3f}"
        lines.append(
            f"- B0={b0}: {lv['warmup_requests']} documents; rigid-set Jaccard (consecutive documents) {jac}; "
            f"mean rigid frequency {lv['rigid_frequency_mean']:.3f}; "
            f"mean captured mass (proxy) {lv['captured_mean']:.3f}; {tabs}."
        )
    lines += [
        "",
        "| B0 | rule | pass-key correct | dense correct | mean density | KL(dense‖rule) | top-1 agree "
        "| ppl (dense) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b0 in sorted({x["b0"] for x in r["retrieval"]} | {x["b0"] for x in r["text"]}):
        ret = [x for x in r["retrieval"] if x["b0"] == b0]
        txt = [x for x in r["text"] if x["b0"] == b0]
        for rule in r["rules"]:
            dens = [x[f"{rule}_density"] for x in ret] + [x[rule]["density"] for x in txt]
            kl = np.mean([x[rule]["kl_all"] for x in txt]) if txt else float("nan")
            top1 = np.mean([x[rule]["top1_agree"] for x in txt]) if txt else float("nan")
            ppl = np.mean([x[rule]["ppl"] for x in txt]) if txt else float("nan")
            ppl_d = np.mean([x[rule]["ppl_dense"] for x in txt]) if txt else float("nan")
            lines.append(
                f"| {b0} | {rule} | {sum(x[rule] for x in ret)}/{len(ret)} | "
                f"{sum(x['dense'] for x in ret)} | {np.mean(dens):.4f} | {kl:.4f} | {top1:.4f} | "
                f"{ppl:.3f} ({ppl_d:.3f}) |"
            )
    if not r.get("complete"):
        lines += ["", "PARTIAL: the run stopped before its last row."]
    lines += [
        "",
        f"Run time {r['elapsed_s']} s. Command: `python benchmarks/policy_rebalance.py {_argv(r)}`.",
    ]
    return "\n".join(lines) + "\n"


def _argv(r: dict[str, Any]) -> str:
    a = r["args"]
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in a.items() if k not in ("out",)) + " --out ..."


if __name__ == "__main__":
    main()
