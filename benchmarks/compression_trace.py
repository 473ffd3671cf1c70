# ruff: noqa  # a GPU diagnostic: what the decode steps around latent KV compression of a long prompt cost
"""A lone entropy request (default latent KV compression) over a long document, decode step by step: each
step's wall ms, and the torch profiler over the steps around the compression point (GPU kernels and host
ops by time).

    python benchmarks/compression_trace.py [--smoke] [--doc 131072] [--new 12]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from engine_serving import LLAMA, TINY, Engine, Finished, text

from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint

p = argparse.ArgumentParser()
p.add_argument("--smoke", action="store_true")
p.add_argument("--doc", type=int, default=131072)
p.add_argument("--new", type=int, default=24)
a = p.parse_args()
dev = "cpu" if a.smoke else "cuda"
out = Path(os.environ.get("OUT", tempfile.mkdtemp()))
shape = TINY if a.smoke else dict(LLAMA, max_position_embeddings=131072)
folder = write_dummy_checkpoint(Path(tempfile.mkdtemp()), shape)
eng = Engine(folder, dev)
doc = 3000 if a.smoke else a.doc
eng.run([eng.submit(text(doc // 8), a.new, "entropy")])  # untimed: kernels compiled
rid = eng.submit(text(doc), a.new, "entropy")
from torch.profiler import ProfilerActivity, profile

acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
steps, prof, res, profiled = [], None, {}, False
done = False
while not done:
    seq = eng.llm.core.seqs.get(rid)
    around = seq is not None and not seq.prefilling and 14 <= seq.decode_steps <= 18  # gap: 16
    if around and prof is None and not profiled:
        prof = profile(activities=acts)
        prof.__enter__()
    t = time.perf_counter()
    now, events = eng.step([rid])
    steps.append(round((now - t) * 1e3, 2))
    if prof is not None and not around:
        prof.__exit__(None, None, None)
        ka = prof.key_averages()
        res["by_gpu"] = ka.table(
            sort_by="self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total", row_limit=30
        )
        res["by_cpu"] = ka.table(sort_by="self_cpu_time_total", row_limit=30)
        prof, profiled = None, True
    for e in events[rid]:
        if isinstance(e, Finished):
            done = True
            res["stats"] = {k: v for k, v in e.output.stats.items() if isinstance(v, (int, float, str))}
res["steps_ms"] = steps
print("steps_ms", steps, flush=True)
print(json.dumps(res.get("stats", {}), indent=0)[:1500], flush=True)
print(res.get("by_gpu", ""), res.get("by_cpu", ""), sep="\n")
(out / "compression_trace.json").write_text(json.dumps(res, indent=1))
