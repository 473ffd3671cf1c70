"""Compile every Triton kernel under `kernels/` for an H200 (sm_90) on a machine without a GPU.

Run by `test_sm90_compile.py` as a process of its own, or by hand::

    env -u TRITON_INTERPRET .venv/bin/python tests/kernels/sm90_compile.py [--json out.json] [--jobs N]

It must run without ``TRITON_INTERPRET`` (under it ``@triton.jit`` makes interpreted kernels, which never
compile; pytest's conftest sets it), and with a fresh ``TRITON_CACHE_DIR`` it really compiles.

How the launches are found: the real wrappers (`rms_norm`, `block_scores`, ...,
`paged_sparse_prefill_attention`)
run on CPU tensors with ``backend="triton"`` in the shapes production passes (`cases` below: the embedded
SmolLM2's and a Llama-8B-like model's heads and widths, the policy presets' segment and block sizes, page
sizes, dtypes), with the choices they make for CUDA tensors forced: `jit_kernel` hands back the kernel as
imported (compiled, not interpreted), `sm_count` is an H200's 132 SMs, `scoring_tiles` / `select_tiles`
pick their GPU tiles, and Triton's active driver is a stand-in for an H200 (target ``cuda:90``, warp 32)
that never launches anything. So the argument types, pointer alignments, integer specialisations,
constexprs, warps and stages are the wrapper's own. Every launch stops at Triton's ``jit_cache_hook``, which
records its specialisation and skips it (the wrappers' outputs are left unwritten, which they never read);
then each distinct one is compiled to a cubin through `JITFunction.preload` (the path a real launch's compile
takes), several at a time, and its shared memory is checked against an H200's 227 KiB a block
(``cudaDevAttrMaxSharedMemoryPerBlockOptin`` = 232448 bytes, what Triton checks at load).

When a launch in `kernels/` changes shape (a new constexpr, a new tile rule), the wrappers' own code paths
carry it here; a new wrapper or a new production shape needs a line in `cases`.

Exit status: 0 when everything compiled and fits, 1 otherwise, 3 when this machine cannot compile for
sm_90 at all (no CUDA backend or no ``ptxas`` in Triton's install): the line ``SKIP: <reason>`` says why.
"""

# ruff: noqa: B023 - each case runs right after its inputs are made (`cases`), so late binding is wanted

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported (torch does not import it)

import argparse
import functools
import importlib
import json
import pkgutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

H200_SMS = 132
H200_MAX_SHARED = 232448  # bytes a block may use (opt-in maximum of sm_90: 227 KiB)
SKIP_STATUS = 3


# ----------------------------------------------------------------------------------------------------
# an H200 that never runs anything


class H200Driver:
    """Triton's active driver for compiling only: the target and device ids a launch asks for."""

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def is_active(self) -> bool:
        return True

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def sm90_unavailable() -> str | None:
    """Why this machine cannot compile for sm_90, or None."""
    try:
        from triton.backends import backends
    except Exception as e:
        return f"triton is not importable: {e!r}"
    if "nvidia" not in backends:
        return f"triton has no CUDA backend (backends: {sorted(backends)})"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as e:
        return f"triton's CUDA backend has no usable ptxas for sm_90: {e}"
    return None


# ----------------------------------------------------------------------------------------------------
# recording the wrappers' launches


@dataclass
class Launch:
    kernel: str  # module:qualname
    case: str  # the first case that made it
    specialization: str  # Triton's serialized specialization (JITFunction.preload's input)


LAUNCHES: dict[tuple[str, str], Launch] = {}  # (kernel, key) -> launch; identical launches compile once
CURRENT_CASE = [""]


def record_hook(*, key: Any, fn: Any, compile: dict[str, Any], **_: Any) -> bool:
    """Triton's jit_cache_hook: note the launch, skip its compile (True) and therefore its launch."""
    name = f"{fn.module}:{fn.name}"
    LAUNCHES.setdefault((name, str(key)), Launch(name, CURRENT_CASE[0], compile["specialization_data"]))
    return True


