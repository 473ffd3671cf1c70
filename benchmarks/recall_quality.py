"""Block ranking at matched density on SmolLM2-135M-Instruct: the paper's box ranking against query ranking
(`ranking: queries`, `kernels/query_ranking.py`), for `fixed` and the entropy rules (causal, the default;
`--rules causal,reference` adds the paper's rule), on in-prompt recall (`evaluation/recall.py`) and on KL
against dense over real prose.

Why in-prompt recall: the passkey tasks ask at the prompt's end, whose segment runs dense, so they cannot see
which blocks a sparse segment kept. Here each probe is a code that a sparse segment must copy from a
definition thousands of tokens back; one teacher-forced prefill scores every probe of a prompt.

Per prompt length: `fixed` takes the level as its `target_density`; each entropy rule's base budget is
bisected to the level on the length's first recall prompt (the preset's own ranking; the ranking does not
change the counts, only which blocks, so the densities agree up to how the changed hidden states move the
entropies; each row's measured density is reported). Probes: those dense gets right (every code digit
top-1). KL: every position from the first sparse segment on, KL(dense || config), on de-duplicated prose,
each rule's knob bisected on that very prompt.

CPU (what fits in ~25 minutes on 2 shared cores, one torch thread): `python benchmarks/recall_quality.py
--out benchmarks/results` (the defaults). GPU: `--device cuda --lengths 2048,3072,4096,5120,6144,7168,8176
--seeds 4 --levels 0.15,0.2,0.25,0.3`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment

from entropyinfer import LLM
from entropyinfer.evaluation.corpus import unique_prose_text
from entropyinfer.evaluation.matched import Family, calibrate, prefill_logits, text_metrics
from entropyinfer.evaluation.plans import DENSE, PolicySpec
from entropyinfer.evaluation.recall import recall_prompt, score_recall
from entropyinfer.evaluation.report import markdown_table
from entropyinfer.policies.config import load_sparse_config

PRESET = "entropy_short"
CAUSAL = Family("entropy causal", "entropy", "base_budget", 32, 1024, step=8, fixed=(("mode", "causal"),))
REFERENCE = Family(
    "entropy reference", "entropy", "base_budget", 32, 1024, step=8, fixed=(("mode", "reference"),)
)
RULES = {"causal": CAUSAL, "reference": REFERENCE}


def configs(level: float, budgets: dict[str, int], strides: list[int]) -> list[tuple[str, PolicySpec]]:
    """(row name, spec) at one level: fixed and each entropy rule in `budgets` (its calibrated base budget),
    each with box and query ranking (always explicit, whatever the preset's default)."""
    specs = [("fixed", PolicySpec("fixed", "fixed", (("target_density", level),)))]
    specs += [(rule, RULES[rule].spec(budget)) for rule, budget in budgets.items()]
    out = []
    for rule, spec in specs:
        out.append((f"{rule} box", PolicySpec(spec.name, spec.policy, (*spec.overrides, ("ranking", "box")))))
        for st in strides:
            opts = (*spec.overrides, ("ranking", "queries"), ("ranking_stride", st))
            out.append((f"{rule} queries/{st}", PolicySpec(spec.name, spec.policy, opts)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for recall_quality.json / .md")
    ap.add_argument("--name", default="recall_quality_cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", default="3072,4096,6144")
    ap.add_argument("--seeds", type=int, default=2, help="recall prompts per length")
    ap.add_argument("--pairs", type=int, default=8, help="definitions (and probes) per prompt")
    ap.add_argument("--levels", default="0.2")
    ap.add_argument("--strides", default="8", help="ranking_stride values of the query-ranking rows")
    ap.add_argument("--text", default="4096", help="lengths of the KL prompts (one slice each)")
    ap.add_argument("--iters", type=int, default=6, help="bisection steps of the entropy rules' base budget")
    ap.add_argument("--rules", default="causal", help="entropy rules beside fixed: causal, reference")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    llm = LLM("smollm2-135m", device=args.device)
    base = load_sparse_config(PRESET)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    levels = [float(x) for x in args.levels.split(",") if x]
    strides = [int(x) for x in args.strides.split(",") if x]
    rules = [x for x in args.rules.split(",") if x]
    meta = {"env": environment(), "command": " ".join(["python", *sys.argv]), "device": args.device,
            "dtype": str(llm.dtype), "preset": PRESET, "pairs": args.pairs}  # fmt: skip
    probes: list[dict[str, Any]] = []
    text: list[dict[str, Any]] = []
    calib: list[dict[str, Any]] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        rows = summarize(probes, text)
        doc = {"meta": meta, "rows": rows, "calibration": calib, "probes": probes, "text": text}
        (out / f"{args.name}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        (out / f"{args.name}.md").write_text(report(meta, rows))

    for n in lengths:
        prompts = [recall_prompt(llm, n, seed, pairs=args.pairs) for seed in range(args.seeds)]
        budgets: dict[float, dict[str, int]] = {}
        for level in levels:
            budgets[level] = {}
            for rule in rules:
                value, density, tried = calibrate(
                    llm, [prompts[0].ids], RULES[rule], base, level, iters=args.iters
                )
                budgets[level][rule] = int(value)
                calib.append({"prompt": f"recall {n}", "rule": rule, "level": level, "value": value,
                              "density": density, "tried": tried})  # fmt: skip
        for p in prompts:
            logits, _ = prefill_logits(llm, p.ids, DENSE, base, True)
            dense = score_recall(logits, p)
            runs = [(None, "dense", DENSE)] + [
                (level, name, spec)
                for level in levels
                for name, spec in configs(level, budgets[level], strides)
            ]
            for level, name, spec in runs:
                if spec is not DENSE:
                    logits, stats = prefill_logits(llm, p.ids, spec, base, True)
                    got, density = score_recall(logits, p), float(stats["density"])
                else:
                    got, density = dense, 1.0
                for probe, (ok, first), (dense_ok, _) in zip(p.probes, got, dense, strict=True):
                    probes.append({"level": level, "config": name, "length": n, "seed": p.seed,
                                   "key": probe.key, "distance": probe.distance, "dense_ok": dense_ok,
                                   "correct": ok, "first_digit": first, "density": density})  # fmt: skip
            save()
            print(f"{time.perf_counter() - t0:.0f}s recall {n}/{p.seed}", flush=True)

    tokens = list(llm.tokenizer.encode(unique_prose_text(), add_special_tokens=False))
    start = base.threshold_len
    for n in [int(x) for x in args.text.split(",") if x]:
        ids = tokens[:n]
        dense_logits, _ = prefill_logits(llm, ids, DENSE, base, True)
        dense_lp = torch.log_softmax(dense_logits[start : n - 1].float(), dim=-1)
        del dense_logits
        for level in levels:
            text_budgets = {}
            for rule in rules:
                value, density, tried = calibrate(llm, [ids], RULES[rule], base, level, iters=args.iters)
                text_budgets[rule] = int(value)
                calib.append({"prompt": f"text {n}", "rule": rule, "level": level, "value": value,
                              "density": density, "tried": tried})  # fmt: skip
            for name, spec in configs(level, text_budgets, strides):
                logits, stats = prefill_logits(llm, ids, spec, base, True)
                text.append({"level": level, "config": name, "length": n, "density": float(stats["density"]),
                             **text_metrics(logits, dense_lp, ids, start, 1024)})  # fmt: skip
                del logits
            save()
            print(f"{time.perf_counter() - t0:.0f}s text {n} level {level}", flush=True)
    meta["complete"] = True
    save()
    print((out / f"{args.name}.md").read_text())


def summarize(probes: list[dict[str, Any]], text: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (level, config): probes right of those dense gets right, first digits right, mean
    density of the recall prompts; mean KL / top-1 / perplexity ratio over the text prompts."""
    keys = sorted({(r["level"], r["config"]) for r in [*probes, *text]}, key=lambda k: (k[0] or 0.0, k[1]))
    rows = []
    for level, config in keys:
        ps = [r for r in probes if (r["level"], r["config"]) == (level, config) and r["dense_ok"]]
        ts = [t for t in text if (t["level"], t["config"]) == (level, config)]
        dens = [r["density"] for r in probes if (r["level"], r["config"]) == (level, config)]

        def mean(xs: list[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        rows.append({
            "level": level, "config": config, "correct": sum(r["correct"] for r in ps), "probes": len(ps),
            "first_digit": sum(r["first_digit"] for r in ps), "density": mean(dens),
            "density_text": mean([t["density"] for t in ts]), "kl_all": mean([t["kl_all"] for t in ts]),
            "kl_window": mean([t["kl_window"] for t in ts]),
            "top1_agree": mean([t["top1_agree"] for t in ts]),
            "ppl_ratio": mean([t["ppl"] / t["ppl_dense"] for t in ts]),
        })  # fmt: skip
    return rows


def report(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    cols = ["level", "config", "correct", "probes", "first_digit", "density", "density_text", "kl_all",
            "kl_window", "top1_agree", "ppl_ratio"]  # fmt: skip
    lines = [
        "# Block ranking at matched density: in-prompt recall and KL, SmolLM2-135M-Instruct",
        "",
        ", ".join(f"{k}: {v}" for k, v in meta["env"].items() if v is not None),
        f"device {meta['device']}, {meta['dtype']}; preset `{meta['preset']}`; run: `{meta['command']}`; "
        f"{meta.get('seconds')} s{'' if meta.get('complete') else ', PARTIAL'}.",
        "",
        f"`correct`: probes whose every code digit is the top-1 prediction, of the `probes` dense gets right "
        f"({meta['pairs']} per prompt); `first_digit`: the first digit right. KL: KL(dense || config) per "
        "position from the first sparse segment on, de-duplicated prose. `box`: the paper's ranking; "
        "`queries/s`: query ranking with ranking_stride s.",
        "",
        markdown_table(cols, rows),  # type: ignore[arg-type]
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
