"""Decode with latent KV compression (GPU): ms/token dense vs compressed, KV bytes, memory, end to end.

Random-weight Llama-3-8B shape (32 layers, 32 query / 8 KV heads, d=128), bf16, one GPU, one run (about
2-3 minutes on an H200):

1. Decode ms/token at 32k and 128k context, batch 1 and 8 (batch 8 at 32k only: 128k x 8 sequences of KV
   is 137 GB, more than an H200 holds next to the weights), all CUDA-graph captured: the full cache (dense)
   against compact caches of C = 1024 and 2048 tokens per KV head. The caches hold random K/V (decode speed
   does not depend on the values); compression runs on them for real (SnapKV scoring with random window
   queries: the same work as latent), and torch.cuda.memory_allocated is read before and after it (the full
   cache is released). transformers' decode (eager, SDPA, DynamicCache) at batch 1, after its own prefill.
2. End to end, a 128k-token random prompt + 256 generated tokens, batch 1, greedy, one host sync per token
   (as the LLM API), each of our variants timed after one untimed run of itself: this engine's dense path;
   the `entropy` policy (entropy-sparse prefill with the `entropy_long` preset + latent compression with
   `configs/latent.yaml`: W=32, N_D=16, C=1024); transformers.

Targets (issue 5): <= 8 ms/token at 128k with compression; end to end >= 3x transformers and >= 2.39x this
engine's dense path.

Run: `python benchmarks/decode_compressed.py` (options: --contexts, --skip-hf, --skip-e2e); writes
decode_compressed.{json,md} to $OUT (device machine) or benchmarks/results/, after every part.
`--smoke` runs the same code on the CPU with a tiny model and short contexts (eager steps instead of CUDA
graphs, wall-clock timing), to check the script without a GPU; it writes decode_compressed_smoke.* to $OUT
or a temporary folder (never into the repository).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLAMA3_8B, cuda_time, decode_ms, environment, markdown_table, wall_time, write_results

from entropyinfer.policies.config import load_sparse_config
from entropyinfer.policies.kv_compression import KVCompressionConfig, load_kv_compression_config
from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.attention import DensePrefill, PrefillAttention
from entropyinfer.shard.compression import DecodeCompressor
from entropyinfer.shard.config import EngineConfig
from entropyinfer.shard.engine import DecodeRunner, Engine
from entropyinfer.shard.kv_cache import CompactKVCache, KVCache
from entropyinfer.shard.sparse_attention import SparsePrefill
from entropyinfer.shard.sparse_warm_up import warm_up_sparse_prefill
from entropyinfer.shard.weights import model_from_state_dict

GB = 1e9
DEV = torch.device("cuda")
SMOKE_MODEL = dict(
    LLAMA3_8B,
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=8192,
)
DECODE_COLS = [
    "context",
    "batch",
    "variant",
    "decode_ms",
    "kv_gb_per_seq",
    "buffer_gb",
    "compression_ms",
    "mem_before_gb",
    "mem_after_gb",
    "vs_dense",
]
E2E_COLS = [
    "variant",
    "total_s",
    "prefill_s",
    "decode_ms",
    "compression_ms",
    "kv_gb_before",
    "kv_gb_after",
    "mem_before_gb",
    "mem_after_gb",
    "speedup_vs_ours_dense",
    "speedup_vs_hf",
]


def build_models(shape: dict[str, Any], dtype: torch.dtype) -> tuple[Any, Engine]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**shape)
    torch.manual_seed(0)
    with DEV:
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    arch = ModelArch.from_hf_config(cfg.to_dict())
    ours = model_from_state_dict(arch, hf.state_dict(), DEV, dtype)
    return hf, Engine(ours, EngineConfig(prefill_chunk_size=8192))


SPARSE_PRESET = "entropy_long"


def entropy_prefill() -> SparsePrefill:
    return SparsePrefill("entropy", load_sparse_config(SPARSE_PRESET))


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Any) -> float:
    """Median ms of fn: CUDA events on the GPU, wall clock on the CPU."""
    return cuda_time(fn) if DEV.type == "cuda" else wall_time(fn)


def free() -> None:
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- decode
def random_cache(engine: Engine, batch: int, context: int, room: int) -> KVCache:
    cache = engine.new_cache(batch, context + room)
    cache.data.normal_()
    cache.lengths.fill_(context)
    return cache


def time_decode(engine: Engine, cache: KVCache | CompactKVCache, context: int, steps: int) -> float:
    tokens = torch.randint(0, engine.arch.vocab_size, (cache.batch,), device=DEV)
    positions = torch.full((cache.batch,), context, dtype=torch.long, device=DEV)
    return decode_ms(engine, cache, tokens, positions, steps)


def decode_row(engine: Engine, context: int, batch: int, capacity: int | None, steps: int) -> dict[str, Any]:
    room = 2 * steps
    row: dict[str, Any] = {
        "context": context,
        "batch": batch,
        "variant": f"C={capacity}" if capacity else "dense",
    }
    cache: KVCache | CompactKVCache = random_cache(engine, batch, context, room)
    if capacity is not None:
        cfg = load_kv_compression_config("snapkv", capacity=capacity)
        comp = DecodeCompressor(engine.arch, cfg, batch, room, engine.device, engine.dtype)
        comp.obs.q.normal_()
        cache = comp.run(cache, 0)  # scores, selects, gathers into a compact buffer, releases the full cache
        row["compression_ms"] = comp.compression_ms
        if comp.cuda_memory is not None:
            row["mem_before_gb"], row["mem_after_gb"] = (m / GB for m in comp.cuda_memory)
    row["kv_gb_per_seq"] = cache.bytes_used(0) / GB
    row["buffer_gb"] = cache.nbytes / GB
    row["decode_ms"] = time_decode(engine, cache, context, steps)
    return row


@torch.inference_mode()
def hf_decode_ms(hf: Any, context: int, steps: int) -> float:
    tokens = torch.randint(0, hf.config.vocab_size, (1, context), device=DEV)
    out = hf(tokens, use_cache=True, logits_to_keep=1)
    pkv, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    del out

    def step() -> None:
        nonlocal tok
        tok = hf(tok, past_key_values=pkv, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)

    step()
    return timed(lambda: [step() for _ in range(steps)]) / steps


# ----------------------------------------------------------------------------------------- end to end
def e2e_ours(
    engine: Engine,
    prompt: torch.Tensor,
    new_tokens: int,
    attention: PrefillAttention,
    kv_cfg: KVCompressionConfig | None,
) -> dict[str, Any]:
    """Prefill + `new_tokens` greedy tokens, the LLM API's decode loop (DecodeRunner), one sync per token."""
    n = prompt.shape[0]
    sync()
    t0 = time.perf_counter()
    cache = engine.new_cache(1, n + new_tokens)
    comp = None
    if kv_cfg is not None:
        comp = DecodeCompressor(engine.arch, kv_cfg, 1, new_tokens - 1, engine.device, engine.dtype)
    logits = engine.prefill(prompt, cache, 0, attention, observe=comp.obs if comp is not None else None)
    if comp is not None and isinstance(attention, SparsePrefill):
        comp.set_head_entropy(0, attention.head_entropy(engine.arch.num_kv_heads))
    tok = logits.argmax().view(1)
    generated = [int(tok)]
    t_prefill = time.perf_counter()
    kv_before = cache.bytes_used(0)
    runner = DecodeRunner(engine, cache, new_tokens - 1, comp, graphs=True, min_graph_steps=8)
    del cache, logits
    positions = torch.tensor([n], device=DEV)
    for _ in range(new_tokens - 1):
        tok = runner(tok, positions).argmax(-1)
        generated.append(int(tok))  # a host sync per token, as the LLM API (stop checks, streaming)
        positions += 1
    sync()
    t1 = time.perf_counter()
    decode_s = t1 - t_prefill - runner.paused_s
    row: dict[str, Any] = {
        "total_s": t1 - t0,
        "prefill_s": t_prefill - t0,
        "decode_ms": decode_s * 1e3 / (new_tokens - 1),
        "kv_gb_before": kv_before / GB,
        "kv_gb_after": runner.cache.bytes_used(0) / GB,
        "generated": len(generated),
    }
    if comp is not None:
        row["compression_ms"] = comp.compression_ms
        if comp.cuda_memory is not None:
            row["mem_before_gb"], row["mem_after_gb"] = (m / GB for m in comp.cuda_memory)
    if isinstance(attention, SparsePrefill):
        row["density"] = attention.stats()["density"]
    del runner
    return row