def kernel_modules() -> list[Any]:
    """Every module of `entropyinfer.kernels`, imported."""
    import entropyinfer.kernels as pkg

    return [
        importlib.import_module(f"{pkg.__name__}.{m.name}")
        for m in pkgutil.iter_modules(pkg.__path__)
        if not m.ispkg
    ]


def jit_functions() -> dict[str, Any]:
    """``module:qualname -> JITFunction`` of every ``@triton.jit`` function defined in `kernels/`."""
    import triton

    found = {}
    for mod in kernel_modules():
        for value in vars(mod).values():
            if isinstance(value, triton.runtime.JITFunction) and value.fn.__module__ == mod.__name__:
                found[f"{mod.__name__}:{value.fn.__qualname__}"] = value
    return found


def force_cuda_choices() -> None:
    """Make the wrappers take their CUDA paths on CPU tensors (see the module docstring)."""
    from entropyinfer.kernels import backend, tiling

    backend._check_interpreter = lambda device: None  # type: ignore[assignment]
    for mod in kernel_modules():
        if hasattr(mod, "jit_kernel"):
            mod.jit_kernel = lambda kernel, device: kernel
        if hasattr(mod, "sm_count"):
            mod.sm_count = lambda device: H200_SMS
        if hasattr(mod, "scoring_tiles"):
            mod.scoring_tiles = functools.partial(_gpu_tiles, tiling.scoring_tiles)
        if hasattr(mod, "select_tiles"):
            mod.select_tiles = functools.partial(_gpu_tiles, tiling.select_tiles)


def _gpu_tiles(choose: Callable[..., Any], *args: Any, cuda: bool = True, **kwargs: Any) -> Any:
    return choose(*args, cuda=True, **kwargs)


# ----------------------------------------------------------------------------------------------------
# the production shapes


@dataclass(frozen=True)
class Model:
    name: str
    hq: int
    hkv: int
    d: int
    hidden: int
    inter: int


MODELS = (
    Model("smollm2-135m", hq=9, hkv=3, d=64, hidden=576, inter=1536),  # the embedded model
    Model("llama-8b", hq=32, hkv=8, d=128, hidden=4096, inter=14336),  # the GPU benchmarks' shape
)
SEGMENTS = (128, 512)  # entropy_short / entropy_long presets' S (block size b = 8 in both)
BLOCK = 8
PAGE_SIZES = (8, 16, 128)  # kv_page_size: 16 by default, 8 .. 128 allowed


