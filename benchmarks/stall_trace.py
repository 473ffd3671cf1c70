# ruff: noqa  # a GPU diagnostic: what the slowest engine steps of part b's interference run spent time on
"""Part b's interference run (16 chat streams decoding while a long document prefills in chunks), step by
step, with what each step did besides computing: Triton compilations (names, seconds), Python garbage
collections (ms), new CUDA allocator segments (cudaMalloc) and allocator retries, and the step's host time
(until `LLM.step` returned) against its wall time (after a device sync). Prints the slowest steps.

    python benchmarks/stall_trace.py [--smoke] [--doc 131072] [--chunk 1024] [--policy entropy] [--fresh]

`--fresh` skips part b's untimed smaller document first (so first-use costs show up in the timed run).
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import triton
from engine_serving import LLAMA, TINY, Engine, TokenDelta, Finished, text

from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint

p = argparse.ArgumentParser()
p.add_argument("--smoke", action="store_true")
p.add_argument("--doc", type=int, default=131072)
p.add_argument("--chunk", type=int, nargs="+", default=[1024, 2048])
p.add_argument("--policy", default="entropy")
p.add_argument("--streams", type=int, default=16)
p.add_argument("--fresh", action="store_true")
p.add_argument(
    "--cprofile",
    type=int,
    nargs=2,
    default=None,
    metavar=("FIRST", "N"),
    help="cProfile the host side of N steps of the timed run from FIRST (printed by tottime)",
)
p.add_argument("--eager-prefill", action="store_true", help="prefill_graphs=False (shard/prefill_graphs.py)")
p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before the engine starts")
p.add_argument(
    "--profile", type=int, nargs="*", default=[], help="steps of the timed run to profile (-1: last)"
)
a = p.parse_args()
dev = "cpu" if a.smoke else "cuda"
out_dir = Path(os.environ.get("OUT", tempfile.mkdtemp()))
shape = TINY if a.smoke else dict(LLAMA, max_position_embeddings=131072)
doc_tokens = 3000 if a.smoke else a.doc
stream_prompt = 32 if a.smoke else 512
streams_n = 3 if a.smoke else a.streams

events: list[tuple[str, float]] = []  # (what, seconds) since the last step
_compile_start: dict[str, float] = {}


def _name(kw) -> str:
    consts = kw.get("compile", {}).get("constants", {})
    small = {k: v for k, v in consts.items() if isinstance(v, (int, bool))}
    return f"{getattr(kw.get('fn'), 'name', '?')} {small}"


def _before(*args, **kw):
    _compile_start[_name(kw)] = time.perf_counter()
    return None  # never skip the compilation


def _after(*args, **kw):
    name = _name(kw)
    t0 = _compile_start.pop(name, None)
    events.append((f"compile {name}", time.perf_counter() - t0 if t0 else 0.0))


triton.knobs.runtime.jit_cache_hook = _before
triton.knobs.runtime.jit_post_compile_hook = _after
_gc_start = [0.0]


def _gc(phase, info):
    if phase == "start":
        _gc_start[0] = time.perf_counter()
    else:
        events.append((f"gc gen{info.get('generation')}", time.perf_counter() - _gc_start[0]))


gc.callbacks.append(_gc)


def mem() -> tuple[int, int]:
    if dev != "cuda":
        return 0, 0
    s = torch.cuda.memory_stats()
    return int(s.get("segment.all.allocated", 0)), int(s.get("num_alloc_retries", 0))


def objects() -> list:
    """The 8 most common types among the objects the collector tracks (frozen ones excluded)."""
    import collections

    return collections.Counter(type(o).__name__ for o in gc.get_objects()).most_common(8)


def run(engine: Engine, doc: int, chunk: int, profile: set[int] = frozenset(), timed: bool = False) -> dict:
    streams = [engine.submit(text(stream_prompt), 4096 if not a.smoke else 200) for _ in range(streams_n)]
    seen: set[str] = set()
    while len(seen) < len(streams):
        _, evs = engine.step(streams)
        seen |= {r for r, e in evs.items() if any(isinstance(x, TokenDelta) for x in e)}
    for _ in range(4):
        engine.step(streams)
    prompt = text(doc)
    ids = engine.llm.encode(prompt)
    d = engine.submit(prompt, 1, a.policy, ids)
    steps = []
    profiles = {}
    cprofiles: dict = {}
    done = False
    tracked = len(gc.get_objects())
    while not done:
        events.clear()
        seg0, retry0 = mem()
        i = len(steps)
        prof = None
        seq = engine.llm.core.seqs.get(d)
        last = seq is not None and seq.prefilling and seq.num_prompt_tokens - seq.num_computed <= chunk
        if i in profile or (last and -1 in profile):
            from torch.profiler import ProfilerActivity, profile as torch_profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
            prof = torch_profile(activities=acts)
            prof.__enter__()
        if dev == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
        cp = None
        if a.cprofile and timed and a.cprofile[0] <= i < sum(a.cprofile):
            import cProfile

            cp = cprofiles.setdefault("p", cProfile.Profile())
            cp.enable()
        t0 = time.perf_counter()
        engine.llm.step()
        t_host = time.perf_counter()
        if cp is not None:
            cp.disable()
        if dev == "cuda":
            e1.record()
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        if prof is not None:
            prof.__exit__(None, None, None)
            ka = prof.key_averages()
            sort = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
            kernels_us = sum(
                e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA
            )
            profiles[i] = {
                "kernel_ms": round(kernels_us / 1e3, 2),
                "by_gpu": ka.table(sort_by=sort, row_limit=30),
                "by_cpu": ka.table(sort_by="self_cpu_time_total", row_limit=40),
            }
            prof.export_chrome_trace(str(out_dir / f"trace_chunk{chunk}_step{i}.json"))
        seg1, retry1 = mem()
        evs = {r: engine.llm.take_events(r) for r in [*streams, d]}
        done = any(isinstance(e, Finished) for e in evs[d])
        steps.append(
            {
                "ms": round((t1 - t0) * 1e3, 1),
                "host_ms": round((t_host - t0) * 1e3, 1),
                "gpu_ms": round(e0.elapsed_time(e1), 1) if dev == "cuda" else None,
                "new_segments": seg1 - seg0,
                "alloc_retries": retry1 - retry0,
                "events": [(w, round(s * 1e3, 1)) for w, s in events],
            }
        )
    if cprofiles:
        import io
        import pstats

        buf = io.StringIO()
        st = pstats.Stats(cprofiles["p"], stream=buf)
        st.sort_stats("tottime").print_stats(45)
        st.sort_stats("cumulative").print_stats(60)
        (out_dir / f"cprofile_chunk{chunk}.txt").write_text(buf.getvalue())
        print(buf.getvalue()[:6000], flush=True)
    for r in streams:
        engine.cancels[r].set()
    engine.run(streams)
    ms = sorted(s["ms"] for s in steps)
    host = sorted(s["host_ms"] for s in steps)
    gpu = sorted(s["gpu_ms"] or 0.0 for s in steps)
    slow = sorted(range(len(steps)), key=lambda i: -steps[i]["ms"])[:8]
    return {
        "chunk": chunk,
        "doc": doc,
        "steps": len(steps),
        "median_ms": ms[len(ms) // 2],
        "median_host_ms": host[len(host) // 2],
        "median_gpu_ms": gpu[len(gpu) // 2],
        "all_steps": [(s["ms"], s["host_ms"], s["gpu_ms"]) for s in steps],
        "tracked_objects": [tracked, len(gc.get_objects())],
        "top_types": objects(),
        "profiles": profiles,
        "slowest": [{"step": i, **steps[i]} for i in slow],
        "with_events": [{"step": i, **s} for i, s in enumerate(steps) if s["events"] or s["new_segments"]][
            :40
        ],
    }


folder = write_dummy_checkpoint(Path(tempfile.mkdtemp()), shape)
if a.threads:
    torch.set_num_threads(a.threads)
print(
    f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, affinity {len(os.sched_getaffinity(0))}"
)
results = []
for chunk in [256] if a.smoke else a.chunk:
    engine = Engine(
        folder, dev, max_num_batched_tokens=chunk, prefill_graphs=False if a.eager_prefill else None
    )
    if not a.fresh:
        run(engine, doc_tokens // 8, chunk)  # part b's untimed smaller document
    r = run(engine, doc_tokens, chunk, set(a.profile), timed=True)
    results.append(r)
    print(f"chunk {chunk}: {r['steps']} steps, median {r['median_ms']} ms (host {r['median_host_ms']}, "
          f"gpu {r['median_gpu_ms']}), tracked objects "
          f"{r['tracked_objects']}, {r['top_types']}", flush=True)  # fmt: skip
    for s in r["slowest"]:
        print(f"  step {s['step']}: {s['ms']} ms (host {s['host_ms']}, gpu {s['gpu_ms']}), segments "
              f"+{s['new_segments']}, retries {s['alloc_retries']}, {s['events']}", flush=True)  # fmt: skip
    for i, pr in r["profiles"].items():
        print(f"--- step {i}: kernels {pr['kernel_ms']} ms", flush=True)
        (out_dir / f"profile_chunk{chunk}_step{i}.txt").write_text(pr["by_gpu"] + "\n" + pr["by_cpu"])
    engine.close()
name = "stall_trace_eager" if a.eager_prefill else "stall_trace"
(out_dir / f"{name}.json").write_text(json.dumps(results, indent=1))
