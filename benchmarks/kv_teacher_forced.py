"""Decode-time KV compression judged where it acts: teacher-forced KL and top-1 agreement against dense over
the tokens generated after the compression point (issue 12, item 4), SmolLM2-135M-Instruct.

Per prompt (real text that does not repeat, `evaluation.corpus.unique_prose_text`, cut at a different
offset per prompt, 2k-7.8k tokens, in the chat template with "Summarize the text above in detail."):

1. Dense prefill (its last 32 queries observed), then dense greedy decoding of 4 + `--steps` tokens (EOS
   excluded from the argmax, so every prompt has the full length): the reference tokens and dense's
   log-probabilities at every step.
2. Every variant: the same prefill cache, then the engine's decode loop (`DecodeRunner` +
   `DecodeCompressor`, CUDA graphs on GPU) teacher-forced on dense's tokens. `snapkv` compresses right after
   prefill (the last 32 prompt queries), `latent` after 4 generated tokens (28 prompt + 4 generated
   queries), both W=32, avg pool 5, max over the GQA group; `+adaptive`: per-head capacities from the
   compression's own scores (the layer's Hkv*C split by the top scores over its heads, AdaKV-style, floor
   `--floor` x C); `+adaptive_layers`: the same over every head of every layer.
3. Over decode steps 5 .. 4 + steps (predicting tokens 6 .. 5 + steps; every variant has compressed by
   then): KL(dense || variant) per token (nats), top-1 agreement with dense, and the tokens kept per (layer,
   KV head) at the end (`kv_tokens_kept`: equal for the variants of one C, the bytes match).

Run (GPU, bf16, Triton decode path): `python benchmarks/kv_teacher_forced.py --out $OUT`; CPU check:
`--prompts 2 --lengths 2048 --capacities 128 --steps 40`. Writes kv_teacher_forced.{json,md}.
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
from entropyinfer.evaluation.report import markdown_table
from entropyinfer.policies.kv_compression import KVCompressionConfig, load_kv_compression_config
from entropyinfer.shard.attention import DensePrefill
from entropyinfer.shard.compression import DecodeCompressor, ObservationWindow
from entropyinfer.shard.engine import DecodeRunner
from entropyinfer.shard.kv_cache import KVCache

GAP = 4  # latent: compress after this many generated tokens
VARIANTS = ("snapkv", "latent", "latent+adaptive", "latent+adaptive_layers", "snapkv+adaptive")
QUESTION = "Summarize the text above in detail."
COLUMNS = ["capacity", "variant", "prompts", "kl", "kl_first50", "kl_last50", "top1_agree", "kv_tokens_kept"]


def make_prompts(llm: LLM, lengths: list[int]) -> list[list[int]]:
    """Chat prompts of about each length (in tokens), each cut from a different offset of the prose."""
    tokens = llm.tokenizer.encode(unique_prose_text(), add_special_tokens=False)
    out = []
    for i, n in enumerate(lengths):
        body_len = n - 40
        off = (i * 2711) % max(len(tokens) - body_len, 1)
        body = llm.tokenizer.decode(tokens[off : off + body_len])
        out.append(llm.encode([{"role": "user", "content": f"{body}\n\n{QUESTION}"}]))
    return out


def config(variant: str, capacity: int, floor: float) -> KVCompressionConfig:
    method, _, heads = variant.partition("+")
    kw: dict[str, Any] = {"capacity": capacity, "window": 32}
    if method == "latent":
        kw["gap"] = GAP
    if heads:
        kw.update(head_capacity=heads, min_head_fraction=floor)
    return load_kv_compression_config("snapkv" if method == "snapkv" else "latent", **kw)


def run(
    llm: LLM,
    cache: KVCache,
    obs: ObservationWindow,
    n: int,
    tokens: list[int],
    cfg: KVCompressionConfig | None,
) -> tuple[list[torch.Tensor], float]:
    """Teacher-forced decode of `tokens` (the first is the prefill's argmax): log-probs of every step."""
    eng = llm.engine
    work = KVCache(llm.arch, 1, cache.capacity, eng.device, eng.dtype)
    work.data.copy_(cache.data)
    work.lengths.copy_(cache.lengths)
    steps = len(tokens)
    comp = None
    if cfg is not None:
        comp = DecodeCompressor(llm.arch, cfg, 1, steps, eng.device, eng.dtype)
        comp.obs.q.copy_(obs.q)  # slot W - j holds the prompt query of position n - j in both
    runner = DecodeRunner(eng, work, steps, comp, graphs=eng.device.type == "cuda")
    pos = torch.tensor([n], device=eng.device)
    out = []
    with torch.inference_mode():
        for t in tokens:
            logits = runner(torch.tensor([t], device=eng.device), pos)
            out.append(torch.log_softmax(logits[0].float(), dim=-1))
            pos += 1
    return out, float(runner.cache.tokens_kept(0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 7800], help="min and max prompt tokens")
    ap.add_argument("--capacities", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--steps", type=int, default=200, help="measured tokens after the compression point")
    ap.add_argument("--floor", type=float, default=0.2, help="adaptive: every head keeps this part of C")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--deadline-s", type=float, default=480.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    llm = LLM("smollm2-135m", device=args.device)
    eng = llm.engine
    lo, hi = min(args.lengths), max(args.lengths)
    lengths = [round(lo + (hi - lo) * i / max(args.prompts - 1, 1)) for i in range(args.prompts)]
    prompts = make_prompts(llm, lengths)
    variants = [v for v in args.variants.split(",") if v]
    banned = torch.tensor(sorted(llm.eos_token_ids), device=eng.device)
    total = GAP + 1 + args.steps  # tokens fed: the prefill's argmax, then one per step
    records: list[dict[str, Any]] = []
    meta = {
        "env": environment(),
        "command": " ".join(["python", *sys.argv]),
        "device": args.device,
        "dtype": str(llm.dtype),
        "gap": GAP,
        "steps": args.steps,
        "floor": args.floor,
    }

    def save(complete: bool) -> None:
        rows = summarize(records)
        meta.update(seconds=round(time.perf_counter() - t0, 1), complete=complete)
        (out_dir / "kv_teacher_forced.json").write_text(
            json.dumps({"meta": meta, "rows": rows, "records": records}, indent=1) + "\n"
        )
        (out_dir / "kv_teacher_forced.md").write_text(report(meta, rows, len(prompts)))

    for pi, ids in enumerate(prompts):
        if time.perf_counter() - t0 > args.deadline_s:
            break
        n = len(ids)
        cache = eng.new_cache(1, n + total + 1)
        obs = ObservationWindow(llm.arch, 1, 32, 32, eng.device, eng.dtype)
        with torch.inference_mode():
            logits = eng.prefill(torch.tensor(ids), cache, 0, DensePrefill(), observe=obs)
            logits = logits.reshape(-1, logits.shape[-1])[-1].float()
        # dense greedy reference (EOS banned), then its log-probs teacher-forced through the same loop
        tokens = []
        work = KVCache(llm.arch, 1, cache.capacity, eng.device, eng.dtype)
        work.data.copy_(cache.data)
        work.lengths.copy_(cache.lengths)
        runner = DecodeRunner(eng, work, total, None, graphs=eng.device.type == "cuda")
        pos = torch.tensor([n], device=eng.device)
        dense_lp = []
        with torch.inference_mode():
            for _ in range(total):
                tokens.append(int(logits.index_fill(0, banned, float("-inf")).argmax()))
                logits = runner(torch.tensor([tokens[-1]], device=eng.device), pos)[0].float()
                dense_lp.append(torch.log_softmax(logits, dim=-1))
                pos += 1
        del work, runner
        measured = slice(GAP + 1, total)  # decode steps 5 .. 4 + steps (0-based step index 4 ..)
        ref = torch.stack(dense_lp[measured])
        for c in args.capacities:
            for v in variants:
                lp, kept = run(llm, cache, obs, n, tokens, config(v, c, args.floor))
                got = torch.stack(lp[measured])
                kl = (ref.exp() * (ref - got)).sum(-1)
                agree = (got.argmax(-1) == ref.argmax(-1)).float()
                records.append({"prompt": pi, "tokens": n, "capacity": c, "variant": v,
                                "kl": float(kl.mean()), "kl_first50": float(kl[:50].mean()),
                                "kl_last50": float(kl[-50:].mean()), "top1_agree": float(agree.mean()),
                                "kv_tokens_kept": kept})  # fmt: skip
                print(json.dumps(records[-1]), flush=True)
        del cache
        save(False)
    save(len({r["prompt"] for r in records}) == len(prompts))
    print((out_dir / "kv_teacher_forced.md").read_text())


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for c in sorted({r["capacity"] for r in records}):
        for v in dict.fromkeys(r["variant"] for r in records):
            rs = [r for r in records if r["capacity"] == c and r["variant"] == v]
            if rs:
                mean = {k: sum(r[k] for r in rs) / len(rs) for k in COLUMNS[3:]}
                rows.append({"capacity": c, "variant": v, "prompts": len(rs), **mean})
    return rows


def report(meta: dict[str, Any], rows: list[dict[str, Any]], planned: int) -> str:
    env = ", ".join(f"{k}: {v}" for k, v in meta["env"].items() if v is not None)
    return (
        "# KV compression, teacher-forced KL and top-1 against dense after the compression point: "
        "SmolLM2-135M-Instruct\n\n"
        f"{env}\ndevice {meta['device']}, {meta['dtype']}; run: `{meta['command']}`; "
        f"{meta['seconds']} s, {'complete' if meta['complete'] else 'PARTIAL'} "
        f"({planned} prompts planned).\n\n"
        f"Over the {meta['steps']} decode steps after latent's compression point (after {meta['gap']} "
        "generated tokens; SnapKV compresses after prefill): KL(dense || variant) per token (nats), "
        "top-1 agreement with dense; `kv_tokens_kept`: tokens per (layer, KV head) at the end, mean over "
        f"prompts. Adaptive floor: {meta['floor']} x C.\n\n" + markdown_table(COLUMNS, rows) + "\n"
    )


if __name__ == "__main__":
    main()
