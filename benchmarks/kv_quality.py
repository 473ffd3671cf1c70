"""Quality of decode-time KV compression on a real model (SmolLM2-135M-Instruct, CPU, fp32): dense against
SnapKV against latent compression at capacities 256 / 512 / 1024 tokens per KV head, on tasks whose answer
comes after generated text.

Tasks (real English text from `evaluation/corpus.py` as the haystack, 2k and 4k tokens, 5 depths):

- `passkey`: a 5-digit pass key hidden at a depth, asked in the prompt; the answer follows a decoded
  preamble ("I was asked to find the pass key ... The pass key is").
- `multikey_late`: four "secret code of the <key>" pairs at four depths (the asked one at the case's depth);
  the prompt only says that one will be asked, and *which* key is named only in the decoded preamble ("You
  asked about the secret code of the violin. ... the secret code of the violin is"): the answer depends on
  generated text that the prompt queries never saw.

The preambles are fed through the decode path token by token (teacher forcing), so they are decoded text,
exactly as if the model had written them: with N_D = 16, latent compression runs inside the preamble, after
16 decode steps, with 16 prompt queries and 16 preamble queries in its window (for `multikey_late` those
include the key's name); SnapKV compresses right after prefill with the last 32 prompt queries (the end of
the question and the chat template). Then greedy decoding until a 5-digit number is complete (at most 12
tokens). Score: the first 5-digit number equals the code. Latent here runs after the same dense prefill as
SnapKV, so that the two differ only in when they compress; `--entropy` adds the `entropy` policy itself
(entropy-sparse prefill, `entropy_short` preset, + latent).

A true two-hop needle ("the treasure is in the <room> room" + the codes of four rooms, the model naming the
room first) was tried and dropped: dense SmolLM2-135M named the right room in 2 of 5 cases at 2k tokens and
gave the right code in none, so it cannot tell compressions apart.

One dense prefill per case serves every variant (its cache and observation queries are copied); each variant
then runs the engine's own decode loop (`DecodeRunner` + `DecodeCompressor`, as `LLM.generate` does).

Run: `python benchmarks/kv_quality.py --entropy` (about 20 minutes on 2 busy CPU cores, one torch thread;
`--quick` for a few cases); writes kv_quality.{json,md} to $OUT or benchmarks/results/.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results

from entropyinfer import LLM
from entropyinfer.evaluation.corpus import real_document
from entropyinfer.policies.kv_compression import KVCompressionConfig, load_kv_compression_config
from entropyinfer.shard.attention import DensePrefill, PrefillAttention
from entropyinfer.shard.compression import DecodeCompressor, ObservationWindow
from entropyinfer.shard.engine import DecodeRunner
from entropyinfer.shard.kv_cache import KVCache
from entropyinfer.shard.sparse_attention import SparsePrefill

CODE_RE = re.compile(r"(?<!\d)\d{5}(?!\d)")
KEYS = ("violin", "harbor", "meadow", "lantern", "glacier", "orchard", "castle", "rocket")
PASSKEY_NEEDLE = " The pass key is {code}. Remember it. {code} is the pass key. "
PASSKEY_QUESTION = "What is the pass key hidden in the text?"
PASSKEY_PREAMBLE = (
    "I was asked to find the pass key that is hidden somewhere inside the long text above and to report "
    "it. The pass key is"
)
KEY_NEEDLE = " The secret code of the {key} is {code}. Remember it: the {key} has the code {code}. "
KEY_QUESTION = "I will ask you about one of the hidden secret codes. Answer with its 5-digit number."
KEY_PREAMBLE = (
    "You asked about the secret code of the {key}. Going back through the text, the secret code of the "
    "{key} is"
)
INSTRUCTION = (
    "There is important information hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about it."
)


@dataclass
class Case:
    task: str
    length: int
    depth: float
    prompt_ids: list[int]
    preamble_ids: list[int]
    expected: str
    key: str = ""


def make_case(llm: LLM, task: str, length: int, depth: float, seed: int) -> Case:
    """A prompt of about `length` tokens: real text with the needle(s) inserted at sentence boundaries."""
    rng = random.Random(seed)
    text = real_document(length + 512)
    code = str(rng.randint(10000, 99999))
    key = ""
    if task == "passkey":
        needles = [(depth, PASSKEY_NEEDLE.format(code=code))]
        question, preamble = PASSKEY_QUESTION, PASSKEY_PREAMBLE
    else:  # multikey_late: four keys; which one is asked is said only in the decoded preamble
        keys = rng.sample(KEYS, 4)
        key = keys[0]
        codes = [code] + [str(rng.randint(10000, 99999)) for _ in keys[1:]]
        others = [d for d in (0.15, 0.35, 0.55, 0.75, 0.9) if abs(d - depth) > 0.1][:3]
        needles = [
            (d, KEY_NEEDLE.format(key=k, code=c))
            for d, k, c in zip([depth, *others], keys, codes, strict=True)
        ]
        question, preamble = KEY_QUESTION, KEY_PREAMBLE.format(key=key)
    chars = int(length * 3.6)
    for _ in range(4):  # adjust the haystack to the token target
        body = text[:chars]
        for d, needle in sorted(needles, reverse=True):
            at = body.find(". ", int(len(body) * d))
            at = len(body) if at < 0 else at + 1
            body = body[:at] + needle + body[at:]
        messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{body}\n\n{question}"}]
        ids = llm.encode(messages)
        if abs(len(ids) - length) <= 32:
            break
        chars = int(chars * length / len(ids))
    pre = llm.tokenizer.encode(preamble, add_special_tokens=False)
    return Case(task, length, depth, ids, pre, code, key)


@dataclass
class Variant:
    name: str  # dense | snapkv | latent | entropy
    capacity: int | None
    cfg: KVCompressionConfig | None


def variants(capacities: list[int], entropy: bool) -> list[Variant]:
    out = [Variant("dense", None, None)]
    for method in ("snapkv", "latent") + (("entropy",) if entropy else ()):
        preset = "snapkv" if method == "snapkv" else "latent"
        for c in capacities:
            out.append(Variant(method, c, load_kv_compression_config(preset, capacity=c)))
    return out


def prefill(
    llm: LLM, case: Case, attention: PrefillAttention, room: int
) -> tuple[KVCache, ObservationWindow]:
    """Prefill the prompt; keep the last 32 prompt queries (SnapKV's window; latent uses its last 16)."""
    eng = llm.engine
    cache = eng.new_cache(1, len(case.prompt_ids) + room)
    obs = ObservationWindow(llm.arch, 1, 32, 32, eng.device, eng.dtype)
    eng.prefill(torch.tensor(case.prompt_ids), cache, 0, attention, observe=obs)
    return cache, obs


def decode(
    llm: LLM, case: Case, cache: KVCache, obs: ObservationWindow, v: Variant, head_entropy: Any, max_new: int
) -> dict[str, Any]:
    """Teacher-force the preamble, then greedy until a 5-digit number is complete, through DecodeRunner."""
    eng = llm.engine
    n = len(case.prompt_ids)
    work = KVCache(llm.arch, 1, cache.capacity, eng.device, eng.dtype)
    work.data.copy_(cache.data)
    work.lengths.copy_(cache.lengths)
    steps = len(case.preamble_ids) + max_new
    comp = None
    if v.cfg is not None:
        comp = DecodeCompressor(llm.arch, v.cfg, 1, steps, eng.device, eng.dtype)
        comp.obs.q.copy_(obs.q)  # slots W - j hold the prompt query of position n - j, in both layouts
        comp.set_head_entropy(0, head_entropy)
    runner = DecodeRunner(eng, work, steps, comp, graphs=False)
    forced = list(case.preamble_ids)
    tok, generated = forced.pop(0), []
    pos = torch.tensor([n])
    text, answer = "", None
    t0 = time.perf_counter()
    while True:
        logits = runner(torch.tensor([tok]), pos)
        pos += 1
        if forced:
            tok = forced.pop(0)
            continue
        tok = int(logits[0].argmax())
        if tok in llm.eos_token_ids:
            break
        generated.append(tok)
        text = llm.tokenizer.decode(generated, skip_special_tokens=True)
        m = CODE_RE.search(text)
        if (m and m.end() < len(text)) or len(generated) >= max_new:
            break
    m = CODE_RE.search(text)
    answer = m.group(0) if m else None
    out: dict[str, Any] = {
        "answer": answer,
        "correct": answer == case.expected,
        "text": text.strip(),
        "decode_s": time.perf_counter() - t0,
        "kv_tokens_kept": runner.cache.tokens_kept(0),
    }
    return out


def summarize(records: list[dict[str, Any]], names: list[tuple[str, int | None]]) -> list[dict[str, Any]]:
    rows = []
    for task in sorted({r["task"] for r in records}):
        for length in sorted({r["length"] for r in records if r["task"] == task}):
            for name, cap in names:
                rs = [
                    r
                    for r in records
                    if r["task"] == task
                    and r["length"] == length
                    and r["variant"] == name
                    and r["capacity"] == cap
                ]
                if not rs:
                    continue
                row = {
                    "task": task,
                    "prompt_tokens": round(sum(r["prompt_tokens"] for r in rs) / len(rs)),
                    "variant": name,
                    "capacity": cap if cap is not None else "full",
                    "correct": f"{sum(r['correct'] for r in rs)}/{len(rs)}",
                    "accuracy": sum(r["correct"] for r in rs) / len(rs),
                }
                rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--tasks", nargs="+", default=["passkey", "multikey_late"])
    ap.add_argument("--capacities", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument(
        "--entropy", action="store_true", help="also the entropy policy (entropy prefill + latent)"
    )
    ap.add_argument("--max-new", type=int, default=12)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)"
    )
    ap.add_argument("--quick", action="store_true", help="2 depths, 1 length")
    ap.add_argument("--name", default="kv_quality")
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.depths = args.lengths[:1], [0.3, 0.7]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    llm = LLM("smollm2-135m", device="cpu")
    vs = variants(args.capacities, args.entropy)
    records: list[dict[str, Any]] = []
    for length in args.lengths:
        for task in args.tasks:
            for di, depth in enumerate(args.depths):
                seed = 1000 * length + 100 * args.tasks.index(task) + di
                case = make_case(llm, task, length, depth, seed)
                steps = len(case.preamble_ids) + args.max_new
                t0 = time.perf_counter()
                cache, obs = prefill(llm, case, DensePrefill(), steps + 1)
                prefill_s = time.perf_counter() - t0
                ent_cache = ent_obs = ent_h = None
                if args.entropy:
                    sparse = SparsePrefill("entropy", llm.sparse_config)
                    ent_cache, ent_obs = prefill(llm, case, sparse, steps + 1)
                    ent_h = sparse.head_entropy(llm.arch.num_kv_heads)
                for v in vs:
                    c, o, h = (ent_cache, ent_obs, ent_h) if v.name == "entropy" else (cache, obs, None)
                    assert c is not None and o is not None
                    rec = {
                        "task": task,
                        "length": length,
                        "depth": depth,
                        "prompt_tokens": len(case.prompt_ids),
                        "expected": case.expected,
                        "variant": v.name,
                        "capacity": v.capacity,
                        "prefill_s": prefill_s,
                    }
                    rec.update(decode(llm, case, c, o, v, h, args.max_new))
                    records.append(rec)
                    print(
                        f"[{time.perf_counter() - started:6.0f}s] {task} {len(case.prompt_ids)} d={depth} "
                        f"{v.name}/{v.capacity}: {rec['answer']} ({'ok' if rec['correct'] else 'x'}, "
                        f"{case.expected}) {rec['text'][:60]!r}",
                        flush=True,
                    )
    names = [(v.name, v.capacity) for v in vs]
    rows = summarize(records, names)
    meta = {
        "env": environment(),
        "model": "SmolLM2-135M-Instruct (embedded, dequantized Q4_1), fp32, CPU",
        "threads": args.threads,
        "wall_s": time.perf_counter() - started,
        "compression": "W=32, pool avg 5, max over the GQA group; latent N_D=16; snapkv N_D=-1",
        "records": records,
    }
    cols = ["task", "prompt_tokens", "variant", "capacity", "correct", "accuracy"]
    notes = (
        "Each row: the cases of one task and length (depths "
        + ", ".join(f"{d:g}" for d in args.depths)
        + "). Preambles are teacher-forced through the decode path; latent compresses inside them (step 16), "
        "SnapKV right after prefill, both after the same dense prefill. `entropy`: entropy-sparse prefill + "
        "latent (the `entropy` policy). Capacity: tokens kept per KV head (the 32 most recent among them)."
    )
    print(write_results(args.name, "KV compression quality, SmolLM2-135M (CPU)", cols, rows, meta, notes))


if __name__ == "__main__":
    main()
