"""Throughput over HTTP (issue 10, item 6): N concurrent completions against the local Serve app on
127.0.0.1 against the same requests one at a time, default configuration, and whether a repeated
~2k-token prefix is served from the prefix cache.

    python benchmarks/http_throughput.py                # SmolLM2 on the CPU: 8 x 64 tokens, 2048-token prefix
    python benchmarks/http_throughput.py --smoke        # tiny random model, 2 x 4 tokens, a temporary folder
    python benchmarks/http_throughput.py --llm enable_chunked_prefill=false --name http_throughput_unchunked

The app is the embedded default (`EmbeddedServer`: local Ray in this process, one engine replica with one
shard, the SQLite store in a temporary folder) with `ServeAppConfig`'s defaults: the engine settings are
`LLM`'s (policy dense, max_num_seqs, chunked prefill, prefix caching). Requests are plain
`/v1/completions` over real HTTP (httpx, one thread per request in the concurrent run), greedy with
`ignore_eos`, so every request produces `--max-tokens` tokens. `--rounds` rounds alternate the two
modes (one at a time, then concurrent), so a change in the machine's load (a shared machine) hits both;
each run's prompts start with a tag of their own ("[concurrent 1 3]"), so no run is served prompt pages
another wrote: the comparison is of batching, not of caching. Output tokens/s = the completion tokens of
a mode's requests over all rounds / the mode's wall time summed over its rounds.

Prefix: two requests share a `--prefix-tokens`-token document and differ in their question; the second
one's `usage.prompt_tokens_details.cached_tokens` says how much of its prompt came from the cache (0 if
the engine has no prefix cache), with each one's prefill time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results

from entropyinfer.evaluation.corpus import real_document

TINY = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=320, hidden_size=64,
            intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5)  # fmt: skip


def complete(url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json=body, timeout=1800)
    r.raise_for_status()
    out: dict[str, Any] = r.json()
    out["seconds"] = time.perf_counter() - t0
    return out


def prompts(tag: str, n: int, chars: int, doc: str) -> list[str]:
    return [f"[{tag} {i}] Summarize this text.\n\n" + doc[i * 97 : i * 97 + chars] for i in range(n)]


def run(url: str, batch: list[str], max_tokens: int, concurrent: bool) -> tuple[float, list[dict[str, Any]]]:
    t0 = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(batch)) as pool:
            outs = list(pool.map(lambda p: complete(url, p, max_tokens), batch))
    else:
        outs = [complete(url, p, max_tokens) for p in batch]
    return time.perf_counter() - t0, outs


def prefix_document(folder: str, doc: str, tokens: int) -> str:
    """The first `tokens` tokens of `doc` as text (the served model's tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return str(tokenizer.decode(tokenizer.encode(doc, add_special_tokens=False)[:tokens]))


def keyword(text: str) -> tuple[str, Any]:
    """KEY=VALUE, the value read as YAML (false, 8192, entropy)."""
    import yaml

    key, _, value = text.partition("=")
    return key.strip(), yaml.safe_load(value)


def serve_config(args: argparse.Namespace, tmp: Path) -> Any:
    from entropyinfer.cluster.config import AuthConfig, JobsConfig, ReplicaConfig, ServeAppConfig
    from entropyinfer.shard.config import LLMConfig

    keywords: dict[str, Any] = {"model": args.model, "device": "cpu", **dict(args.llm)}
    if args.smoke:
        from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint

        folder = write_dummy_checkpoint(tmp / "tiny", TINY)
        keywords.update(model=str(folder), load_format="dummy", warm_up_kernels=False)
    llm = LLMConfig.from_keywords(keywords)
    return ServeAppConfig(
        engine=ReplicaConfig(llm=llm, policies=(llm.policy,)),
        jobs=JobsConfig(db_path=str(tmp / "jobs.sqlite")),
        auth=AuthConfig(api_key=None, api_key_env=None),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-chars", type=int, default=1200, help="document characters per prompt")
    ap.add_argument("--prefix-tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2, help="alternating one-at-a-time / concurrent rounds")
    ap.add_argument("--name", default="http_throughput")
    ap.add_argument(
        "--llm",
        type=keyword,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an LLM keyword over the defaults (enable_chunked_prefill=false); repeatable",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 2 x 4 tokens, temporary folder")
    args = ap.parse_args()
    if args.smoke:
        args.requests, args.max_tokens, args.prompt_chars, args.prefix_tokens, args.rounds = 2, 4, 200, 300, 1
        os.environ["OUT"] = tempfile.mkdtemp()
    from entropyinfer.cluster.launcher import EmbeddedServer
    from entropyinfer.shard.embedded import resolve_checkpoint

    tmp = Path(tempfile.mkdtemp())
    doc = real_document(4 * args.prefix_tokens)
    config = serve_config(args, tmp)
    if args.smoke:  # the tiny model's tokenizer: one byte, one token
        prefix = doc[30000 : 30000 + args.prefix_tokens]
    else:
        model = str(resolve_checkpoint(config.engine.llm.model.model))
        prefix = prefix_document(model, doc[30000:], args.prefix_tokens)
    server = EmbeddedServer(config, port=None)
    load = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    server.start()
    try:
        print(f"server up at {server.url} in {time.perf_counter() - t0:.1f}s", flush=True)
        complete(server.url, "[warm-up] " + doc[:200], 2)
        timings: dict[str, list[tuple[float, list[dict[str, Any]]]]] = {"one": [], "concurrent": []}
        for r in range(args.rounds):  # alternating, so a change in the machine's load hits both modes
            for tag, concurrent in (("one", False), ("concurrent", True)):
                batch = prompts(f"{tag} {r}", args.requests, args.prompt_chars, doc)
                timings[tag].append(run(server.url, batch, args.max_tokens, concurrent))
                print(f"round {r}, {tag}: {timings[tag][-1][0]:.1f}s", flush=True)
                load.append(os.getloadavg()[0])
        shared = [complete(server.url, prefix + f"\n\nQuestion {q}: what is this about?", 8) for q in "AB"]
    finally:
        server.stop()
    rows = []
    for mode, tag in (("one at a time", "one"), ("concurrent", "concurrent")):
        seconds = sum(t for t, _ in timings[tag])
        outs = [o for _, round_outs in timings[tag] for o in round_outs]
        tokens = sum(o["usage"]["completion_tokens"] for o in outs)
        rows.append(
            {
                "mode": mode,
                "requests": len(outs),
                "seconds": round(seconds, 2),
                "output_tokens": tokens,
                "output_tok_s": round(tokens / seconds, 1),
                "rounds_s": [round(t, 1) for t, _ in timings[tag]],
                "cached_tokens": sum(o["usage"]["prompt_tokens_details"]["cached_tokens"] for o in outs),
            }
        )
    speedup = round(rows[1]["output_tok_s"] / rows[0]["output_tok_s"], 2)
    rows[0]["speedup"], rows[1]["speedup"] = 1.0, speedup
    prefix_rows = [
        {
            "request": i + 1,
            "prompt_tokens": o["usage"]["prompt_tokens"],
            "cached_tokens": o["usage"]["prompt_tokens_details"]["cached_tokens"],
            "prefill_ms": round(float(o["entropyinfer"].get("prefill_ms", 0.0)), 1),
            "seconds": round(o["seconds"], 2),
        }
        for i, o in enumerate(shared)
    ]
    import torch

    meta = {
        "env": environment(),
        "command": " ".join(sys.argv),
        "model": args.model if not args.smoke else "tiny random llama",
        "config": "ServeAppConfig defaults (engine settings: LLM's), CPU, one engine replica, one shard",
        "llm_overrides": dict(args.llm),
        "max_tokens": args.max_tokens,
        "prompt_tokens": [o["usage"]["prompt_tokens"] for o in timings["concurrent"][0][1]],
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_1min": [round(x, 2) for x in load],  # before the runs and after each (others' jobs)
        "speedup": speedup,
        "target_speedup": 2.5,
        "prefix": prefix_rows,
        "prefix_served_from_cache": prefix_rows[1]["cached_tokens"] > 0,
    }
    notes = (
        f"Greedy, ignore_eos, {args.max_tokens} tokens each, over HTTP on 127.0.0.1. Repeated prefix of "
        f"{prefix_rows[0]['prompt_tokens']} prompt tokens: second request cached_tokens="
        f"{prefix_rows[1]['cached_tokens']} (prefill {prefix_rows[0]['prefill_ms']} ms, then "
        f"{prefix_rows[1]['prefill_ms']} ms)."
    )
    print(
        write_results(
            args.name,
            f"{args.requests} concurrent completions over HTTP vs one at a time ({meta['model']}, cpu)",
            [
                "mode",
                "requests",
                "seconds",
                "rounds_s",
                "output_tokens",
                "output_tok_s",
                "speedup",
                "cached_tokens",
            ],
            rows,
            meta,
            notes=notes,
        )
    )


if __name__ == "__main__":
    main()
