"""Decode ms/token through the engine core on one GPU, CUDA graphs on and off: random-weight Llama-3-8B
shape, bf16, dense, for each ``BxN`` of `--configs` (B concurrent sequences decoding at a context just under
N tokens). Compared with `ttft_decode.json` (the pre-core path: one contiguous cache, a CUDA-graph decode
step; batch 1 only): target within 5%.

Each configuration adds B requests of N - 80 random token ids to `EngineCore`, steps the core until every
one has its first token (prefill), runs `--warm` steps (the first captures the graph of its (padded batch,
table width)), then times `--new` steps of ``core.step()`` (scheduler, one batched decode of all B, sampling,
detokenization), synchronised, and aborts the requests (their pages return). ms/token = ms per step (each
step gives every sequence one token). Contexts stay below N, so the table width (a power of two of pages)
does not change during the timed steps. Batch 32 x 128k does not fit one H200 (16 GiB of KV per 128k
sequence), hence the default mix.

    python benchmarks/core_decode.py                # H200, about 4 minutes
    python benchmarks/core_decode.py --smoke        # CPU, tiny model
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLAMA3_8B, environment, write_results

from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint
from entropyinfer.shard.llm import LLM
from entropyinfer.shard.paged_decode import PagedDecoder
from entropyinfer.shard.sampling import SamplingParams
from entropyinfer.shard.sequence import SequenceRequest

LLAMA = dict(LLAMA3_8B, model_type="llama", architectures=["LlamaForCausalLM"])
TINY = dict(LLAMA, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=4096)  # fmt: skip
RESULTS = Path(__file__).resolve().parent / "results"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_ms(
    llm: LLM, batch: int, context: int, warm: int, new: int, graphs: bool, host_profile: bool = False
) -> dict[str, Any]:
    core = llm.core
    core.decoder.graphs = graphs and torch.cuda.is_available()
    # contexts stay below `context` while the first sequences decode during the others' chunked prefill
    chunks = -(-batch * context // llm.config.engine.max_num_batched_tokens)
    n = context - warm - new - chunks - batch - 16
    gen = torch.Generator().manual_seed(context + batch)
    params = SamplingParams(max_tokens=min(4096, llm.max_context - n), ignore_eos=True)
    rids = [f"b{batch}-n{context}-g{int(graphs)}-{i}" for i in range(batch)]
    for rid in rids:
        ids = torch.randint(100, llm.arch.vocab_size, (n,), generator=gen).tolist()
        core.add_request(SequenceRequest(rid, "", ids, params, "dense", llm.config.sparse, None))
    t0 = time.perf_counter()
    while any(not core.seqs[r].output_ids for r in rids):
        core.step()
    prefill_s = time.perf_counter() - t0
    for _ in range(warm):
        core.step()
    decode, spent = core.executor.decode, [0.0]

    def timed(*a: Any) -> torch.Tensor:  # the decoder's share of a step (synchronised)
        t = time.perf_counter()
        logits = decode(*a)
        sync()
        spent[0] += time.perf_counter() - t
        return logits

    core.executor.decode = timed  # type: ignore[method-assign]
    before = [len(core.seqs[r].output_ids) for r in rids]
    sync()
    t0 = time.perf_counter()
    profiler = cProfile.Profile() if host_profile else None
    if profiler is not None:
        profiler.enable()
    for _ in range(new):
        core.step()
    sync()
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(40)
    ms = (time.perf_counter() - t0) * 1e3 / new
    core.executor.decode = decode  # type: ignore[method-assign]
    made = [len(core.seqs[r].output_ids) - k for r, k in zip(rids, before, strict=True)]
    assert made == [new] * batch, f"every sequence decodes once per step, got {made}"
    graphed = core.decoder.graphs and bool(core.decoder.graph_keys)
    for rid in rids:
        core.abort(rid)
    return {
        "batch": batch,
        "context": context,
        "cuda_graphs": graphed,
        "decode_ms_per_token": round(ms, 2),
        "decoder_ms": round(spent[0] * 1e3 / new, 2),
        "host_ms": round(ms - spent[0] * 1e3 / new, 2),
        "prefill_s": round(prefill_s, 2),
    }


def step_ms(llm: LLM, batch: int, context: int, steps: int, graphs: bool) -> dict[str, Any]:
    """The decode step alone (`PagedDecoder` on the core's page pool, no scheduler, no prefill: B sequences
    given pages for `context` tokens of zero KV): ms per step, CUDA events over `steps` replays."""
    core, dev = llm.core, llm.engine.device
    decoder = PagedDecoder(llm.engine, core.pages, core.obs, graphs=graphs)
    per_seq = -(-context // core.pages.page_size)  # page ids handed out by hand: run before any request
    ids = torch.arange(batch * per_seq, dtype=torch.int32, device=dev).view(batch, 1, per_seq)
    tables = ids.expand(batch, llm.arch.num_kv_heads, per_seq).contiguous()
    n = context - 64
    lengths = torch.full(
        (llm.arch.num_layers, batch, llm.arch.num_kv_heads), n, dtype=torch.int32, device=dev
    )
    tokens = torch.zeros(batch, dtype=torch.long, device=dev)
    positions = torch.full((batch,), n, dtype=torch.long, device=dev)
    for _ in range(3):
        decoder(tokens, positions, tables, lengths)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        decoder(tokens, positions, tables, lengths)
    sync()
    ms = (time.perf_counter() - t0) * 1e3 / steps
    graphed = bool(decoder.graph_keys)
    return {"batch": batch, "context": context, "cuda_graphs": graphed, "step_ms": round(ms, 2)}


def profile_step(llm: LLM, batch: int, context: int, steps: int = 10) -> str:
    """torch.profiler's CUDA kernels of `steps` decode steps without graphs (`step_ms`'s inputs): where a
    step's GPU time goes, kernel by kernel (the graph replays the same kernels)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        step_ms(llm, batch, context, steps, graphs=False)
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return str(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))


