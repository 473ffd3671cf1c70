"""Budget rules at matched density on SmolLM2-135M-Instruct (issues 10, 12): dense, fixed (`target_density`),
the reference entropy rule (per_head counts, and one count per segment), its causal variant (`mode: causal`:
rigid so far, what chunked prefill and prefix caching need), the causal spread rule and the causal coverage
rule (`mode: coverage`: blocks that cover a share of the block attention at 1/sqrt(d)).

One run does everything (`evaluation/matched.py`):
1. Retrieval cases: the retrieval task (`--task`, passkey by default) at every length x depth; dense answers
   all, the cases dense solves are the retrieval set.
2. Calibration, per density level: `fixed` takes the level as its `target_density` (solved per prompt); the
   entropy rules' knob (base budget; the spread factor) is bisected so that their density on a prompt is the
   level: on one prompt of the task per length (for that length's cases), and on each text prompt.
3. Retrieval on the dense-solved cases, for every (level, rule), plus `fixed matched`: fixed at the spread
   rule's own density on each case (the sharpest pair).
4. KL(dense || rule) per position over every sparse position, top-1 agreement and perplexity on real text that
   does not repeat (`evaluation.corpus.unique_prose_text`, several slices per length).
5. `budget_quality.{json,md}` in the output folder after every phase (partial results if the deadline
   passes), the table and the verdict per level (spread vs fixed: strictly better on retrieval and KL at
   densities within 0.01, within one case of dense at density <= 0.30).

GPU (the lead's H200 call; bf16, Triton path): `python benchmarks/budget_quality.py --families
causal,spread,coverage --deadline-s 400 --out $OUT` (about 7-8 minutes, Triton compiles included). Before
commit 88a6478 the knobs were calibrated to the mean density over all prompts, which gives short prompts more
density than `fixed target` did (benchmarks/results/budget_rules_verdict.md, section 1).
CPU check: `--smoke` (1k-1.5k tokens, one level; a few minutes).
More retrieval evidence at lower densities, no KL phase: `--task multikey --depths 17 --levels
0.15,0.2,0.25,0.3 --no-text --families causal` (the passkey task saturates near dense at 0.25-0.30).
`--families causal,per_head,reference` runs only those entropy rules (fixed always runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment

from entropyinfer import LLM
from entropyinfer.evaluation.corpus import unique_prose_text
from entropyinfer.evaluation.matched import (
    Family,
    calibrate,
    matched_verdict,
    prefill_logits,
    summarize_matched,
    text_metrics,
)
from entropyinfer.evaluation.plans import DENSE, PolicySpec
from entropyinfer.evaluation.report import markdown_table
from entropyinfer.evaluation.runner import run_case
from entropyinfer.evaluation.tasks import TASKS
from entropyinfer.policies.config import load_sparse_config

PRESET = "entropy_short"
# In spread mode B0 only caps the budget (3 * B0): 1024 keeps the cap out of the way up to density ~0.4 at 8k.
FAMILIES = (
    Family("entropy per_head", "entropy", "base_budget", 8, 2048, step=8, fixed=(("mode", "per_head"),)),
    Family("entropy reference", "entropy", "base_budget", 8, 2048, step=8, fixed=(("mode", "reference"),)),
    Family("entropy causal", "entropy", "base_budget", 8, 2048, step=8, fixed=(("mode", "causal"),)),
    Family(
        "entropy coverage",
        "entropy",
        "coverage",
        0.05,
        0.9999,
        fixed=(("mode", "coverage"), ("base_budget", 1024)),
    ),
    Family(
        "entropy spread",
        "entropy",
        "spread_factor",
        0.005,
        4.0,
        fixed=(("mode", "spread"), ("base_budget", 1024)),
    ),
)
FULL = dict(
    lengths=(2048, 3072, 4096, 5120, 6144, 7168, 8176),
    depths=(0.05, 0.15, 0.25, 0.35, 0.5, 0.65, 0.75, 0.85, 0.95),
    levels=(0.2, 0.25, 0.3),
    text_lengths=(2048, 4096, 6144, 8176),
    text_slices=2,
    iters=8,
)
SMOKE = dict(
    lengths=(1024, 1536), depths=(0.3, 0.7), levels=(0.5,), text_lengths=(1536,), text_slices=1, iters=5
)
# CPU (2 shared cores, fp32 torch reference path): what fits in about half an hour
CPU = dict(
    lengths=(2048, 4096), depths=(0.1, 0.3, 0.5, 0.7, 0.9), levels=(0.3,), text_lengths=(4096,),
    text_slices=2, iters=8,
)  # fmt: skip
COLUMNS = ["level", "config", "correct", "cases", "density", "density_text", "kl_all", "kl_window",
           "top1_agree", "ppl_ratio"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for budget_quality.json / .md")
    ap.add_argument("--smoke", action="store_true", help="CPU check: short prompts, one level")
    ap.add_argument("--cpu-plan", action="store_true", help="the reduced plan that fits a CPU run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--deadline-s", type=float, default=450.0, help="stop starting new work after this")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument(
        "--families",
        default="",
        help="comma-separated entropy rules to run (per_head, reference, causal, spread, coverage)",
    )
    ap.add_argument(
        "--kl-at",
        default="",
        help="KL only, no calibration: comma-separated family=knob (e.g. causal=200,per_head=200) plus "
        "fixed at the plan's first level, on the plan's text prompts",
    )
    ap.add_argument("--task", choices=sorted(TASKS), default="passkey", help="the retrieval task")
    ap.add_argument("--levels", default="", help="comma-separated density levels (default: the plan's)")
    ap.add_argument("--depths", type=int, default=0, help="this many evenly spaced needle depths")
    ap.add_argument("--no-text", action="store_true", help="retrieval only: skip the KL phase")
    args = ap.parse_args()
    wanted = {f"entropy {name.strip()}" for name in args.families.split(",") if name.strip()}
    families = [f for f in FAMILIES if not wanted or f.name in wanted]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    plan = dict(SMOKE if args.smoke else CPU if args.cpu_plan else FULL)
    if args.levels:
        plan["levels"] = tuple(float(x) for x in args.levels.split(",") if x.strip())
    if args.depths:
        plan["depths"] = tuple(round((i + 0.5) / args.depths, 4) for i in range(args.depths))
    if args.no_text:
        plan["text_lengths"] = ()
    plan["task"] = args.task
    make_case = TASKS[args.task]
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM("smollm2-135m", device=args.device)
    base = load_sparse_config(PRESET)
    if args.kl_at:
        return kl_at_knobs(llm, base, plan, args, out, t0)
    state: dict[str, Any] = {"retrieval": [], "text": [], "calibration": [], "dense_cases": [], "errors": []}
    failed: set[str] = set()  # families whose run raised (recorded in state["errors"]); the rest go on

    def error(family: str, where: str, exc: Exception) -> None:
        failed.add(family)
        state["errors"].append({"family": family, "where": where, "error": f"{type(exc).__name__}: {exc}"})
        print(f"ERROR {family} ({where}): {exc!r}", flush=True)

    meta = {
        "env": environment(),
        "command": " ".join(["python", *sys.argv]),
        "device": args.device,
        "dtype": str(llm.dtype),
        "preset": PRESET,
        "plan": plan,
        "families": [f.name for f in families],
    }

    def late() -> bool:
        return time.perf_counter() - t0 > args.deadline_s

    def save(phase: str, complete: bool = False) -> None:
        rows = summarize_matched(state["retrieval"], state["text"])
        pairs = [("entropy causal", "entropy per_head"), ("entropy causal", "entropy reference"),
                 ("entropy causal", "fixed"), ("entropy spread", "fixed"),
                 ("entropy spread", "fixed matched"), ("entropy spread", "entropy per_head"),
                 ("entropy coverage", "fixed"), ("entropy coverage", "entropy causal"),
                 ("entropy spread", "entropy causal"),
                 ("entropy per_head", "fixed")]  # fmt: skip
        run = {f.name for f in families} | {"fixed", "fixed matched"}
        pairs = [(c, b) for c, b in pairs if c in run and b in run]
        verdict = {f"{c} vs {b}": matched_verdict(rows, c, b) for c, b in pairs}
        meta.update(phase=phase, complete=complete, seconds=round(time.perf_counter() - t0, 1))
        (out / "budget_quality.json").write_text(
            json.dumps({"meta": meta, "rows": rows, "verdict": verdict, **state}, indent=1, default=str)
            + "\n"
        )
        (out / "budget_quality.md").write_text(report(meta, rows, verdict, state))

    # 1. retrieval cases, dense
    cases = [make_case(llm, n, d) for n in plan["lengths"] for d in plan["depths"]]
    for case in cases:
        rec, _ = run_case(llm, case, DENSE, base)
        state["dense_cases"].append(_brief(rec, None, "dense"))
    solved = [c for c, r in zip(cases, state["dense_cases"], strict=True) if r["correct"]]
    state["retrieval"] += [r for r in state["dense_cases"] if r["correct"]]
    save("dense")

    # 2. calibration, per prompt: every rule's knob at every level on this prompt (fixed: target_density)
    def matched_specs(ids: list[int], where: str) -> list[tuple[float, str, PolicySpec]]:
        specs = []
        for level in plan["levels"]:
            specs.append((level, "fixed", PolicySpec("fixed", "fixed", (("target_density", level),))))
            for fam in families:
                if late() or fam.name in failed:
                    continue
                try:
                    value, density, tried = calibrate(llm, [ids], fam, base, level, iters=plan["iters"])
                except Exception as exc:  # a kernel failing on this device must not cost the other rules
                    error(fam.name, f"calibration {where} {level}", exc)
                    continue
                state["calibration"].append({"prompt": where, "level": level, "family": fam.name,
                                             "value": value, "density": density, "tried": tried})  # fmt: skip
                specs.append((level, fam.name, fam.spec(value)))
        return specs

    # 3. retrieval on the dense-solved cases; the knobs calibrated on one prompt per length (the cases of a
    # length share their haystack, so their densities agree)
    for n in plan["lengths"]:
        if late():
            break
        specs = matched_specs(make_case(llm, n, 0.5).prompt_ids, f"{args.task} {n}")
        save("calibration")
        for level, fam_name, spec in specs:
            for case in [c for c in solved if c.length == n]:
                if late() or fam_name in failed:
                    break
                try:
                    rec, _ = run_case(llm, case, spec, base)
                    state["retrieval"].append(_brief(rec, level, fam_name))
                    if fam_name == "entropy spread":  # fixed at this case's own spread density
                        m = PolicySpec("fixed matched", "fixed", (("target_density", rec["density"]),))
                        rec_m, _ = run_case(llm, case, m, base)
                        state["retrieval"].append(_brief(rec_m, level, "fixed matched"))
                except Exception as exc:
                    error(fam_name, f"retrieval {spec.name}", exc)
        save("retrieval")

    # 4. KL / perplexity on real text that does not repeat
    tokens = list(llm.tokenizer.encode(unique_prose_text(), add_special_tokens=False))
    start = base.threshold_len  # the first sparse segment starts here: every sparse position counts
    for n in plan["text_lengths"]:
        for i in range(plan["text_slices"]):
            if late():
                break
            off = min(i * (len(tokens) - n) // max(plan["text_slices"] - 1, 1), len(tokens) - n)
            ids = tokens[off : off + n]
            specs = matched_specs(ids, f"text {n}@{off}")  # the knobs calibrated on this very prompt
            dense_logits, _ = prefill_logits(llm, ids, DENSE, base, True)
            dense_lp = torch.log_softmax(dense_logits[start : n - 1].float(), dim=-1)
            del dense_logits
            for level, fam_name, spec in specs:
                runs = [] if fam_name in failed else [(fam_name, spec)]
                while runs:
                    name, sp = runs.pop(0)
                    try:
                        logits, stats = prefill_logits(llm, ids, sp, base, True)
                    except Exception as exc:
                        error(name, f"text {sp.name}", exc)
                        continue
                    metrics = text_metrics(logits, dense_lp, ids, start, 1024)
                    del logits
                    state["text"].append({"level": level, "family": name, "config": name, "knob": sp.name,
                                          "length": n, "offset": off, "density": stats["density"],
                                          **metrics})  # fmt: skip
                    if name == "entropy spread":  # fixed at this prompt's own spread density
                        target = (("target_density", stats["density"]),)
                        runs.append(("fixed matched", PolicySpec("fixed matched", "fixed", target)))
            save("text")
    save("done", complete=not late())
    print((out / "budget_quality.md").read_text())


def kl_at_knobs(llm: LLM, base: Any, plan: dict[str, Any], args: Any, out: Path, t0: float) -> None:
    """`--kl-at`: KL / top-1 / perplexity against dense on the plan's text prompts at given knob values (no
    calibration: a quick check that fits a loaded CPU); writes kl_at.{json,md}."""
    by_name = {f.name.removeprefix("entropy "): f for f in FAMILIES}
    specs = [("fixed", PolicySpec("fixed", "fixed", (("target_density", plan["levels"][0]),)))]
    for item in args.kl_at.split(","):
        name, value = item.split("=")
        specs.append((f"entropy {name}", by_name[name].spec(float(value))))
    tokens = list(llm.tokenizer.encode(unique_prose_text(), add_special_tokens=False))
    start, rows = base.threshold_len, []
    for n in plan["text_lengths"]:
        for i in range(plan["text_slices"]):
            off = min(i * (len(tokens) - n) // max(plan["text_slices"] - 1, 1), len(tokens) - n)
            ids = tokens[off : off + n]
            dense_logits, _ = prefill_logits(llm, ids, DENSE, base, True)
            dense_lp = torch.log_softmax(dense_logits[start : n - 1].float(), dim=-1)
            for name, spec in specs:
                logits, stats = prefill_logits(llm, ids, spec, base, True)
                metrics = text_metrics(logits, dense_lp, ids, start, 1024)
                rows.append({"config": name, "knob": spec.name, "length": n, "offset": off,
                             "density": stats["density"], **metrics})  # fmt: skip
                print(json.dumps(rows[-1], default=str), flush=True)
                meta = {"env": environment(), "command": " ".join(["python", *sys.argv]),
                        "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
                (out / "kl_at.json").write_text(
                    json.dumps({**meta, "rows": rows}, indent=1, default=str) + "\n"
                )
    cols = ["config", "knob", "length", "offset", "density", "kl_all", "kl_window", "top1_agree", "ppl_ratio"]
    (out / "kl_at.md").write_text(markdown_table(cols, rows) + "\n")  # type: ignore[arg-type]


def _brief(rec: dict[str, Any], level: float | None, family: str) -> dict[str, Any]:
    keys = (
        "length",
        "depth",
        "expected",
        "answer",
        "correct",
        "density",
        "rigid_fraction",
        "budget_mean",
    )
    # rows group by (level, family): `config` is the family, `knob` the calibrated configuration
    return {"level": level, "family": family, "config": family, "knob": rec.get("config"),
            **{k: rec.get(k) for k in keys}}  # fmt: skip


def report(
    meta: dict[str, Any], rows: list[dict[str, Any]], verdict: dict[str, Any], state: dict[str, Any]
) -> str:
    dense = state["dense_cases"]
    lines = [
        "# Budget rules at matched density: SmolLM2-135M-Instruct",
        "",
        ", ".join(f"{k}: {v}" for k, v in meta["env"].items() if v is not None),
        f"device {meta['device']}, {meta['dtype']}; preset `{meta['preset']}`; run: `{meta['command']}`; "
        f"phase {meta['phase']}, {'complete' if meta['complete'] else 'PARTIAL'}, {meta['seconds']} s.",
        "",
        f"Retrieval: {meta['plan']['task']} at lengths {meta['plan']['lengths']} x depths "
        f"{meta['plan']['depths']}: dense "
        f"solves {sum(r['correct'] for r in dense)} of {len(dense)}; every sparse configuration runs on "
        "those cases (`correct` of `cases`). KL: KL(dense || rule) per position over every position from "
        f"the first sparse segment on, on de-duplicated real prose, lengths {meta['plan']['text_lengths']} x "
        f"{meta['plan']['text_slices']} slices (`kl_window`: the last 1024 positions only; `ppl_ratio`: "
        "perplexity over dense's). density: the retrieval cases' mean; density_text: the text prompts'.",
        "`fixed`: target_density = the level, solved per prompt; `fixed matched`: fixed at the spread rule's "
        "own density on each prompt; entropy rules: knob bisected to the level on one prompt of the task per "
        "length (retrieval) and on each text prompt (KL); the knob values are in the JSON (`calibration`).",
        "",
        markdown_table(COLUMNS, rows),  # type: ignore[arg-type]
        "",
        "## Verdict per level (candidate vs baseline; causal is the default mode of the presets)",
        "",
    ]
    for pair, items in verdict.items():
        for v in items:
            lines.append(f"- {pair}, level {v['level']}: {json.dumps(v, default=str)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
