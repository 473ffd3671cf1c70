"""`entropyinfer` command line: generate, demo, serve, submit, bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEMO_QUESTION = "In two sentences: what does the document say the assert statement does?"


def document_prompt(document: str, question: str) -> list[dict[str, str]]:
    """The chat turn used for document jobs: the document, then the question."""
    return [{"role": "user", "content": f"Read this document.\n\n{document}\n\nQuestion: {question}"}]


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or checkpoint folder")
    from entropyinfer.policies.registry import POLICIES

    p.add_argument(
        "--policy",
        default="dense",
        choices=tuple(POLICIES),
        help="attention policy: " + "; ".join(f"{p.name}: {p.summary}" for p in POLICIES.values()),
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: per device)")
    p.add_argument(
        "--load-format",
        choices=("auto", "dummy"),
        default="auto",
        help="auto: the checkpoint's weights; dummy: random weights of its shape (speed tests)",
    )
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)


def cmd_generate(args: argparse.Namespace) -> int:
    from entropyinfer.shard.llm import LLM
    from entropyinfer.shard.sampling import SamplingParams

    text = Path(args.prompt_file).read_text()
    prompt: Any = document_prompt(text, args.question) if args.question else text
    llm = LLM(
        args.model, policy=args.policy, device=args.device, dtype=args.dtype, load_format=args.load_format
    )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    out = llm.generate(prompt, params)[0]
    print(out.text.strip())
    print(json.dumps(_rounded(out.stats), indent=None), file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: a real document of several thousand tokens, one question, the answer."""
    if not args.offline:
        from entropyinfer.cluster.demo import run_demo

        return run_demo(model=args.model)
    from entropyinfer.evaluation.corpus import real_document
    from entropyinfer.shard.llm import LLM
    from entropyinfer.shard.sampling import SamplingParams

    document = real_document(3000)
    llm = LLM(
        args.model, policy=args.policy, device=args.device, dtype=args.dtype, load_format=args.load_format
    )
    prompt = document_prompt(document, DEMO_QUESTION)
    print(f"document: {llm.count_tokens(prompt)} tokens (CPython's pydoc topics); question: {DEMO_QUESTION}")
    out = llm.generate(prompt, SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature))[0]
    print(f"answer: {out.text.strip()}")
    print("stats: " + json.dumps(_rounded(out.stats)))
    return 0


def cmd_bench_quality(args: argparse.Namespace) -> int:
    """Passkey / multi-key retrieval, perplexity and KL vs dense on SmolLM2 (see evaluation/)."""
    import os

    from entropyinfer.evaluation.plans import FULL_PLAN, QUICK_PLAN
    from entropyinfer.evaluation.report import file_writer, load_previous
    from entropyinfer.evaluation.runner import run_and_report

    plan = QUICK_PLAN if args.quick else FULL_PLAN
    name = "quality_quick" if args.quick else "quality"
    out = (
        args.out
        or os.environ.get("OUT")
        or ("benchmarks/results" if Path("benchmarks/results").is_dir() else ".")
    )
    previous = None if args.fresh else load_previous(str(Path(out) / f"{name}.json"))
    command = "entropyinfer bench quality" + (" --quick" if args.quick else "")
    meta = run_and_report(
        plan, file_writer(out, name), previous=previous, command=command, threads=args.threads
    )
    print((Path(out) / f"{name}.md").read_text())
    print(f"target met: {meta['target']['met']}; results in {out}/{name}.json")
    return 0


def _rounded(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="entropyinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer a prompt file (optionally a question about it) offline")
    gen.add_argument("--prompt-file", required=True)
    gen.add_argument("--question", default=None)
    _add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo", help="the main job: answer a question about a real document")
    demo.add_argument("--offline", action="store_true", help="use the Python API directly, not the Serve app")
    _add_engine_args(demo)
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks that run on this machine")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    quality = bench_sub.add_parser("quality", help="retrieval accuracy, perplexity and KL of sparse vs dense")
    quality.add_argument("--quick", action="store_true", help="smoke run (1k/2k tokens, a few minutes)")
    quality.add_argument("--fresh", action="store_true", help="ignore an earlier, interrupted run's results")
    quality.add_argument(
        "--out",
        default=None,
        help="folder for the results (default: $OUT, else benchmarks/results or .)",
    )
    quality.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    quality.set_defaults(func=cmd_bench_quality)

    try:  # serving commands live under cluster/ (Ray); the engine works without them
        from entropyinfer.cluster.cli_commands import add_serve_parser, add_submit_parser
        from entropyinfer.cluster.policy_cli import add_policy_parser
    except ImportError:
        pass
    else:
        add_serve_parser(sub)
        add_submit_parser(sub)
        add_policy_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from entropyinfer.errors import EntropyInferError

    try:
        return int(args.func(args) or 0)
    except EntropyInferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
