"""The engine core as a serving engine on one GPU (issue 10, item 7): random-weight Llama-3-8B shape, bf16,
in-process through `LLM` (submit / step / take_events, shard/llm.py), one part per run:

    python benchmarks/engine_serving.py --part a   # 64 concurrent chats (1k prompt, 256 out) vs one at a time
    python benchmarks/engine_serving.py --part b   # 16 chat streams decoding while a 128k document prefills
    python benchmarks/engine_serving.py --part c   # a 128k document + 8 questions, prefix cache on vs off
    python benchmarks/engine_serving.py --part d   # lone-request TTFT at 32k/128k and decode ms/token
    python benchmarks/engine_serving.py --part a --smoke   # CPU, tiny model, tiny sizes (any part)

a. Output tokens/s of `--requests` requests submitted together (default engine settings) against the same
   requests with `max_num_seqs=1` (one at a time: the pre-core path), the latter over the first
   `--alone-requests` of them (a rate; the one-at-a-time run is long). Target: >= 8x.
b. Interference: `--streams` streams (dense, `--stream-prompt` tokens) decode; a `--doc-tokens` document
   (entropy, then dense) is submitted and prefills in chunks of `max_num_batched_tokens` (`--chunks`, one
   engine per value); the gaps between consecutive tokens of every stream while it prefills give p50 /
   p99 / max inter-token latency (target: p99 <= 100 ms for entropy), next to the gaps before it.
c. One document and `--questions` questions (prompt = document + question) submitted together, as the job
   worker does, with `enable_prefix_caching` on and off: wall time until all answered, and the prompt
   tokens actually prefilled (sum of prompt_tokens - cached_tokens). Target: >= 5x faster with the cache.
d. One request at a time, `--lengths` tokens, dense and entropy: TTFT (submit to first token, and the
   engine's prefill_ms) and decode ms/token, against benchmarks/results/ttft_decode.json (the pre-core
   path). Target: within 5%. `--lone-chunks` picks the chunk sizes tried, `--lone-new` the tokens out.

Every timed run follows an untimed run of the same shape. Results: engine_serving_<part>.{json,md} via
common.write_results ($OUT on the device machine; a temporary folder with --smoke).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLAMA3_8B, environment, write_results

from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint
from entropyinfer.shard.engine_core import Finished, TokenDelta
from entropyinfer.shard.llm import LLM
from entropyinfer.shard.parallel.launch import freeze_start_up_objects
from entropyinfer.shard.sampling import SamplingParams

LLAMA = dict(LLAMA3_8B, model_type="llama", architectures=["LlamaForCausalLM"])
TINY = dict(LLAMA, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=16384)  # fmt: skip
FULL = dict(requests=64, alone_requests=8, prompt=1024, new=256, streams=16, stream_prompt=512,
            doc_tokens=131072, chunks=[2048, 8192], questions=8, answer=32, lengths=[32768, 131072],
            lone_chunks=[8192, 32768], lone_new=64)  # fmt: skip
SMOKE = dict(requests=6, alone_requests=2, prompt=64, new=6, streams=3, stream_prompt=32, doc_tokens=1500,
             chunks=[256, 1024], questions=3, answer=4, lengths=[600, 1500], lone_chunks=[512],
             lone_new=4)  # fmt: skip


_SEEDS = iter(range(1_000_000))


def text(n: int, seed: int | None = None) -> str:
    """n - 2 bytes of the byte-level tokenizer (one byte = one token; BOS makes n - 1 prompt tokens). A
    new seed each call unless given: no run is served another run's pages from the prefix cache."""
    rng = random.Random(next(_SEEDS) if seed is None else seed)
    return "".join(rng.choice("abcdefghij ") for _ in range(n - 2))


ENGINE_DEFAULTS: dict[str, Any] = {}  # LLM keywords of every engine of a run (main: --gather-prefix)