def _rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def _pages(m: Model, n: int, page_size: int, dtype: torch.dtype, table_dtype: torch.dtype) -> tuple[Any, ...]:
    """A pool holding ``n`` keys per KV head and its table ``[Hkv, P]`` (each head its own pages)."""
    per_head = -(-n // page_size)
    k_pages = _rand(m.hkv * per_head, m.hkv, page_size, m.d, dtype=dtype)
    v_pages = torch.randn_like(k_pages)
    table = torch.arange(m.hkv * per_head).view(m.hkv, per_head).to(table_dtype)
    return k_pages, v_pages, table


def _blocks(hkv: int, nseg: int, segment_size: int, max_k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid selections: segment s >= 1 keeps its first min(max_k, visible) blocks, segment 0 runs dense."""
    idx = torch.arange(max_k, dtype=torch.int32).expand(hkv, nseg, max_k).contiguous()
    cnt = torch.full((hkv, nseg), min(max_k, segment_size // BLOCK), dtype=torch.int32)
    cnt[:, 0] = -1
    return idx, cnt


@dataclass(frozen=True)
class Tier:
    """How much of the production matrix to compile. The default (CI) covers every kernel and every
    constexpr branch its wrapper can take in bfloat16 for both models, plus float16 for the attention
    kernels; ``full`` adds every page size, int64 tables, both presets' segment sizes, float16 everywhere
    and float32 (whose IEEE dots take minutes to compile: several hundred seconds in all on 2 cores)."""

    full: bool = False

    def pages(self, dt: torch.dtype) -> tuple[int, ...]:
        return PAGE_SIZES if self.full and dt != torch.float32 else (16,)

    def table_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.int32, torch.int64) if self.full else (torch.int32,)

    def segments(self) -> tuple[int, ...]:
        return SEGMENTS if self.full else (SEGMENTS[-1],)


def layer_ops_cases(m: Model, dt: torch.dtype, tier: Tier) -> Iterator[tuple[str, Callable[[], Any]]]:
    from entropyinfer.kernels import layer_ops as lo

    x, w = _rand(4, m.hidden, dtype=dt), _rand(m.hidden, dtype=dt)
    yield "rms_norm", lambda: lo.rms_norm(x, w, 1e-5, backend="triton")
    yield "add_rms_norm", lambda: lo.add_rms_norm(x, x.clone(), w, 1e-5, backend="triton")
    for heads in (m.hq, m.hkv):  # q and k
        xr = _rand(1, 4, heads, m.d, dtype=dt)
        cos2, cos3 = _rand(4, m.d, dtype=dt), _rand(1, 4, m.d, dtype=dt)  # prefill [T, d], decode [B, T, d]
        yield f"rotary[{heads} heads, cos [T,d]]", lambda: lo.rotary(xr, cos2, cos2, backend="triton")
        if tier.full:
            yield f"rotary[{heads} heads, cos [B,T,d]]", lambda: lo.rotary(xr, cos3, cos3, backend="triton")
    gate_up = _rand(4, 2 * m.inter, dtype=dt)
    yield "silu_and_mul", lambda: lo.silu_and_mul(gate_up, backend="triton")


def scoring_cases(m: Model, dt: torch.dtype, tier: Tier) -> Iterator[tuple[str, Callable[[], Any]]]:
    from entropyinfer.kernels.block_scoring import block_scores

    for s in SEGMENTS if tier.full else SEGMENTS[:1]:
        n = 4 * s
        q, k = _rand(m.hq, n, m.d, dtype=dt), _rand(m.hkv, n, m.d, dtype=dt)
        yield f"block_scores[S={s}]", lambda: block_scores(q, k, s, BLOCK, backend="triton")
        if tier.full:
            yield (
                f"block_scores[S={s}, spread]",
                lambda: block_scores(q, k, s, BLOCK, backend="triton", spread_logit_scale=0.5),
            )
    # a chunk deep into a long prompt, key blocks read from the pages, with the spread entropy: rows of
    # >= 4096 blocks (the longest row chunk), the logits as wide as the whole prompt's
    s = 512
    for nblk in (4096, 8192) if tier.full else (8192,):
        offset = nblk * BLOCK // s
        q = _rand(m.hq, s, m.d, dtype=dt)
        k = torch.empty(m.hkv, 1, m.d, dtype=dt).expand(m.hkv, (offset + 1) * s, m.d)
        reps = (_rand(m.hkv, nblk + 64, m.d, dtype=dt), _rand(m.hkv, nblk + 64, m.d, dtype=dt))
        yield f"block_scores[chunk, {nblk} blocks, paged reps, spread]", lambda: block_scores(
            q, k, s, BLOCK, backend="triton", spread_logit_scale=0.5, segment_offset=offset,
            num_key_blocks=nblk + 64, key_reps=reps,
        )  # fmt: skip


def ranking_cases(m: Model, dt: torch.dtype, tier: Tier) -> Iterator[tuple[str, Callable[[], Any]]]:
    from entropyinfer.kernels.query_ranking import query_block_scores

    for s in tier.segments():
        for stride in (8, 32) if tier.full else (8,):
            n = 4 * s
            q, k = _rand(m.hq, n, m.d, dtype=dt), _rand(m.hkv, n, m.d, dtype=dt)
            yield (
                f"query_ranking[S={s}, stride {stride}]",
                lambda: query_block_scores(q, k, s, BLOCK, stride, backend="triton"),
            )
            for ps in tier.pages(dt):
                for table_dtype in (torch.int32, torch.int64):  # the engine's tables are int64
                    k_pages, _, table = _pages(m, n, ps, dt, table_dtype)
                    qc = q[:, 2 * s :]  # a chunk from segment 2, its keys in the pages
                    yield (
                        f"query_ranking[S={s}, stride {stride}, page {ps}, {table_dtype}]",
                        lambda: query_block_scores(
                            qc,
                            k_pages,
                            s,
                            BLOCK,
                            stride,
                            segment_offset=2,
                            block_table=table,
                            backend="triton",
                        ),
                    )


def selection_cases() -> Iterator[tuple[str, Callable[[], Any]]]:
    from entropyinfer.kernels.block_selection import block_counts, select_blocks
    from entropyinfer.kernels.block_selection_ref import SpreadRule

    hkv, s, n = 8, 512, 8 * 512
    ent = torch.rand(hkv, n // s)
    kw: dict[str, Any] = dict(seq_len=n, segment_size=s, block_size=BLOCK, threshold_len=1024,
                              entropy_threshold=1e-5, base_budget=2048.0, alpha=0.5, delta=0.4,
                              backend="triton")  # fmt: skip
    rule = SpreadRule(2.0, 0.5, 512.0, 6144.0, 0.5, 256.0)
    yield "block_counts[fixed]", lambda: block_counts(ent, **kw, fixed_budget=2048.0)
    yield "block_counts[entropy]", lambda: block_counts(ent, **kw)
    yield "block_counts[entropy, causal]", lambda: block_counts(ent, **kw, causal=True)
    yield "block_counts[spread]", lambda: block_counts(ent, **kw, spread_rule=rule)
    for nblk in (64, 4096, 8192):  # one chunk; the longest chunk in registers; rows that loop
        scores = torch.randn(hkv, 2, nblk)
        counts = torch.full((hkv, 2), 16, dtype=torch.int32)
        yield (
            f"select_blocks[{nblk} blocks]",
            lambda: select_blocks(
                scores, counts, s, BLOCK, 256, backend="triton", segment_offset=nblk * BLOCK // s
            ),
        )


def decode_cases(m: Model, dt: torch.dtype, tier: Tier) -> Iterator[tuple[str, Callable[[], Any]]]:
    from entropyinfer.kernels.decode_attention import decode_attention
    from entropyinfer.kernels.paged_decode_attention import paged_decode_attention
    from entropyinfer.kernels.paged_kv_write import paged_kv_write

    # (batch, keys): one split per head writes the output itself; one sequence of 4096 keys in many splits
    # (the merge's widest split count); full: 8 sequences (a few splits)
    shapes = ((256, 64), (8, 4096), (1, 4096)) if tier.full else ((256, 64), (1, 4096))
    for batch, n in shapes:
        q = _rand(batch, m.hq, m.d, dtype=dt)
        kc = _rand(batch, m.hkv, n, m.d, dtype=dt)
        lengths = torch.full((batch, m.hkv), n, dtype=torch.int32)
        yield (
            f"decode_attention[B={batch}, L={n}]",
            lambda: decode_attention(q, kc, kc, lengths, backend="triton"),
        )
    for ps in tier.pages(dt):
        for batch, n in shapes:
            k_pages, v_pages, table = _pages(m, n, ps, dt, torch.int32)
            tables = table.expand(batch, *table.shape)  # every sequence reads the same pages
            q = _rand(batch, m.hq, m.d, dtype=dt)
            lengths = torch.full((batch, m.hkv), n, dtype=torch.int32)
            yield (
                f"paged_decode_attention[page {ps}, B={batch}, L={n}]",
                lambda: paged_decode_attention(q, k_pages, v_pages, tables, lengths, backend="triton"),
            )
    # the decode step's KV write: k, v views of the projection [B, Hkv, 1, d]; int64 pages and offsets
    kv = torch.stack(_pages(m, 4096, 16, dt, torch.int32)[:2])
    kv_new = _rand(8, m.hkv, 3, m.d, dtype=dt)[:, :, 0]
    page, offset = torch.zeros(8, m.hkv, dtype=torch.long), torch.arange(8 * m.hkv).view(8, m.hkv) % 16
    yield ("paged_kv_write[B=8]", lambda: paged_kv_write(kv_new, kv_new, kv, page, offset, backend="triton"))
    k_pages, v_pages, table = _pages(m, 4096, 16, dt, torch.int32)
    q, lengths = _rand(1, m.hq, m.d, dtype=dt), torch.full((1, m.hkv), 4096, dtype=torch.int32)
    lse = torch.empty(1, m.hq)
    yield (
        "paged_decode_attention[lse_out (SP)]",
        lambda: paged_decode_attention(
            q, k_pages, v_pages, table[None], lengths, backend="triton", lse_out=lse
        ),
    )


def prefill_cases(m: Model, dt: torch.dtype, tier: Tier) -> Iterator[tuple[str, Callable[[], Any]]]:
    from entropyinfer.kernels.paged_block_reps import paged_block_reps
    from entropyinfer.kernels.paged_sparse_prefill import paged_sparse_prefill_attention
    from entropyinfer.kernels.sparse_prefill import dense_causal_attention, sparse_prefill_attention

    for s in tier.segments():
        n = 2 * s
        q, k = _rand(m.hq, n, m.d, dtype=dt), _rand(m.hkv, n, m.d, dtype=dt)
        idx, cnt = _blocks(m.hkv, 2, s)
        yield (
            f"sparse_prefill[S={s}]",
            lambda: sparse_prefill_attention(
                q, k, k, idx, cnt, segment_size=s, block_size=BLOCK, backend="triton"
            ),
        )
        for ps in tier.pages(dt):
            for table_dtype in tier.table_dtypes():
                k_pages, v_pages, table = _pages(m, n, ps, dt, table_dtype)
                qc = q[:, s:]  # the second chunk, its prefix in the pages
                yield f"paged_sparse_prefill[S={s}, page {ps}, {table_dtype}]", lambda: (
                    paged_sparse_prefill_attention(
                        qc, k_pages, v_pages, table, idx, cnt, kv_len=n, segment_size=s, block_size=BLOCK,
                        q_offset=s, backend="triton",
                    )
                )  # fmt: skip
                yield (
                    f"paged_block_reps[page {ps}, {table_dtype}]",
                    lambda: paged_block_reps(k_pages, table, n // BLOCK, BLOCK, backend="triton"),
                )
    if tier.full:
        q, k = _rand(m.hq, 256, m.d, dtype=dt), _rand(m.hkv, 256, m.d, dtype=dt)
        yield "dense_causal_attention", lambda: dense_causal_attention(q, k, k, backend="triton")


def compression_cases(m: Model, dt: torch.dtype) -> Iterator[tuple[str, Callable[[], Any]]]:
    from entropyinfer.kernels.paged_window_scores import paged_window_scores
    from entropyinfer.kernels.window_scores import window_lse, window_probs

    g, n = m.hq // m.hkv, 4096  # the default observation window: 32 queries
    q, k = _rand(m.hkv, g, 32, m.d, dtype=dt), _rand(m.hkv, n, m.d, dtype=dt)
    lengths, lse = torch.full((m.hkv,), n), torch.zeros(m.hkv, g, 32)
    yield "window_lse", lambda: window_lse(q, k, lengths, backend="triton")
    yield "window_probs", lambda: window_probs(q, k, lengths, lse, backend="triton")
    pool, table = _rand(2, 64 * m.hkv, m.hkv, 16, m.d, dtype=dt), torch.arange(64 * m.hkv).view(m.hkv, 64)
    q2, lens2 = _rand(2, m.hkv, g, 32, m.d, dtype=dt), torch.full((2, m.hkv), 1000)
    yield "paged_window_scores", lambda: paged_window_scores(q2, pool, table, lens2, backend="triton")


def cases(tier: Tier) -> Iterator[tuple[str, Callable[[], Any]]]:
    """Every wrapper in the shapes production gives it (see `Tier`). The wrappers run one at a time, each
    right after its inputs are made (the lambdas read their loop's current inputs)."""
    yield from selection_cases()  # float32 scores and entropies whatever the model's dtype
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        if dt == torch.float32 and not tier.full:
            continue
        for m in MODELS:
            if dt == torch.float16 and not tier.full and m != MODELS[-1]:
                continue
            tag = f"{m.name}, {str(dt).removeprefix('torch.')}"
            gens = [decode_cases(m, dt, tier), prefill_cases(m, dt, tier), compression_cases(m, dt)]
            if dt == torch.bfloat16 or tier.full:
                gens += [layer_ops_cases(m, dt, tier), scoring_cases(m, dt, tier), ranking_cases(m, dt, tier)]
            for gen in gens:
                for name, call in gen:
                    yield f"{name} ({tag})", call


# ----------------------------------------------------------------------------------------------------
# compiling


def _compile(launch: Launch) -> dict[str, Any]:
    """Compile one recorded launch for sm_90 (in a worker process)."""
    fn = jit_functions()[launch.kernel]
    spec = json.loads(launch.specialization)
    result: dict[str, Any] = {
        "kernel": launch.kernel,
        "case": launch.case,
        "constexprs": {
            fn.arg_names[k[0]]: v for k, v in zip(spec["constant_keys"], spec["constant_vals"], strict=True)
        },
        "num_warps": spec["options"]["num_warps"],
        "num_stages": spec["options"]["num_stages"],
    }
    start = time.perf_counter()
    try:
        compiled = fn.preload(launch.specialization)
        result["shared"] = int(compiled.metadata.shared)
        result["cubin_bytes"] = len(compiled.asm["cubin"])
        result["error"] = None
    except Exception:
        result["error"] = traceback.format_exc(limit=3)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _init_worker() -> None:
    import triton

    triton.runtime.driver.set_active(H200Driver())


def _param_names(fn: Any) -> list[str]:
    return [p.name for p in fn.params]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the per-launch results here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles at a time")
    parser.add_argument("--full", action="store_true", help="the whole matrix (see Tier; ~15 min on 2 cores)")
    args = parser.parse_args(argv)

    reason = sm90_unavailable()
    if reason is not None:
        print(f"SKIP: {reason}")
        return SKIP_STATUS

    import triton

    triton.runtime.driver.set_active(H200Driver())
    triton.knobs.runtime.jit_cache_hook = record_hook
    force_cuda_choices()

    t0 = time.perf_counter()
    failures: list[str] = []
    n_cases = 0
    for name, call in cases(Tier(full=args.full)):
        CURRENT_CASE[0] = name
        n_cases += 1
        try:
            call()
        except Exception:
            failures.append(f"wrapper {name}:\n{traceback.format_exc(limit=4)}")
    triton.knobs.runtime.jit_cache_hook = None
    t_record = time.perf_counter() - t0

    launches = list(LAUNCHES.values())
    with ProcessPoolExecutor(max(1, args.jobs), initializer=_init_worker) as pool:
        results = list(pool.map(_compile, launches))
    t_compile = time.perf_counter() - t0 - t_record

    for r in results:
        if r["error"] is not None:
            failures.append(f"compile {r['kernel']} {r['constexprs']} ({r['case']}):\n{r['error']}")
        elif r["shared"] > H200_MAX_SHARED:
            failures.append(
                f"shared memory {r['kernel']} {r['constexprs']} ({r['case']}): {r['shared']} bytes > "
                f"{H200_MAX_SHARED} (an H200 block's maximum)"
            )
    kernels = jit_functions()
    report = {
        "target": "cuda:90 (H200)",
        "max_shared": H200_MAX_SHARED,
        "cases": n_cases,
        "record_seconds": round(t_record, 1),
        "compile_seconds": round(t_compile, 1),
        "jobs": args.jobs,
        "results": results,
        "failures": failures,
        "jit_functions": {name: {"params": _param_names(fn), "src": fn.src} for name, fn in kernels.items()},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    worst: dict[str, int] = {}
    for r in results:
        if r["error"] is None:
            worst[r["kernel"]] = max(worst.get(r["kernel"], 0), r["shared"])
    print(
        f"{len(results)} launches of {len(worst)} kernels from {n_cases} wrapper calls: recorded in "
        f"{t_record:.1f} s, compiled for sm_90 in {t_compile:.1f} s ({args.jobs} at a time)"
    )
    for name, shared in sorted(worst.items()):
        print(f"  {name.split('.')[-1]:55s} max shared {shared:7d} B")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