def pre_core(context: int) -> float | None:
    """Decode ms/token of `ttft_decode.json` (batch 1, contiguous cache, CUDA graph) at this context."""
    path = RESULTS / "ttft_decode.json"
    if not path.exists():
        return None
    rows = {r["tokens"]: r["ours_decode_ms"] for r in json.loads(path.read_text())["rows"]}
    return rows.get(context)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["1x32768", "8x32768", "32x8192", "1x131072"])
    ap.add_argument("--warm", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument(
        "--profile", action="store_true", help="print the first config's kernels (10 steps, no graphs)"
    )
    ap.add_argument(
        "--host-profile", action="store_true", help="print cProfile of the first config's timed core steps"
    )
    args = ap.parse_args()
    if args.smoke:
        args.configs, args.warm, args.new = ["1x600", "3x300"], 2, 4
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs]
    folder = write_dummy_checkpoint(tempfile.mkdtemp(), TINY if args.smoke else LLAMA)
    device = "cpu" if args.smoke else "cuda"
    most = max(b for b, _ in configs)
    # prefix cache off: graphs on and off run the same prompts
    kw = dict(load_format="dummy", device=device, warm_up_kernels=False, enable_prefix_caching=False)
    llm = LLM(str(folder), max_num_seqs=max(most, 32), **kw)  # type: ignore[arg-type]
    if args.profile:
        print(profile_step(llm, *configs[0]), flush=True)
    alone = {(b, n, g): step_ms(llm, b, n, args.new, g)["step_ms"] for b, n in configs for g in (True, False)}
    columns = ["batch", "context", "cuda_graphs", "decode_ms_per_token", "decoder_ms", "host_ms", "step_ms",
               "pre_core_ms", "vs_pre_core", "prefill_s"]  # fmt: skip
    meta = {
        "env": environment(),
        "command": " ".join(["python", *sys.argv]),
        "warm": args.warm,
        "new": args.new,
    }
    notes = (
        "decode_ms_per_token: ms per `core.step()` with every sequence decoding (mean over the timed "
        f"steps, {args.new} after {args.warm} warm ones). pre_core_ms: `ttft_decode.json`'s CUDA-graph "
        "decode at that context (batch 1, contiguous cache); vs_pre_core = decode_ms_per_token / "
        "pre_core_ms (target <= 1.05). step_ms: the `PagedDecoder` step alone on the same pool (no "
        f"scheduler, sampling or detokenization; graphs as in cuda_graphs), mean of {args.new} steps. "
        "decoder_ms: the core's call of the decoder within a step (synchronised), host_ms: the rest of the "
        "step (scheduler, input tensors, sampling, detokenization). "
        f"Command: `{meta['command']}`."
    )
    title = "Engine core: decode ms/token, CUDA graphs on and off"
    rows: list[dict[str, Any]] = []
    for batch, context in configs:
        for graphs in (True, False):
            first = args.host_profile and graphs and not rows
            row = decode_ms(llm, batch, context, args.warm, args.new, graphs, first)
            row["step_ms"] = alone[batch, context, graphs]
            before = pre_core(context) if batch == 1 else None
            row["pre_core_ms"] = round(before, 2) if before else None
            row["vs_pre_core"] = round(row["decode_ms_per_token"] / before, 3) if before else None
            rows.append(row)
            print(row, flush=True)
            table = write_results("core_decode", title, columns, rows, meta, notes)  # after every row
    print(table)


if __name__ == "__main__":
    main()
