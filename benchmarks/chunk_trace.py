# ruff: noqa  # a GPU diagnostic: where one engine step with a sparse prefill chunk spends its time
"""One engine step (a decoding stream + one entropy prefill chunk deep into a long document) under the torch
profiler and under CUDA sync-debug mode: GPU kernels by time, host ops by time, and every host<->device sync
with the engine frame that caused it.

    python benchmarks/chunk_trace.py [--smoke] [--doc 65536] [--chunk 2048] [--at 16] [--gather-prefix]
"""

import argparse
import collections
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from engine_serving import ENGINE_DEFAULTS, LLAMA, TINY, Engine, text

from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint

p = argparse.ArgumentParser()
p.add_argument("--smoke", action="store_true")
p.add_argument("--doc", type=int, default=65536)
p.add_argument("--chunk", type=int, default=2048)
p.add_argument("--at", type=int, default=16, help="steps before the traced one")
p.add_argument("--policy", default="entropy")
p.add_argument("--gather-prefix", action="store_true", help="sparse chunks gather the prefix (the A/B)")
a = p.parse_args()
if a.gather_prefix:
    ENGINE_DEFAULTS["paged_prefix_reads"] = False
dev = "cpu" if a.smoke else "cuda"
out = Path(os.environ.get("OUT", tempfile.mkdtemp()))
shape = TINY if a.smoke else dict(LLAMA, max_position_embeddings=131072)
doc = 3000 if a.smoke else a.doc
chunk = 512 if a.smoke else a.chunk
at = 2 if a.smoke else a.at


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


folder = write_dummy_checkpoint(Path(tempfile.mkdtemp()), shape)
eng = Engine(folder, dev, max_num_batched_tokens=chunk)
s = eng.submit(text(64), 100000 if not a.smoke else 400)
eng.step([s])
d = eng.submit(text(doc), 2, policy=a.policy)
for _ in range(at):
    eng.step([s, d])
sync()
res = {
    "doc": doc,
    "chunk": chunk,
    "at": at,
    "policy": a.policy,
    "gather_prefix": a.gather_prefix,
    "steps_ms": [],
}
for _ in range(3):
    t = time.perf_counter()
    eng.step([s, d])
    sync()
    res["steps_ms"].append(round(1e3 * (time.perf_counter() - t), 2))
print("steps_ms", res["steps_ms"], flush=True)

# 1. syncs: every warning of sync-debug mode, keyed by the innermost entropyinfer frame
syncs = collections.Counter()


def show(message, category, filename, lineno, file=None, line=None):
    frames = [f for f in traceback.extract_stack() if "entropyinfer" in f.filename or "/src/" in f.filename]
    frames = [f for f in frames if "chunk_trace" not in f.filename]
    key = " <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(frames[-4:]))
    syncs[key] += 1


if dev == "cuda":
    warnings.showwarning = show
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode(1)
    t = time.perf_counter()
    eng.step([s, d])
    torch.cuda.set_sync_debug_mode(0)
    sync()
    res["sync_step_ms"] = round(1e3 * (time.perf_counter() - t), 2)
res["syncs"] = dict(syncs.most_common())
print("syncs", json.dumps(res["syncs"], indent=1), flush=True)

# 2. the profiler over one step
from torch.profiler import ProfilerActivity, profile

acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
with profile(activities=acts) as prof:
    eng.step([s, d])
    sync()
ka = prof.key_averages()
sort = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
res["by_gpu"] = ka.table(sort_by=sort, row_limit=40)
res["by_cpu"] = ka.table(sort_by="self_cpu_time_total", row_limit=40)
print(res["by_gpu"], flush=True)
print(res["by_cpu"], flush=True)
(out / f"chunk_trace{'_gather' if a.gather_prefix else ''}.json").write_text(json.dumps(res, indent=1))
eng.cancels[s].set()
eng.step([s])
