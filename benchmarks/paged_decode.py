"""Paged decode attention (`kernels/paged_decode_attention.py`) on the GPU: correctness in bf16, a CUDA-graph
check, and its speed against the contiguous `decode_attention`, in one call.

Sections (each written to ``<out>/paged_decode.{json,md}`` as soon as it is done, so a cut run keeps what
it measured):

1. correctness: bf16, compiled, against `paged_decode_attention_ref` and against `decode_attention_ref` on
   the same data laid out contiguously; page sizes 8-128, d 64/128, GQA groups 1-8, ragged per-head
   lengths (0, 1, page_size, capacity), per-head and stride-0 shared tables, 1 and several splits.
2. graph: one CUDA-graph capture replayed with new lengths, tables and queries.
3. timing: Llama-3-8B's attention shape (32 query / 8 KV heads, d=128), bf16, page 16, batch 1/8/64 x
   context 4k/32k/128k, every length full; the pool holds each sequence's pages in a random order; the
   contiguous kernel reads the same entries from ``[B, Hkv, ctx, d]``. ``triton.testing.do_bench`` medians
   (L2 flushed between runs), GB/s of K+V read, and the largest difference between the two outputs.
4. page sizes: 8-128 at batch 8, 32k (same shape).
5. SmolLM2's shape (9/3 heads, d=64), page 16.
6. tile sweep: ``(BLOCK_N, num_warps, num_stages)`` of the paged kernel at three shapes, to tune
   `tiling.paged_decode_tiles` (last: the longest section).
7. splits (``--sections splits``): as the engine runs it, a CUDA graph of 32 calls (one per layer), per
   call: the paged kernel at each (num_splits, tiles) against the contiguous one at its default, batch
   1 and 8 at 4k / 32k (the lone-request decode gap of engine_serving part d).

Usage: ``python benchmarks/paged_decode.py OUT_DIR`` on the GPU; ``--smoke`` runs every section on tiny
shapes (on a CPU through Triton's interpreter, float32) to test the script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cuda_time

Row = dict[str, Any]


class Ctx:
    """What every section needs: device, dtype, the kernels (imported after TRITON_INTERPRET is set)."""

    def __init__(self, smoke: bool) -> None:
        self.smoke = smoke
        self.cuda = torch.cuda.is_available()
        self.dev = "cuda" if self.cuda else "cpu"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.backend = "auto" if self.cuda else "triton"
        from entropyinfer.kernels import decode_attention as da
        from entropyinfer.kernels import decode_attention_ref as dar
        from entropyinfer.kernels import paged_decode_attention as pda
        from entropyinfer.kernels import paged_decode_attention_ref as pdar

        self.paged = pda.paged_decode_attention
        self.paged_ref = pdar.paged_decode_attention_ref
        self.contig = da.decode_attention
        self.contig_ref = dar.decode_attention_ref

    def bench(self, fn: Callable[[], Any]) -> float:
        """Median ms of fn."""
        if self.cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def make_paged(
    ctx: Ctx,
    lengths: torch.Tensor,
    hq: int,
    d: int,
    page_size: int,
    *,
    shared: bool,
    capacity: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """(q, k, v, k_pages, v_pages, tables, lengths): contiguous caches [B, Hkv, cap, d] and the same
    entries in random pages of a pool (one spare noisy page). ``shared``: one table per sequence, expanded
    over heads."""
    batch, hkv = lengths.shape
    cap = capacity or max(int(lengths.max()), 1)
    max_pages = -(-cap // page_size)
    cap = max_pages * page_size
    dev, dt = ctx.dev, ctx.dtype
    q = torch.randn(batch, hq, d, device=dev, dtype=dt)
    k = torch.randn(batch, hkv, cap, d, device=dev, dtype=dt)
    v = torch.randn(batch, hkv, cap, d, device=dev, dtype=dt)
    rows = batch if shared else batch * hkv
    num_pages = rows * max_pages + 1
    ids = torch.randperm(num_pages, device=dev)[: rows * max_pages].view(-1, 1 if shared else hkv, max_pages)
    k_pages = torch.randn(num_pages, hkv, page_size, d, device=dev, dtype=dt)
    v_pages = torch.randn(num_pages, hkv, page_size, d, device=dev, dtype=dt)
    for b in range(batch):  # one sequence at a time: no second full-size temporary
        if shared:
            k_pages[ids[b, 0]] = k[b].view(hkv, max_pages, page_size, d).transpose(0, 1)
            v_pages[ids[b, 0]] = v[b].view(hkv, max_pages, page_size, d).transpose(0, 1)
        else:
            for h in range(hkv):
                k_pages[ids[b, h], h] = k[b, h].view(max_pages, page_size, d)
                v_pages[ids[b, h], h] = v[b, h].view(max_pages, page_size, d)
    tables = ids.int().expand(batch, hkv, max_pages) if shared else ids.int()
    return q, k, v, k_pages, v_pages, tables, lengths.to(device=dev, dtype=torch.int32)


def ragged_lengths(batch: int, hkv: int, cap: int, page_size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, cap + 1, (batch, hkv), generator=gen)
    edges = [0, 1, page_size, cap, page_size + 1, 2 * page_size]
    flat = lens.view(-1)
    for i, e in enumerate(edges[: flat.numel()]):
        flat[i] = min(e, cap)
    return lens


def section_correctness(ctx: Ctx) -> list[Row]:
    # (batch, hkv, group, d, page_size, capacity, shared)
    cases = [
        (4, 8, 4, 128, 16, 3000, False),
        (4, 8, 4, 128, 16, 3000, True),
        (3, 2, 1, 128, 8, 1000, False),
        (9, 2, 8, 64, 32, 700, True),
        (3, 3, 3, 64, 64, 1500, False),
        (2, 4, 2, 128, 128, 2100, False),
        (2, 2, 8, 128, 8, 300, False),
        (3, 3, 3, 64, 16, 4133, True),
    ]
    if ctx.smoke:
        cases = [(2, 2, 2, 64, 8, 40, False), (3, 1, 4, 128, 16, 50, True)]
    rows = []
    for i, (batch, hkv, group, d, ps, cap, shared) in enumerate(cases):
        row: Row = {
            "case": f"B{batch} {hkv * group}/{hkv} d{d} ps{ps} cap{cap} {'shared' if shared else 'per-head'}"
        }
        try:
            lens = ragged_lengths(batch, hkv, cap, ps, i)
            q, k, v, kp, vp, tables, lengths = make_paged(ctx, lens, hkv * group, d, ps, shared=shared)
            ref = ctx.paged_ref(q.float(), kp.float(), vp.float(), tables, lengths)
            ref_c = ctx.contig_ref(q.float(), k.float(), v.float(), lengths)
            errs = []
            for splits in (None, 1, 7):
                got = ctx.paged(
                    q, kp, vp, tables, lengths, num_splits=splits, backend=ctx.backend, validate=True
                )
                errs.append((got.float() - ref).abs().max().item())
                errs.append((got.float() - ref_c).abs().max().item())
            row["max_abs_err"] = max(errs)
            row["nan"] = bool(torch.isnan(got).any())
            row["ok"] = row["max_abs_err"] <= 2e-2 and not row["nan"]
        except Exception:
            row["ok"] = False
            row["error"] = traceback.format_exc(limit=3)[-800:]
        print(row, flush=True)
        rows.append(row)
    return rows


def section_graph(ctx: Ctx) -> list[Row]:
    if not ctx.cuda:
        return [{"case": "cuda graph", "ok": None, "note": "no CUDA device"}]
    row: Row = {"case": "cuda graph B8 32/8 d128 ps16 cap4096, 4 replays"}
    try:
        lens = torch.full((8, 8), 4096)
        q, _, _, kp, vp, tables, lengths = make_paged(ctx, lens, 32, 128, 16, shared=False)
        tables = tables.clone()
        out = torch.empty_like(q)
        ctx.paged(q, kp, vp, tables, lengths, out=out)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ctx.paged(q, kp, vp, tables, lengths, out=out)
        errs = []
        for i in range(4):
            lengths.copy_(ragged_lengths(8, 8, 4096, 16, 100 + i).to(lengths))
            q.copy_(torch.randn_like(q))
            tables.copy_(tables[..., torch.randperm(tables.shape[-1], device=tables.device)])
            graph.replay()
            torch.cuda.synchronize()
            ref = ctx.paged_ref(q.float(), kp.float(), vp.float(), tables, lengths)
            errs.append((out.float() - ref).abs().max().item())
        row["max_abs_err"] = max(errs)
        row["ok"] = row["max_abs_err"] <= 2e-2
    except Exception:
        row["ok"] = False
        row["error"] = traceback.format_exc(limit=3)[-800:]
    print(row, flush=True)
    return [row]


def time_pair(
    ctx: Ctx, batch: int, hq: int, hkv: int, d: int, context: int, ps: int, tiles: list[Any] | None = None
) -> list[Row]:
    """Paged (each of ``tiles``; None = default) and contiguous decode at full lengths on the same data."""
    data = make_paged(ctx, torch.full((batch, hkv), context), hq, d, ps, shared=True)
    try:
        return _time_pair(ctx, data, tiles or [None])
    finally:
        del data
        if ctx.cuda:
            torch.cuda.empty_cache()


def _time_pair(ctx: Ctx, data: tuple[torch.Tensor, ...], tiles: list[Any]) -> list[Row]:
    q, k, v, kp, vp, tables, lengths = data
    (batch, hq, d), (_, hkv, context, _), ps = q.shape, k.shape, kp.shape[2]
    gbytes = 2 * batch * hkv * context * d * q.element_size() / 1e9
    ms_c = ctx.bench(lambda: ctx.contig(q, k, v, lengths, backend=ctx.backend))
    out_c = ctx.contig(q, k, v, lengths, backend=ctx.backend)
    rows = []
    for t in tiles:
        row: Row = {"batch": batch, "context": context, "page": ps, "heads": f"{hq}/{hkv}", "d": d}
        row["tiles"] = str(t or "default")
        tt = tuple(t) if t else None

        def paged(tt: tuple[int, int, int] | None = tt) -> torch.Tensor:
            return ctx.paged(q, kp, vp, tables, lengths, backend=ctx.backend, tiles=tt)

        try:
            ms_p = ctx.bench(paged)
            row.update(
                paged_us=round(ms_p * 1e3, 1),
                contig_us=round(ms_c * 1e3, 1),
                paged_over_contig=round(ms_p / ms_c, 3),
                paged_GBps=round(gbytes / (ms_p / 1e3)),
                contig_GBps=round(gbytes / (ms_c / 1e3)),
                max_abs_diff=(paged().float() - out_c.float()).abs().max().item(),
            )
        except Exception:
            row["error"] = traceback.format_exc(limit=3)[-800:]
        print(row, flush=True)
        rows.append(row)
    return rows


def section_timing(ctx: Ctx) -> list[Row]:
    shapes = [(b, c) for b in (1, 8, 64) for c in (4096, 32768, 131072)]
    if ctx.smoke:
        shapes = [(1, 64), (2, 128)]
    rows = []
    for b, c in shapes:
        rows += time_pair(ctx, b, 32, 8, 128, c, 16)
    return rows


def section_page_sizes(ctx: Ctx) -> list[Row]:
    b, c = (2, 128) if ctx.smoke else (8, 32768)
    rows = []
    for ps in (8, 16, 32, 64, 128):
        rows += time_pair(ctx, b, 32, 8, 128, c, ps)
    return rows


def section_sweep(ctx: Ctx) -> list[Row]:
    tiles = [[n, w, s] for n in (16, 32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]
    shapes = [(1, 131072), (8, 32768), (64, 32768)]
    if ctx.smoke:
        tiles, shapes = [[32, 4, 2], [64, 4, 2]], [(2, 128)]
    rows = []
    for b, c in shapes:
        rows += time_pair(ctx, b, 32, 8, 128, c, 16, tiles=tiles)
    return rows


def _graph_us(ctx: Ctx, fn: Callable[[], Any], calls: int = 32) -> float:
    """Microseconds per call of ``fn`` replayed ``calls`` times in one CUDA graph (median of 20 replays)."""
    if not ctx.cuda:
        return ctx.bench(fn) * 1e3
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_time(graph.replay, reps=20) * 1e3 / calls


def section_splits(ctx: Ctx) -> list[Row]:
    shapes = [(1, 32768), (1, 4096), (8, 32768)] if not ctx.smoke else [(1, 128)]
    splits = [None, 8, 16, 24, 48, 64] if not ctx.smoke else [None, 2]
    tiles = [None, [32, 4, 2], [64, 4, 2], [128, 4, 2], [64, 8, 3], [128, 8, 3]] if not ctx.smoke else [None]
    rows = []
    for b, c in shapes:
        rows += _split_rows(ctx, b, c, splits, tiles)
        if ctx.cuda:
            torch.cuda.empty_cache()
    return rows


def _split_rows(
    ctx: Ctx, b: int, c: int, splits: list[int | None], tiles: list[list[int] | None]
) -> list[Row]:
    """Every (num_splits, tiles) of one shape against the contiguous kernel, all inside CUDA graphs."""
    q, k, v, kp, vp, tables, lengths = make_paged(ctx, torch.full((b, 8), c), 32, 128, 16, shared=True)
    out_c, out_p = torch.empty_like(q), torch.empty_like(q)
    contig_us = _graph_us(ctx, lambda: ctx.contig(q, k, v, lengths, backend=ctx.backend, out=out_c))
    rows = []
    for n in splits:
        for t in tiles:
            row: Row = {"batch": b, "context": c, "num_splits": n or "default", "tiles": str(t or "default")}
            tt = tuple(t) if t else None

            def paged(n: int | None = n, tt: tuple[int, ...] | None = tt) -> torch.Tensor:
                return ctx.paged(
                    q, kp, vp, tables, lengths, backend=ctx.backend, num_splits=n, tiles=tt, out=out_p
                )

            try:
                us = _graph_us(ctx, paged)
                row.update(
                    paged_us=round(us, 1), contig_us=round(contig_us, 1), ratio=round(us / contig_us, 3)
                )
                row["max_abs_diff"] = (out_p.float() - out_c.float()).abs().max().item()
            except Exception:
                row["error"] = traceback.format_exc(limit=3)[-800:]
            print(row, flush=True)
            rows.append(row)
    return rows


def section_smollm2(ctx: Ctx) -> list[Row]:
    shapes = [(1, 32768), (16, 8192), (64, 32768)] if not ctx.smoke else [(2, 64)]
    rows = []
    for b, c in shapes:
        rows += time_pair(ctx, b, 9, 3, 64, c, 16)
    return rows


def environment(ctx: Ctx) -> Row:
    import triton

    env: Row = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "smoke": ctx.smoke,
    }
    env["gpu"] = torch.cuda.get_device_name() if ctx.cuda else None
    env["cuda"] = torch.version.cuda if ctx.cuda else None
    env["dtype"] = str(ctx.dtype)
    return env


def markdown(title: str, rows: list[Row]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols and c != "error"]
    lines = [f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r.get(c, "")) for c in cols]
        if "error" in r:
            cells[0] += " (ERROR: " + r["error"].strip().splitlines()[-1][:120].replace("|", "/") + ")"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for paged_decode.json and paged_decode.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: Triton interpreter, fp32)")
    parser.add_argument("--sections", default="correctness,graph,timing,page_sizes,smollm2,sweep")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        if not args.smoke:
            sys.exit("no CUDA device: run with --smoke to test the script on the CPU")
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels import triton
    torch.manual_seed(0)
    ctx = Ctx(args.smoke)
    sections: dict[str, Callable[[Ctx], list[Row]]] = {
        "correctness": section_correctness,
        "graph": section_graph,
        "timing": section_timing,
        "page_sizes": section_page_sizes,
        "sweep": section_sweep,
        "smollm2": section_smollm2,
        "splits": section_splits,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    result: Row = {"env": environment(ctx), "sections": {}}
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            result["sections"][name] = sections[name](ctx)
        except Exception:
            result["sections"][name] = [{"error": traceback.format_exc(limit=4)[-1500:]}]
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
        (args.out / "paged_decode.json").write_text(json.dumps(result, indent=2) + "\n")
        env = ", ".join(f"{k}: {v}" for k, v in result["env"].items() if v is not None)
        md = [f"# Paged decode attention vs contiguous decode ({env})", ""]
        md += [markdown(n, rows) for n, rows in result["sections"].items()]
        (args.out / "paged_decode.md").write_text("\n".join(md))
    print((args.out / "paged_decode.md").read_text())


if __name__ == "__main__":
    main()