class Engine:
    """One `LLM` over the dummy checkpoint, stepped by hand (submit / step / take_events)."""

    def __init__(self, folder: Path, device: str, **keywords: Any) -> None:
        self.llm = LLM(str(folder), load_format="dummy", device=device, **{**ENGINE_DEFAULTS, **keywords})
        freeze_start_up_objects()  # as the Serve shard actor does after building its engine
        self.ids = 0
        self.cancels: dict[str, threading.Event] = {}

    def submit(
        self, prompt: str, max_tokens: int, policy: str = "dense", ids: list[int] | None = None
    ) -> str:
        rid = f"r{self.ids}"
        self.ids += 1
        self.cancels[rid] = threading.Event()
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        self.llm.submit(self.llm.request(rid, prompt, params, policy, cancel=self.cancels[rid], ids=ids))
        return rid

    def step(self, rids: Iterable[str]) -> tuple[float, dict[str, list[Any]]]:
        """One engine step; (the time after it, the events of `rids`): when the host has the events, as a
        client would (no device sync: with overlapped decode the next step is still running then)."""
        self.llm.step()
        now = time.perf_counter()
        return now, {rid: self.llm.take_events(rid) for rid in rids}

    def run(
        self, rids: list[str], on_step: Callable[[float, dict[str, list[Any]]], None] | None = None
    ) -> dict[str, Any]:
        """Step until every one of `rids` finished; their outputs."""
        outputs: dict[str, Any] = {}
        while len(outputs) < len(rids):
            now, events = self.step([r for r in rids if r not in outputs])
            if on_step is not None:
                on_step(now, events)
            for rid, evs in events.items():
                for e in evs:
                    if isinstance(e, Finished):
                        outputs[rid] = e.output
        return outputs

    def close(self) -> None:
        """Free the model, its KV pool and graphs before the next engine sizes its pool from free memory."""
        gc.unfreeze()  # what the freeze at start kept from the collector (the LLM's cycles among it)
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            print(
                f"engine closed: {torch.cuda.memory_allocated() / 2**30:.1f} GiB still allocated", flush=True
            )


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2)


class Rows(list[dict[str, Any]]):
    """The part's rows; each one added is printed and every row so far written at once (a run that hits
    its time limit still leaves its results)."""

    def __init__(self, save: Callable[[list[dict[str, Any]]], None]) -> None:
        super().__init__()
        self._save = save

    def append(self, row: dict[str, Any]) -> None:
        super().append(row)
        print(row, flush=True)
        self.save()

    def save(self) -> None:
        self._save(list(self))


# ---- a: throughput --------------------------------------------------------------------------------------


def part_a(folder: Path, device: str, s: dict[str, Any], rows: Rows) -> dict[str, Any]:
    prompts = [text(s["prompt"]) for _ in range(s["requests"])]
    for label, count, keywords in (
        ("concurrent", s["requests"], {"max_num_seqs": s["requests"]}),
        ("max_num_seqs=1", s["alone_requests"], {"max_num_seqs": 1}),
    ):
        engine = Engine(folder, device, **keywords)
        warm = [text(s["prompt"]) for _ in range(count)]  # untimed: same shapes, other prompts
        engine.run([engine.submit(p, 8) for p in warm])
        t0 = time.perf_counter()
        outs = engine.run([engine.submit(p, s["new"]) for p in prompts[:count]])
        seconds = time.perf_counter() - t0
        tokens = sum(len(o.token_ids) for o in outs.values())
        rows.append({"mode": label, "requests": count, "output_tokens": tokens, "seconds": round(seconds, 2),
                     "output_tok_s": round(tokens / seconds, 1)})  # fmt: skip
        engine.close()
    speedup = rows[0]["output_tok_s"] / rows[1]["output_tok_s"]
    rows[0]["speedup"], rows[1]["speedup"] = round(speedup, 2), 1.0
    rows.save()
    return {"target_speedup": 8.0, "prompt_tokens": s["prompt"], "new_tokens": s["new"]}


# ---- b: interference -------------------------------------------------------------------------------------