@torch.inference_mode()
def e2e_hf(hf: Any, prompt: torch.Tensor, new_tokens: int) -> dict[str, Any]:
    sync()
    t0 = time.perf_counter()
    out = hf(prompt[None], use_cache=True, logits_to_keep=1)
    pkv, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    del out
    generated = [int(tok)]
    t_prefill = time.perf_counter()
    for _ in range(new_tokens - 1):
        tok = hf(tok, past_key_values=pkv, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        generated.append(int(tok))
    sync()
    t1 = time.perf_counter()
    del pkv
    return {
        "total_s": t1 - t0,
        "prefill_s": t_prefill - t0,
        "decode_ms": (t1 - t_prefill) * 1e3 / (new_tokens - 1),
        "generated": len(generated),
    }


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--capacities", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--batch8-max-context", type=int, default=32768, help="batch 8 only up to this context")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--hf-decode-steps", type=int, default=16)
    ap.add_argument("--e2e-prompt", type=int, default=131072)
    ap.add_argument("--e2e-new-tokens", type=int, default=256)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, short contexts: checks the script")
    args = ap.parse_args()
    started = time.perf_counter()
    global DEV, SPARSE_PRESET
    name, warm, kv = "decode_compressed", 16384, {}
    if args.smoke:
        DEV, SPARSE_PRESET, name, warm = torch.device("cpu"), "entropy_short", "decode_compressed_smoke", 1024
        if not os.environ.get("OUT"):  # smoke results are not results: keep them out of the repository
            os.environ["OUT"] = tempfile.mkdtemp(prefix="decode_compressed_smoke_")
        args.contexts, args.capacities, args.batch8_max_context = [512, 1536], [64, 128], 512
        args.decode_steps, args.hf_decode_steps, args.e2e_prompt, args.e2e_new_tokens = 4, 2, 1536, 40
        kv = {"capacity": 128}
    hf, engine = build_models(
        SMOKE_MODEL if args.smoke else LLAMA3_8B, torch.float32 if args.smoke else torch.bfloat16
    )
    vocab = engine.arch.vocab_size
    meta: dict[str, Any] = {
        "env": environment(),
        "model": "tiny Llama, fp32, CPU (smoke)" if args.smoke else "Llama-3-8B shape, random weights, bf16",
        "decode": "CUDA graphs; random K/V in the caches; compressed = SnapKV-scored compact cache (W=32, "
        "pool avg 5, max over the GQA group), compression time and torch.cuda.memory_allocated around it",
        "e2e": f"{args.e2e_prompt}-token random prompt + {args.e2e_new_tokens} greedy tokens, batch 1",
        "entropy": "entropy_long prefill preset + configs/latent.yaml (W=32, N_D=16, C=1024)",
        "hf": "transformers eager, attn_implementation=sdpa, DynamicCache",
        "targets": "<= 8 ms/token at 128k compressed; e2e >= 3x transformers, >= 2.39x ours dense",
    }
    decode_rows: list[dict[str, Any]] = []
    e2e_rows: list[dict[str, Any]] = []

    def save() -> None:
        meta["wall_s"] = time.perf_counter() - started
        notes = "## End to end\n\n" + markdown_table(E2E_COLS, e2e_rows) if e2e_rows else ""
        meta["e2e_rows"] = e2e_rows
        print(
            write_results(
                name,
                "Decode with latent KV compression, Llama-3-8B shape (random weights)",
                DECODE_COLS,
                decode_rows,
                meta,
                notes,
            ),
            flush=True,
        )

    # warm-up: Triton kernels (decode, sparse prefill, scoring) and the compression ops, on small shapes
    decode_row(engine, min(4096, warm), 1, None, 4)
    decode_row(engine, min(4096, warm), 1, args.capacities[0], 4)
    # as many new tokens as the timed run: the same compact-buffer shape, no Triton re-specialization
    e2e_ours(engine, torch.randint(0, vocab, (warm,), device=DEV), args.e2e_new_tokens, DensePrefill(), None)
    e2e_ours(
        engine,
        torch.randint(0, vocab, (warm,), device=DEV),
        args.e2e_new_tokens,
        entropy_prefill(),
        load_kv_compression_config("latent", **kv),
    )
    a = engine.arch  # as LLM does when it loads: compile the sparse kernels for every size class
    warm_up_sparse_prefill(
        load_sparse_config(SPARSE_PRESET), a.num_heads, a.num_kv_heads, a.head_dim, a.max_position_embeddings,
        engine.device, engine.dtype,
    )  # fmt: skip
    if not args.skip_hf:
        hf_decode_ms(hf, 1024, 2)  # the first call pays one-time costs
    free()
    print(f"warm-up done at {time.perf_counter() - started:.0f} s", flush=True)

    # 1. decode matrix
    for context in args.contexts:
        for batch in (1, 8):
            if batch > 1 and context > args.batch8_max_context:
                continue
            dense_ms = None
            for capacity in [None, *args.capacities]:
                try:
                    row = decode_row(engine, context, batch, capacity, args.decode_steps)
                    if capacity is None:
                        dense_ms = row["decode_ms"]
                    elif dense_ms is not None:
                        row["vs_dense"] = dense_ms / row["decode_ms"]
                except Exception:
                    row = {
                        "context": context,
                        "batch": batch,
                        "variant": f"C={capacity}" if capacity else "dense",
                    }
                    row["error"] = traceback.format_exc(limit=3)
                    print(row["error"], flush=True)
                decode_rows.append(row)
                print(row, flush=True)
                free()
            from_e2e = not args.skip_e2e and context == args.e2e_prompt
            if batch == 1 and not args.skip_hf and not from_e2e:
                try:
                    row = {"context": context, "batch": 1, "variant": "transformers"}
                    row["decode_ms"] = hf_decode_ms(hf, context, args.hf_decode_steps)
                    row["kv_gb_per_seq"] = context * engine.arch.kv_bytes_per_token(2) / GB
                except Exception:
                    row["error"] = traceback.format_exc(limit=3)
                    print(row["error"], flush=True)
                decode_rows.append(row)
                print(row, flush=True)
                free()
    save()

    # 2. end to end
    if not args.skip_e2e:
        prompt = torch.randint(0, vocab, (args.e2e_prompt,), device=DEV)
        new = args.e2e_new_tokens
        latent = load_kv_compression_config("latent", **kv)
        runs: list[tuple[str, Any]] = [
            ("entropy+latent", lambda: e2e_ours(engine, prompt, new, entropy_prefill(), latent)),
            ("ours dense", lambda: e2e_ours(engine, prompt, new, DensePrefill(), None)),
        ]
        if not args.skip_hf:
            runs.append(("transformers", lambda: e2e_hf(hf, prompt, args.e2e_new_tokens)))
        for variant, fn in runs:
            row = {"variant": variant}
            try:
                if variant != "transformers":  # an untimed run at this length first (allocator, caches)
                    fn()
                    free()
                row.update(fn())
            except Exception:
                row["error"] = traceback.format_exc(limit=3)
                print(row["error"], flush=True)
            e2e_rows.append(row)
            print(row, flush=True)
            free()
        hf_row = next((r for r in e2e_rows if r["variant"] == "transformers" and "decode_ms" in r), None)
        if hf_row is not None and args.e2e_prompt in args.contexts:
            row = {
                "context": args.e2e_prompt,
                "batch": 1,
                "variant": "transformers",
                "decode_ms": hf_row["decode_ms"],
            }
            row["kv_gb_per_seq"] = args.e2e_prompt * engine.arch.kv_bytes_per_token(2) / GB
            row["note"] = "from the end-to-end run (mean over its decode steps)"
            decode_rows.append(row)
        by = {r["variant"]: r.get("total_s") for r in e2e_rows}
        for r in e2e_rows:
            if r.get("total_s"):
                if by.get("ours dense"):
                    r["speedup_vs_ours_dense"] = by["ours dense"] / r["total_s"]
                if by.get("transformers"):
                    r["speedup_vs_hf"] = by["transformers"] / r["total_s"]
    save()


if __name__ == "__main__":
    main()
