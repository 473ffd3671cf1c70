"""Shared pieces of the benchmark scripts: environment facts, timing, and writing results (JSON + table)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from entropyinfer.evaluation.report import markdown_table

# Llama-3-8B's shape (random weights serve speed measurements; quality needs a trained model).
LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    # 131072-token prompts plus generated tokens need a little more room than Llama 3.1's 131072.
    max_position_embeddings=132096,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env


def cuda_time(fn: Callable[[], Any], reps: int = 1, warmup: int = 0) -> float:
    """Median wall time in ms of `fn` on the GPU (CUDA events), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def decode_ms(engine: Any, cache: Any, tokens: torch.Tensor, positions: torch.Tensor, steps: int) -> float:
    """Median ms per greedy decode step over `cache` (CUDA-graph captured on the GPU), after 3 warm-up steps.
    `positions` advances in place."""
    from entropyinfer.shard.engine import GraphedDecode

    on_gpu = tokens.device.type == "cuda"
    graph: Any = GraphedDecode(engine, cache) if on_gpu else (lambda t, p: engine.decode_step(t, p, cache))

    def step() -> None:
        nonlocal tokens
        tokens = graph(tokens, positions).argmax(-1)
        positions.add_(1)

    for _ in range(3):
        step()
    run = lambda: [step() for _ in range(steps)]  # noqa: E731
    return (cuda_time(run) if on_gpu else wall_time(run)) / steps


def wall_time(fn: Callable[[], Any], reps: int = 1) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def out_dir() -> Path:
    return Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")


def write_results(
    name: str,
    title: str,
    columns: list[str],
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    notes: str = "",
) -> str:
    """Write `<name>.json` and `<name>.md` (a table with the environment) to $OUT or benchmarks/results."""
    folder = out_dir()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    env = meta.get("env", {})
    lines = [f"# {title}", "", ", ".join(f"{k}: {v}" for k, v in env.items() if v is not None), ""]
    lines.append(markdown_table(columns, rows))
    if notes:
        lines += ["", notes]
    table = "\n".join(lines) + "\n"
    (folder / f"{name}.md").write_text(table)
    return table
