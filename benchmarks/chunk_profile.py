# ruff: noqa  # a one-off GPU diagnostic, kept as run for its results (benchmarks/results/chunk_speed.md)
"""Where a prefill chunk's time goes in the engine (GPU): one decoding stream and a 64k-token entropy document
prefilled in chunks; each engine function is wrapped in a synchronised timer (CPU launch time is exposed).

    python benchmarks/chunk_profile.py [--smoke]   # writes $OUT/chunk_profile.json
"""

import collections
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tempfile
from pathlib import Path

import torch
from engine_serving import LLAMA, TINY, Engine, text

import entropyinfer.shard.sparse_attention as A
import entropyinfer.shard.engine as E
import entropyinfer.shard.engine_core as C
from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint

smoke = "--smoke" in sys.argv
dev = "cpu" if smoke else "cuda"
T = collections.defaultdict(float)
N = collections.Counter()


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


def timed(name, fn):
    @functools.wraps(fn)
    def w(*a, **k):
        sync()
        t = time.perf_counter()
        r = fn(*a, **k)
        sync()
        T[name] += time.perf_counter() - t
        N[name] += 1
        return r

    return w


E.Engine.prefill_pages = timed("prefill_pages", E.Engine.prefill_pages)
A.SparsePrefill.chunk = timed("sparse.chunk", A.SparsePrefill.chunk)
A.SparsePrefill.state_at = timed("state_at", A.SparsePrefill.state_at)
C.EngineCore._share = timed("core._share", C.EngineCore._share)
C.EngineCore._decode = timed("core._decode", C.EngineCore._decode)
C.EngineCore._prefill = timed("core._prefill", C.EngineCore._prefill)
C.EngineCore.step = timed("core.step", C.EngineCore.step)
folder = write_dummy_checkpoint(
    Path(tempfile.mkdtemp()), TINY if smoke else dict(LLAMA, max_position_embeddings=131072)
)
doc_n = 3000 if smoke else 65536
res = {}
for chunk in [256] if smoke else [2048, 1024]:
    eng = Engine(folder, dev, max_num_batched_tokens=chunk)
    T.clear()
    N.clear()
    s = eng.submit(text(64), 4000 if not smoke else 200)
    eng.step([s])
    d = eng.submit(text(doc_n), 2, policy="entropy")
    t0 = time.perf_counter()
    gaps = []
    last = t0
    outs = eng.run([d], on_step=lambda now, ev: gaps.append(now))
    total = time.perf_counter() - t0
    g = [b - a for a, b in zip([t0] + gaps[:-1], gaps)]
    res[chunk] = {
        "doc": doc_n,
        "total_s": round(total, 3),
        "steps": len(g),
        "gap_p50_ms": round(1e3 * sorted(g)[len(g) // 2], 1),
        "gap_max_ms": round(1e3 * max(g), 1),
        "density": outs[d].stats.get("density"),
        "times_ms": {k: round(1e3 * v, 1) for k, v in T.items()},
        "calls": dict(N),
    }
    print(json.dumps(res[chunk]), flush=True)
    eng.cancels[s].set()
    eng.step([s])
    eng.close()
out = os.environ.get("OUT", "/tmp")
open(os.path.join(out, "chunk_profile.json"), "w").write(json.dumps(res, indent=1))
