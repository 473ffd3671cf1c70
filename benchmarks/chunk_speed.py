# ruff: noqa  # a one-off GPU diagnostic, kept as run for its results (benchmarks/results/chunk_speed.md)
"""One 128k-token attention layer on a GPU: dense and causal-entropy prefill one-shot against chunks
(8192 and 2048 tokens), and the page gather the engine does per layer; results in benchmarks/results/chunk_speed.*

    python benchmarks/chunk_speed.py   # writes $OUT/chunk_speed.json
"""

import json
import os

import torch

from entropyinfer.policies.config import load_sparse_config
from entropyinfer.shard.attention import build_prefill_attention
from entropyinfer.shard.dense_attention import dense_causal_attention, dense_chunk_attention

torch.manual_seed(0)
dev = "cuda"


def timed(fn, reps=2):
    fn()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(reps):
        fn()
    ev[1].record()
    torch.cuda.synchronize()
    return round(ev[0].elapsed_time(ev[1]) / reps, 2)


res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
n = 131072
q = torch.randn(32, n, 128, device=dev, dtype=torch.bfloat16)
k = torch.randn(8, n, 128, device=dev, dtype=torch.bfloat16)
v = torch.randn_like(k)
cfg = load_sparse_config("entropy_long")
for C in (2048, 8192):
    bounds = list(range(0, n, C)) + [n]
    if C == 8192:
        res["dense_one_shot_ms"] = timed(lambda: dense_causal_attention(q, k, v))
    res[f"dense_chunked_{C}_ms"] = timed(
        lambda: [dense_chunk_attention(q[:, a:b], k[:, :b], v[:, :b], a) for a, b in zip(bounds, bounds[1:])],
        1,
    )
    res[f"dense_last_chunk_{C}_ms"] = timed(lambda: dense_chunk_attention(q[:, n - C :], k, v, n - C))

    def sparse_one():
        at = build_prefill_attention("entropy", cfg)
        at.begin(2, n)
        at(1, q, k, v)

    def sparse_chunks():
        at = build_prefill_attention("entropy", cfg)
        at.begin(2, n)
        for a, b in zip(bounds, bounds[1:]):
            at.chunk(1, q[:, a:b], k[:, :b], v[:, :b], a, n)

    if C == 8192:
        res["sparse_one_shot_ms"] = timed(sparse_one)
    res[f"sparse_chunked_{C}_ms"] = timed(sparse_chunks, 1)
    # the page gather the engine does per layer per chunk (16-token pages, 8 heads)
    pages = torch.randn(n // 16 + 1, 8, 16, 128, device=dev, dtype=torch.bfloat16)
    table = torch.arange(n // 16, device=dev)[None].expand(8, -1).contiguous()
    heads = torch.arange(8, device=dev)[:, None]
    res["gather_128k_ms"] = timed(lambda: pages[table, heads].reshape(8, -1, 128))
    print(json.dumps(res), flush=True)
print(json.dumps(res, indent=1))
open(os.path.join(os.environ["OUT"], "chunk_speed.json"), "w").write(json.dumps(res, indent=1))