def part_b(folder: Path, device: str, s: dict[str, Any], rows: Rows) -> dict[str, Any]:
    for chunk in s["chunks"]:
        engine = Engine(folder, device, max_num_batched_tokens=chunk)
        for policy in s["policies"]:
            interference(engine, s, policy, s["doc_tokens"] // 8)  # untimed: kernels compiled
            row = {"max_num_batched_tokens": chunk, **interference(engine, s, policy, s["doc_tokens"], chunk)}
            rows.append(row)
        engine.close()
    return {"target_p99_ms": 100.0, "streams": s["streams"], "doc_tokens": s["doc_tokens"]}


def interference(
    engine: Engine, s: dict[str, Any], policy: str, doc_tokens: int, chunk: int = 0
) -> dict[str, Any]:
    """ITL of the streams while the document prefills; `slowest_steps`: the 5 longest engine steps of the
    prefill (wall ms, step index, about how many document tokens were prefilled by its end: index x chunk),
    which locate the steps that set p99 (one step delays every stream at once)."""
    limit = min(4096, engine.llm.max_context - s["stream_prompt"] - 8)  # enough for any prefill here
    streams = [engine.submit(text(s["stream_prompt"]), limit) for _ in range(s["streams"])]
    last: dict[str, float] = {}
    before: list[float] = []
    during: list[float] = []

    def on_step(now: float, events: dict[str, list[Any]], gaps: list[float]) -> None:
        for rid in streams:
            for e in events.get(rid, []):
                if isinstance(e, TokenDelta):
                    if rid in last:
                        gaps.append((now - last[rid]) * 1e3)
                    last[rid] = now

    prompt = text(doc_tokens)  # made and tokenized before the streams' clock runs (0.1 s of host time that
    ids = engine.llm.encode(prompt)  # was the streams' first gap during the prefill, and set p99 at 186 ms)
    while len(last) < len(streams):  # until every stream decodes (their own prefill chunks are done)
        on_step(*engine.step(streams), [])
    while len(before) < 4 * len(streams):  # the streams' decode alone: 4 tokens each
        on_step(*engine.step(streams), before)
    t0 = time.perf_counter()
    doc = engine.submit(prompt, 1, policy, ids)
    out = None
    steps: list[float] = []
    prev = t0
    while out is None:
        now, events = engine.step([*streams, doc])
        steps.append((now - prev) * 1e3)
        prev = now
        on_step(now, events, during)
        out = next((e.output for e in events[doc] if isinstance(e, Finished)), None)
    for rid in streams:
        engine.cancels[rid].set()
    engine.run(streams)
    return {
        "policy": policy,
        "prefill_s": round(now - t0, 2),
        "density": round(float(out.stats.get("density", 1.0)), 3),
        "itl_before_p50_ms": percentile(before, 0.5),
        "itl_p50_ms": percentile(during, 0.5),
        "itl_p99_ms": percentile(during, 0.99),
        "itl_max_ms": round(max(during), 2) if during else None,
        "gaps": len(during),
        "steps": len(steps),
        "slowest_steps": [
            {"ms": round(steps[i], 1), "step": i, "doc_tokens_done": min((i + 1) * chunk, doc_tokens)}
            for i in sorted(range(len(steps)), key=lambda i: -steps[i])[:5]
        ],
    }


# ---- c: a document and its questions, prefix cache on / off ------------------------------------------


def run_job(
    engine: Engine, prompts: list[str], answer: int, policy: str
) -> tuple[float, dict[str, Any], list[float]]:
    """The prompts submitted together until all answered: (seconds, outputs, each one's seconds to its
    first token, sorted: when its prefill was done; the rest of the wall time is the answers' decode)."""
    t0 = time.perf_counter()
    first: dict[str, float] = {}

    def on_step(now: float, events: dict[str, list[Any]]) -> None:
        for rid, evs in events.items():
            if rid not in first and any(isinstance(e, TokenDelta) for e in evs):
                first[rid] = now - t0

    outs = engine.run([engine.submit(p, answer, policy) for p in prompts], on_step)
    return time.perf_counter() - t0, outs, sorted(round(x, 2) for x in first.values())


def part_c(folder: Path, device: str, s: dict[str, Any], rows: Rows) -> dict[str, Any]:
    for policy in s["policies"]:
        for cache in (True, False):
            engine = Engine(folder, device, enable_prefix_caching=cache)
            for size, questions in ((s["doc_tokens"] // 8, 2), (s["doc_tokens"], s["questions"])):
                body = text(size)  # untimed (a smaller job), then timed: each its own document
                prompts = [f"{body}\n\nQuestion {q}: what does it say?" for q in range(questions)]
                seconds, outs, first = run_job(engine, prompts, s["answer"], policy)
            stats = [o.stats for o in outs.values()]
            prompt = sum(int(st["prompt_tokens"]) for st in stats)
            cached = sum(int(st.get("cached_tokens", 0)) for st in stats)
            rows.append({"policy": policy, "prefix_cache": cache, "questions": len(stats),
                         "wall_s": round(seconds, 2), "prompt_tokens": prompt, "cached_tokens": cached,
                         "prefilled_tokens": prompt - cached,
                         # where the time goes: each question's first token, then the answers' decode
                         "first_token_s": first,
                         "cached_each": [int(st.get("cached_tokens", 0)) for st in stats]})  # fmt: skip
            engine.close()
        on, off = rows[-2], rows[-1]
        on["speedup"], off["speedup"] = round(off["wall_s"] / on["wall_s"], 2), 1.0
        rows.save()
    return {"target_speedup": 5.0, "doc_tokens": s["doc_tokens"], "answer_tokens": s["answer"]}


# ---- d: lone request, against ttft_decode.json ------------------------------------------------------


def part_d(folder: Path, device: str, s: dict[str, Any], rows: Rows) -> dict[str, Any]:
    ref_file = Path(__file__).resolve().parent / "results" / "ttft_decode.json"
    ref = {r["tokens"]: r for r in json.loads(ref_file.read_text())["rows"]} if ref_file.exists() else {}
    for chunk in s["lone_chunks"]:
        engine = Engine(folder, device, max_num_batched_tokens=chunk)
        for policy in ("dense", "entropy"):
            for n in s["lengths"]:
                for _ in range(2):  # untimed, then timed (each its own prompt)
                    row = lone(engine, text(n), s["lone_new"], policy)
                row.update(max_num_batched_tokens=chunk, tokens=n)
                old = ref.get(n, {})
                old_ttft = old.get("ours_ttft_s" if policy == "dense" else "entropy_ttft_s")
                if old_ttft and not s["smoke"]:
                    row["ref_ttft_s"] = round(old_ttft, 3)
                    row["ttft_vs_ref"] = round(row["ttft_s"] / old_ttft, 3)
                if old.get("ours_decode_ms") and policy == "dense" and not s["smoke"]:
                    row["ref_decode_ms"] = round(old["ours_decode_ms"], 2)
                    row["decode_vs_ref"] = round(row["decode_ms_per_token"] / old["ours_decode_ms"], 3)
                rows.append(row)
        engine.close()
    return {"target": "within 5% of ttft_decode.json (ratio <= 1.05)", "new_tokens": s["lone_new"]}


def lone(engine: Engine, prompt: str, new: int, policy: str) -> dict[str, Any]:
    """One request alone: TTFT, and decode ms/token as its client sees it (between its first and last
    token events) beside the core's own figure (`stats["decode_ms_per_token"]`)."""
    ids = engine.llm.encode(prompt)
    t0 = time.perf_counter()
    rid = engine.submit(prompt, new, policy, ids)
    times: list[float] = []

    def on_step(now: float, events: dict[str, list[Any]]) -> None:
        times.extend(now for e in events.get(rid, []) if isinstance(e, TokenDelta))

    st = engine.run([rid], on_step)[rid].stats
    return {
        "policy": policy,
        "ttft_s": round(times[0] - t0, 3),
        "prefill_ms": round(float(st["prefill_ms"]), 1),
        "decode_ms_per_token": round((times[-1] - times[0]) * 1e3 / max(1, len(times) - 1), 2),
        "core_decode_ms": round(float(st["decode_ms_per_token"]), 2),
        "density": round(float(st.get("density", 1.0)), 3),
    }


PARTS = {
    "a": (part_a, "64 concurrent chats vs one at a time", ["mode", "requests", "output_tokens", "seconds",
          "output_tok_s", "speedup"]),
    "b": (part_b, "chat streams' inter-token latency during a long prefill", ["max_num_batched_tokens",
          "policy", "prefill_s", "density", "itl_before_p50_ms", "itl_p50_ms", "itl_p99_ms", "itl_max_ms"]),
    "c": (part_c, "a document and its questions, prefix cache on vs off", ["policy", "prefix_cache",
          "questions", "wall_s", "speedup", "prompt_tokens", "cached_tokens", "prefilled_tokens"]),
    "d": (part_d, "lone-request TTFT and decode vs ttft_decode.json", ["max_num_batched_tokens", "policy",
          "tokens", "ttft_s", "prefill_ms", "ref_ttft_s", "ttft_vs_ref", "decode_ms_per_token",
          "core_decode_ms", "ref_decode_ms", "decode_vs_ref", "density"]),
}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=sorted(PARTS), required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, tiny sizes, a temporary folder")
    ap.add_argument("--policies", nargs="+", default=["entropy", "dense"], help="parts b and c")
    ap.add_argument(
        "--gather-prefix", action="store_true",
        help="sparse chunks gather their prefix (paged_prefix_reads=False) instead of reading it in the "
        "pages (the default on CUDA): the A/B of the paged reads",
    )  # fmt: skip
    ap.add_argument(
        "--sync-decode", action="store_true",
        help="read every decode step back before the next is launched (async_decode=False): the A/B of "
        "overlapped decode",
    )  # fmt: skip
    ap.add_argument(
        "--eager-prefill", action="store_true",
        help="prefill chunks run every op eagerly (prefill_graphs=False) instead of replaying each layer's "
        "token-wise parts (shard/prefill_graphs.py, the CUDA default): the A/B of the prefill graphs",
    )  # fmt: skip
    for key, value in FULL.items():
        kind = type(value[0]) if isinstance(value, list) else type(value)
        ap.add_argument(
            f"--{key.replace('_', '-')}", type=kind, nargs="+" if isinstance(value, list) else None
        )
    args = ap.parse_args(argv)
    if args.gather_prefix:
        ENGINE_DEFAULTS["paged_prefix_reads"] = False
    if args.sync_decode:
        ENGINE_DEFAULTS["async_decode"] = False
    if args.eager_prefill:
        ENGINE_DEFAULTS["prefill_graphs"] = False
    sizes = dict(SMOKE if args.smoke else FULL)
    sizes.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})
    sizes.update(smoke=args.smoke, policies=args.policies, gather_prefix=args.gather_prefix)
    sizes.update(sync_decode=args.sync_decode, eager_prefill=args.eager_prefill)
    if args.smoke:
        os.environ["OUT"] = tempfile.mkdtemp()
    folder = write_dummy_checkpoint(tempfile.mkdtemp(), TINY if args.smoke else LLAMA)
    device = "cpu" if args.smoke else "cuda"
    fn, title, columns = PARTS[args.part]
    model = "tiny random llama (smoke)" if args.smoke else "Llama-3-8B shape, random weights, bf16"
    meta = {"env": environment(), "command": " ".join(sys.argv), "part": args.part, "sizes": sizes,
            "model": model}  # fmt: skip
    name = f"engine_serving_{args.part}" + ("_gather" if args.gather_prefix else "")
    name += "_sync" if args.sync_decode else ""
    name += "_eager" if args.eager_prefill else ""
    heading = f"Engine serving ({args.part}{', prefix gathered' if args.gather_prefix else ''}): {title}"

    def save(so_far: list[dict[str, Any]]) -> None:
        write_results(name, heading, columns, so_far, meta)

    rows = Rows(save)
    meta.update(fn(folder, device, sizes, rows))
    print(write_results(name, heading, columns, rows, meta))


if __name__ == "__main__":
    main()
