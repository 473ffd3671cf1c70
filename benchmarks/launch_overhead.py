# ruff: noqa  # a GPU diagnostic: the host cost of one kernel launch, Triton's launcher against torch's
"""Host microseconds per launch (no device sync inside the loop) of a trivial Triton kernel through
`kernel[grid](...)`, through its compiled kernel's `run` (the launcher alone, without Triton's binder, cache key and
global checks), and of a torch op of the same size; the step's host time during a chunked sparse prefill
is a few hundred launches per layer (benchmarks/stall_trace.py).

    python benchmarks/launch_overhead.py
"""

import json
import os
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _add(x, y, out, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(out + i, tl.load(x + i, mask=m) + tl.load(y + i, mask=m), mask=m)


def per_call_us(fn, reps=2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / reps * 1e6


x, y = torch.randn(4096, device="cuda"), torch.randn(4096, device="cuda")
z = torch.empty_like(x)
n = x.numel()
compiled = _add[(4,)](x, y, z, n, BLOCK=1024)
dev = torch.cuda.current_device()
binder = _add.device_caches[dev][4]
bound, _, _ = binder(x, y, z, n, BLOCK=1024)
vals = tuple(bound.values())
stream = torch.cuda.current_stream().cuda_stream
meta = compiled.launch_metadata((4, 1, 1), stream, *vals)


def direct():
    compiled.run(4, 1, 1, stream, compiled.function, compiled.packed_metadata, meta, None, None, *vals)


rows = {
    "triton_getitem_us": per_call_us(lambda: _add[(4,)](x, y, z, n, BLOCK=1024)),
    "triton_compiled_run_us": per_call_us(direct),
    "torch_add_out_us": per_call_us(lambda: torch.add(x, y, out=z)),
    "torch_empty_like_us": per_call_us(lambda: torch.empty_like(x)),
    "torch_view_us": per_call_us(lambda: x.view(64, 64)),
}
torch.testing.assert_close(z, x + y)
print(json.dumps({k: round(v, 2) for k, v in rows.items()}))
out = os.environ.get("OUT")
if out:
    with open(os.path.join(out, "launch_overhead.json"), "w") as f:
        json.dump(rows, f, indent=1)
