"""Quality of entropy-guided sparse prefill against dense on a real model (SmolLM2-135M-Instruct, CPU).

Passkey retrieval (a 5-digit "secret number" in real prose) over prompt lengths 2k-8k and five depths,
perplexity of the haystack's real text and logit KL(dense || sparse) from the same prefill; dense / entropy /
fixed (at about the entropy densities) with the short-context preset, and a sweep (entropy B0=384 / 512,
reference mode, fixed 128) at 8k tokens. The multi-key task stays in the harness but not in the plans:
SmolLM2-135M answers it densely only for the last pair. The tasks, scoring, matrix and report live in
`entropyinfer.evaluation` (also run by `entropyinfer bench quality`).

Run: `python benchmarks/quality.py [--quick] [--fresh]`; writes quality.{json,md} (quality_quick.* with
--quick) to $OUT or benchmarks/results/ after every case. A rerun resumes: finished cases of the same plan
whose prompt is unchanged are kept (--fresh starts over).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, out_dir, write_results

from entropyinfer.evaluation.plans import FULL_PLAN, QUICK_PLAN
from entropyinfer.evaluation.report import RunMeta, SummaryRow, load_previous
from entropyinfer.evaluation.runner import DEFAULT_THREADS, run_and_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1k/2k tokens, one depth (a few minutes)")
    ap.add_argument("--fresh", action="store_true", help="ignore the results of an earlier, interrupted run")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch CPU threads (default 1)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    name = "quality_quick" if args.quick else "quality"
    previous = None if args.fresh else load_previous(str(out_dir() / f"{name}.json"))

    def write(title: str, columns: list[str], rows: list[SummaryRow], meta: RunMeta, notes: str) -> str:
        return write_results(name, title, columns, rows, dict(meta), notes)

    command = "python benchmarks/quality.py" + (" --quick" if args.quick else "")
    if args.threads != DEFAULT_THREADS:
        command += f" --threads {args.threads}"
    meta = run_and_report(
        plan,
        write,
        previous=previous,
        env=environment(),
        command=command,
        threads=args.threads,
        log=lambda line: print(line, flush=True),
    )
    print((out_dir() / f"{name}.md").read_text())
    print(f"target met: {meta['target']['met']} ({meta['run_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
