"""`entropyinfer serve` and `entropyinfer submit` (added to the root CLI by `cli.py`).

entropyinfer serve [MODEL] [--config FILE] [--host H] [--port P] [--api-key K]   # embedded: local Ray here
entropyinfer serve MODEL --tensor-parallel-size 2 --max-model-len 32768         # vLLM's flags, vLLM's meaning
entropyinfer serve --address auto --accelerator gpu --detach              # deploy to a running cluster
entropyinfer submit FILES... --question Q [--url U]

`entropyinfer serve MODEL` works like `vllm serve MODEL`: the model is positional (or --model), and vLLM's
engine flags (VLLM_LLM_FLAGS) set the `engine.llm` keyword of the same name in the Serve config (docs/
serving.md has the table). Every flag overrides the config file's value; unset flags leave it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from entropyinfer.cluster.config import ServeFile

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]  # what add_subparsers returns


# vLLM's `serve` flags whose meaning is ours: each sets the `engine.llm` keyword of its name (LLM(...)'s).
VLLM_LLM_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("tensor_parallel_size", int, "ranks per replica (tensor parallel)"),
    ("gpu_memory_utilization", float, "fraction of GPU memory for the model and its KV pages"),
    ("max_model_len", int, "context length (default: the checkpoint's)"),
    ("max_num_seqs", int, "sequences running at once"),
    ("max_num_batched_tokens", int, "tokens per engine step"),
    ("dtype", str, "auto, half, float16, bfloat16, float, float32"),
    ("seed", int, "seed stream of sampled requests without their own seed"),
)


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model_tag", nargs="?", default=None, metavar="MODEL", help="model preset or checkpoint folder"
    )
    p.add_argument("--config", default="serve", help="Serve config file (default: configs/serve.yaml)")
    p.add_argument("--model", default=None, help="model preset or checkpoint folder (overrides the config)")
    for name, typ, help_text in VLLM_LLM_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_text)
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="automatic prefix caching (default: on)",
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", default=None, help="allow a remote-code tokenizer"
    )
    p.add_argument("--served-model-name", default=None, help="the model's name in /v1/models and requests")
    p.add_argument("--api-key", default=None, help="require this key (Authorization: Bearer KEY)")
    p.add_argument("--policy", default=None, help="default attention policy (overrides the config)")
    p.add_argument("--accelerator", choices=("auto", "gpu", "cpu"), default=None, help="shard bundles")
    p.add_argument(
        "--load-format",
        choices=("auto", "dummy"),
        default=None,
        help="dummy: random weights of the checkpoint's shape (overrides engine.llm.load_format)",
    )
    p.add_argument("--host", default=None, help="HTTP bind address (default from config: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (config: 8000; 0: any free)")
    p.add_argument("--db", default=None, help="SQLite job store path (default from config)")
    p.add_argument(
        "--address", default=None, help="connect to this Ray cluster (e.g. auto) instead of starting one here"
    )
    p.add_argument("--detach", action="store_true", help="with --address: submit the app and return")
    p.add_argument("--dashboard", default=None, help="with --detach: dashboard URL (default 127.0.0.1:8265)")
    p.add_argument("--quiet", action="store_true", help="do not forward Ray worker logs to this terminal")


def serve_argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="entropyinfer serve", description="Run the entropyinfer Serve application."
    )
    _serve_args(p)
    return p


def add_serve_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="run the HTTP server (embedded local Ray, or deploy to a cluster)"
    )
    _serve_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def add_submit_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("submit", help="submit documents with a question to a running server")
    p.add_argument("files", nargs="+", type=Path, help="text files, one document each")
    p.add_argument("--question", "-q", action="append", required=True, help="repeat for several questions")
    p.add_argument("--url", default=os.environ.get("ENTROPYINFER_URL", "http://127.0.0.1:8000"))
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--policy", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the results as JSON lines")
    p.set_defaults(func=cmd_submit)
    return p


def serve_file_from_args(args: argparse.Namespace) -> ServeFile:
    """The Serve config file with the command line's overrides (re-validated: a bad value is a
    ConfigError naming its key)."""
    from entropyinfer.cluster.config import load_serve_file
    from entropyinfer.cluster.launcher import apply_overrides
    from entropyinfer.errors import ConfigError

    if args.model_tag and args.model and args.model_tag != args.model:
        raise ConfigError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
    llm: dict[str, object] = {
        "model": args.model_tag or args.model,
        "policy": args.policy,
        "load_format": args.load_format,
        "enable_prefix_caching": args.enable_prefix_caching,
        "trust_remote_code": args.trust_remote_code,
        **{name: getattr(args, name) for name, _, _ in VLLM_LLM_FLAGS},
    }
    overrides: dict[str, object] = {}
    if any(v is not None for v in llm.values()):
        overrides["engine"] = {"llm": {k: v for k, v in llm.items() if v is not None}}
    if args.served_model_name is not None:
        overrides["served_model_name"] = args.served_model_name
    serve_file = load_serve_file(args.config)
    if overrides:
        serve_file = serve_file.with_args(overrides)
    return apply_overrides(
        serve_file,
        accelerator=args.accelerator,
        host=args.host,
        port=args.port,
        db_path=args.db,
        api_key=args.api_key,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from entropyinfer.cluster.launcher import EmbeddedServer, deploy_to_cluster

    serve_file = serve_file_from_args(args)
    if args.detach:
        if not args.address:
            print("error: --detach needs --address (a running cluster)", file=sys.stderr)
            return 2
        deploy_to_cluster(serve_file, dashboard=args.dashboard)
        print(f"submitted the app; it serves on {serve_file.host}:{serve_file.port} once the model is loaded")
        return 0
    if args.address:
        return _serve_on_cluster(serve_file, args.address)
    server = EmbeddedServer(
        serve_file.app, host=serve_file.host, port=serve_file.port, log_to_driver=not args.quiet
    )
    print(f"starting Ray, Serve and {serve_file.app.model_name} (the first start converts the model)...")
    try:
        with server:
            print(f"entropyinfer serving on {server.url} (Ctrl-C to stop)", flush=True)
            _wait_for_signal()
    except KeyboardInterrupt:
        print("interrupted while starting; stopped.")
        return 130
    print("stopped.")
    return 0


def _serve_on_cluster(serve_file: ServeFile, address: str) -> int:
    from entropyinfer.cluster.launcher import prepare_ray_env

    prepare_ray_env()
    import ray
    from ray import serve

    from entropyinfer.cluster.app import build_app

    ray.init(address=address, namespace="entropyinfer")
    serve.start(http_options={"host": serve_file.host, "port": serve_file.port}, proxy_location="HeadOnly")
    serve.run(build_app(serve_file.app), name=serve_file.app_name, route_prefix=serve_file.route_prefix)
    print(f"entropyinfer deployed on the cluster, HTTP {serve_file.host}:{serve_file.port}", flush=True)
    return 0


def _wait_for_signal() -> None:
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_submit(args: argparse.Namespace) -> int:
    from entropyinfer.cluster.client import Client

    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        print(f"error: not a file: {', '.join(missing)}", file=sys.stderr)
        return 2
    questions = list(args.question)
    with Client(args.url) as client:
        job = client.submit(
            args.files,
            questions[0] if len(questions) == 1 else None,
            questions=questions if len(questions) > 1 else None,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            policy=args.policy,
        )
        print(
            f"job {job.id}: {job.documents_total} documents, {job.prefill_tokens_total} prompt tokens",
            file=sys.stderr,
        )
        final = client.wait(job.id, progress=False if args.no_progress else None, raise_on_failure=False)
        results = client.results(job.id)
    for r in results:
        if args.json:
            print(json.dumps(r.__dict__, default=str))
        else:
            answer = r.text if r.error is None else f"[error] {r.error}"
            print(f"== {r.document_name or r.document_index} | {r.question}\n{(answer or '').strip()}\n")
    if final.state != "succeeded":
        print(f"job {final.id} {final.state}: {final.error}", file=sys.stderr)
        return 1
    return 0
