# ruff: noqa  # a GPU diagnostic: the start-up cost of the piecewise prefill graphs
"""How long `PrefillGraphs.capture_all` takes and how much device memory it reserves, on the random-weight
Llama-3-8B shape (bf16): every set (16 .. 512 tokens, two graphs per layer each). `build_engine` runs it at start-up when the kernels are warmed up (shard/prefill_graphs.py).

    python benchmarks/prefill_graphs_capture.py
"""

import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_serving import LLAMA

from entropyinfer import LLM
from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint

f = write_dummy_checkpoint(tempfile.mkdtemp(), LLAMA)
llm = LLM(str(f), load_format="dummy", device="cuda", warm_up_kernels=False, num_kv_pages=4096)
g = llm.engine.prefill_graphs
torch.cuda.synchronize()
m0 = torch.cuda.memory_reserved()
t0 = time.perf_counter()
g.capture_all()
torch.cuda.synchronize()
seconds, mib = time.perf_counter() - t0, (torch.cuda.memory_reserved() - m0) / 2**20
print(f"capture_all: {seconds:.2f} s, sizes {sorted(g.sets)}, reserved +{mib:.0f} MiB")
out = os.environ.get("OUT")
if out:
    with open(os.path.join(out, "prefill_graphs_capture.json"), "w") as fh:
        json.dump({"seconds": seconds, "sizes": sorted(g.sets), "reserved_mib": mib}, fh, indent=1)
