"""Where a lone request's decode time goes at one context, on one GPU (random-weight Llama-3-8B shape,
bf16, dense): the served step (`core.step()`, overlapped decode on, then off) against the replay of the
same CUDA graph with the request's own inputs (no host work), the `PagedDecoder` step on contiguous
pages (`core_decode.step_ms`), and the GPU's busy time within overlapped steps (torch.profiler).

    python benchmarks/decode_gap.py --context 32768        # H200, about 1 minute
    python benchmarks/decode_gap.py --smoke                # CPU, tiny model
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results
from core_decode import LLAMA, TINY, step_ms, sync

from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint
from entropyinfer.shard.llm import LLM
from entropyinfer.shard.sampling import SamplingParams
from entropyinfer.shard.sequence import SequenceRequest


def steps_ms(llm: LLM, steps: int, overlap: bool) -> float:
    core = llm.core
    core.overlap = overlap
    for _ in range(4):
        core.step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        core.step()
    sync()
    return (time.perf_counter() - t0) * 1e3 / steps


def replay_ms(llm: LLM, steps: int) -> float:
    """The last captured graph replayed alone (its inputs: the request's last step), CUDA events."""
    held = list(llm.core.decoder._steps.values())
    graph = held[-1].graph if held else None
    if graph is None:
        return float("nan")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    sync()
    return start.elapsed_time(end) / steps


def busy_ms(llm: LLM, steps: int) -> tuple[float, float]:
    """(wall ms per overlapped step, GPU kernel ms per step) over `steps` steps under torch.profiler."""
    if not torch.cuda.is_available():
        return float("nan"), float("nan")
    from torch.profiler import ProfilerActivity, profile

    llm.core.overlap = True
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            llm.core.step()
        sync()
        wall = (time.perf_counter() - t0) * 1e3 / steps
    gpu = sum(e.device_time_total for e in prof.key_averages()) / 1e3 / steps
    return wall, gpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.context, args.steps = 600, 4
    folder = write_dummy_checkpoint(tempfile.mkdtemp(), TINY if args.smoke else LLAMA)
    device = "cpu" if args.smoke else "cuda"
    kw: dict[str, Any] = dict(load_format="dummy", device=device, warm_up_kernels=False)
    llm = LLM(str(folder), enable_prefix_caching=False, **kw)
    core, n = llm.core, args.context - 8 * args.steps - 64
    ids = torch.randint(100, llm.arch.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=8 * args.steps + 32, ignore_eos=True)
    core.add_request(SequenceRequest("r", "", ids, params, "dense", llm.config.sparse, None))
    while not core.seqs["r"].output_ids:
        core.step()
    table = core.seqs["r"].block_table[0]
    ascending = sum(b == a + 1 for a, b in itertools.pairwise(table)) / max(1, len(table) - 1)
    row: dict[str, Any] = {"context": args.context, "pages_in_order": round(ascending, 3)}
    row["served_overlap_ms"] = round(steps_ms(llm, args.steps, True), 3)
    row["served_sync_ms"] = round(steps_ms(llm, args.steps, False), 3)
    row["graph_replay_ms"] = round(replay_ms(llm, args.steps), 3)
    wall, gpu = busy_ms(llm, args.steps)
    row["profiled_wall_ms"], row["profiled_gpu_ms"] = round(wall, 3), round(gpu, 3)
    core.abort("r")
    row["contiguous_step_ms"] = step_ms(llm, 1, args.context, args.steps, True)["step_ms"]
    print(row, flush=True)
    meta = {"env": environment(), "command": " ".join(["python", *sys.argv])}
    columns = list(row)
    print(write_results("decode_gap", "Decode: where a lone request's step time goes", columns, [row], meta))


if __name__ == "__main__":
    main()
