# ruff: noqa  # a GPU diagnostic: what the decode steps around latent KV compression of a long prompt cost
"""A lone entropy request (default latent KV compression) over a long document, decode step by step: each
step's wall ms, and the torch profiler over the steps around the compression point (GPU kernels and host
ops by time).

    python benchmarks/compression_trace.py [--smoke] [--doc 131072] [--new 12]
    python benchmarks/compression_trace.py --job   # part c's cached document job: each step after the
                                                   # first answer's prefill, what it ran, and a profile
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
p.add_argument("--job", action="store_true")
a = p.parse_args()
dev = "cpu" if a.smoke else "cuda"
out = Path(os.environ.get("OUT", tempfile.mkdtemp()))


def job_trace(eng: Engine, doc: int, questions: int, answer: int, dev: str, out: Path) -> None:
    """part c (prefix cache on): after an untimed smaller job, one document and its questions submitted
    together; every step's wall ms and what it ran; the profiler from the first answer's first token on."""
    from torch.profiler import ProfilerActivity, profile

    core, log = eng.llm.core, []
    schedule, compress = core.scheduler.schedule, core.executor.compress

    def logged_schedule():
        s = schedule()
        log.append(
            {"decode": len(s.decode), "prefill": [c.end - c.start for c in s.prefill], "compress_ms": []}
        )
        return s

    def timed_compress(seq, kv):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        compress(seq, kv)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        pending.append(round((time.perf_counter() - t) * 1e3, 1))

    pending: list[float] = []
    core.executor.compress = timed_compress
    for size, n in ((doc // 8, 2), (doc, questions)):
        body = text(size)
        rids = [eng.submit(f"{body}\n\nQuestion {q}: what does it say?", answer, "entropy") for q in range(n)]
        timed = size == doc
        core.scheduler.schedule = logged_schedule if timed else schedule
        left, first, prof, t0, steps = set(rids), None, None, time.perf_counter(), []
        while left:
            t = time.perf_counter()
            now, events = eng.step(list(left))
            if timed:
                log[-1]["compress_ms"], pending[:] = list(pending), []
                steps.append({"at_s": round(now - t0, 3), "ms": round((now - t) * 1e3, 1), **log[-1]})
            for rid, evs in events.items():
                if any(isinstance(e, Finished) for e in evs):
                    left.discard(rid)
            if timed and first is None and any(evs for evs in events.values()):
                first = now - t0
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
                prof = profile(activities=acts)
                prof.__enter__()
        pending[:] = []
    assert prof is not None
    prof.__exit__(None, None, None)
    ka = prof.key_averages()
    gpu = ka.table(sort_by="self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total", row_limit=25)
    cpu = ka.table(sort_by="self_cpu_time_total", row_limit=25)
    tail = [st for st in steps if st["at_s"] >= first - 0.5]
    for st in tail:
        print(st, flush=True)
    print(f"wall {time.perf_counter() - t0:.2f} s, first answer's first token {first:.2f} s", flush=True)
    print(gpu, cpu, sep="\n")
    (out / "job_trace.json").write_text(json.dumps({"steps": steps, "by_gpu": gpu, "by_cpu": cpu}, indent=1))


shape = TINY if a.smoke else dict(LLAMA, max_position_embeddings=2 * 131072 if a.job else 131072)
folder = write_dummy_checkpoint(Path(tempfile.mkdtemp()), shape)
eng = Engine(folder, dev)
doc = 3000 if a.smoke else a.doc
if a.job:
    job_trace(eng, doc, 8, 32 if not a.smoke else 4, dev, out)
    sys.exit(0)
eng.run([eng.submit(text(doc // 8), a.new, "entropy")])  # untimed: kernels compiled
rid = eng.submit(text(doc - a.new - 1), a.new, "entropy")
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
