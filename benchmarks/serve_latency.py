"""Serving overhead (GPU): one ~128k-token document job over HTTP against the same job through the Python API.

The model is Llama-3-8B-shaped with random weights (`load_format="dummy"`), from a checkpoint folder built
here in a temporary folder: config.json plus a byte-level tokenizer (one byte = one token,
shard/dummy_checkpoint.py), so the job's prompt has exactly `--tokens` tokens. The prompt is the one the
job worker builds (cluster/job_worker.py `build_prompt` with the default system prompt and template): the
document, then a short question, through the chat template. Greedy, `--max-tokens` new tokens.

1. Python API: `LLM(folder, policy, load_format="dummy")`, one warm-up run at `--warmup-tokens`, then the
   job's prompt through `LLM.stream` (time to the first text; total) and `LLM.generate` (total).
2. HTTP: the Serve app (`EmbeddedServer`: local Ray in this process, the app on 127.0.0.1, one engine
   replica with one shard on one GPU, same folder, `engine.llm.load_format: dummy`). A warm-up job, stream
   and chat completion at `--warmup-tokens`, then through the client SDK over real HTTP: the document
   job (submit, wait, results: the total a user sees), a streaming chat completion of the same prompt
   (SSE: time to the first text, and to [DONE]), and a non-streaming chat completion.
3. Serving overhead = HTTP - Python API: TTFT (SSE vs `LLM.stream`), total (SSE vs `LLM.stream`; job and
   chat completion vs `LLM.generate`). Each row also has the engine's own prefill time for that run, so
   run-to-run variation of the prefill can be told from the overhead.

Memory: the Python-API model is freed (del, gc, `torch.cuda.empty_cache()`) before Serve starts, in this
one process: only one 8B model (16 GB in bf16) and one 128k KV cache (16 GiB) are ever on the GPU, and the
two measurements never share it. (Starting Serve first in another process would hold two models at once
and need a second driver to coordinate.)

    python benchmarks/serve_latency.py [--tokens 131072] [--max-tokens 32] [--policy entropy|dense]
        [--repeats N: runs per row, medians] [--deadline-s 450] [--ray-logs: forward Ray worker logs]
    python benchmarks/serve_latency.py --smoke   # CPU, tiny Llama, ~600-token document: the whole script

Writes serve_latency.{json,md} to $OUT (device machine) or benchmarks/results/; `--smoke` writes
serve_latency_smoke.* to $OUT or a temporary folder (never into the repository). A failing phase prints
its traceback, is recorded under `meta.errors`, and the results so far are still written; after an HTTP
failure the Ray session's Serve logs and worker error files are copied to $OUT/serve_latency_ray_logs.
At `--deadline-s` the run stops (Serve shut down, results written), to stay inside a caller's time limit.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import signal
import statistics
import string
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLAMA3_8B, environment, out_dir, write_results

from entropyinfer.cluster.config import JobsConfig
from entropyinfer.cluster.job_worker import build_prompt
from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint

QUESTION = "What is the passkey mentioned in the document? Answer with the number only."
JOBS = JobsConfig()  # the worker's default system prompt and template: the job's prompt is built with them
TINY_LLAMA = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
    rope_theta=500000.0,
)
COLUMNS = [
    "path",
    "runs",
    "prompt_tokens",
    "tokens_out",
    "ttft_s",
    "total_s",
    "prefill_s",
    "density",
    "ttft_overhead_ms",
    "total_overhead_ms",
    "vs",
    "same_out",
]


@dataclass
class Run:
    """What the script measured so far (written out whatever happens)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, dict[str, Any]] = field(default_factory=dict)  # Python-API rows by name
    phase: str = "setup"  # what is running now (named in an error that reaches main)

    def error(self, phase: str) -> None:
        tb = traceback.format_exc()
        print(f"\n!!! {phase} failed:\n{tb}", flush=True)
        self.meta.setdefault("errors", []).append({"phase": phase, "traceback": tb})


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- the checkpoint folder and the prompt -----------------------------------------------------------------


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """Llama-3-8B's shape (or a tiny Llama for --smoke) as a Hugging Face config.json."""
    base: dict[str, Any] = dict(TINY_LLAMA) if args.smoke else dict(LLAMA3_8B)
    rope = dict(base.pop("rope_parameters", {}) or {})
    if rope:  # the classic keys, which every transformers version reads
        base["rope_theta"] = rope.pop("rope_theta")
        base["rope_scaling"] = rope
    need = args.tokens + args.max_tokens + 64
    base["max_position_embeddings"] = max(int(base["max_position_embeddings"]), need)
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **base}


def make_document(n_bytes: int, seed: int = 0) -> str:
    """ASCII words (one byte = one token), exactly `n_bytes` long, with a passkey in the middle."""
    rng = random.Random(seed)
    passkey = f" The passkey is {rng.randrange(10**5, 10**6)}. "
    words: list[str] = []
    size = 0
    while size < n_bytes:
        w = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
        words.append(w)
        size += len(w) + 1
    text = " ".join(words)
    mid = len(text) // 2
    text = text[:mid] + passkey + text[mid:]
    return text[:n_bytes]


def job_messages(document: str) -> list[dict[str, str]]:
    """The chat messages the job worker sends the engine for (document, QUESTION)."""
    return build_prompt(document, QUESTION, JOBS.system_prompt, JOBS.prompt_template)


def count_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return len(ids)


def document_of(tokenizer: Any, total_tokens: int) -> str:
    """The document whose job prompt has exactly `total_tokens` tokens."""
    overhead = count_tokens(tokenizer, job_messages(""))
    if total_tokens <= overhead:
        raise ValueError(f"--tokens must exceed the prompt's {overhead} tokens without a document")
    document = make_document(total_tokens - overhead)
    n = count_tokens(tokenizer, job_messages(document))
    if n != total_tokens:
        raise AssertionError(f"the job prompt has {n} tokens, wanted {total_tokens}")
    return document


# ---- measurements ------------------------------------------------------------------------------------------


def timed_stream(deltas: Iterator[str]) -> tuple[float | None, float, str]:
    """(time to the first non-empty text, time to the end, the text) of an iterator of text deltas."""
    t0 = time.perf_counter()
    first = None
    parts = []
    for delta in deltas:
        if delta and first is None:
            first = time.perf_counter() - t0
        parts.append(delta)
    return first, time.perf_counter() - t0, "".join(parts)


def engine_stats(stats: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    if "prompt_tokens" in stats:
        row["prompt_tokens"] = stats["prompt_tokens"]
    if "prefill_ms" in stats:
        row["prefill_s"] = stats["prefill_ms"] / 1e3
    if "density" in stats:
        row["density"] = stats["density"]
    if "generated_tokens" in stats:
        row["tokens_out"] = stats["generated_tokens"]
    return row


def python_api(args: argparse.Namespace, folder: Path, document: str, warm: str, run: Run) -> None:
    from entropyinfer import LLM

    t0 = time.perf_counter()
    llm = LLM(str(folder), policy=args.policy, load_format="dummy", device=args.device, dtype=args.dtype)
    run.meta["python_load_s"] = time.perf_counter() - t0
    log(f"Python API: model built in {run.meta['python_load_s']:.1f}s; warm-up ({args.warmup_tokens} tokens)")
    try:
        python_runs(args, llm, document, warm, run)
    finally:
        del llm
        free_gpu()


def python_runs(args: argparse.Namespace, llm: Any, document: str, warm: str, run: Run) -> None:
    from entropyinfer import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    llm.generate(job_messages(warm), params)
    run.meta["python_warmup_s"] = time.perf_counter() - t0
    messages = job_messages(document)
    if llm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def stream() -> tuple[dict[str, Any], str]:
        outputs: list[Any] = []

        def deltas() -> Iterator[str]:
            for ev in llm.stream(messages, params):
                if ev.output is not None:
                    outputs.append(ev.output)
                yield ev.text

        ttft, total, text = timed_stream(deltas())
        return {"ttft_s": ttft, "total_s": total, **engine_stats(outputs[0].stats)}, text

    def generate() -> tuple[dict[str, Any], str]:
        t0 = time.perf_counter()
        out = llm.generate(messages, params)[0]
        return {"total_s": time.perf_counter() - t0, **engine_stats(out.stats)}, out.text

    measure(run, args.repeats, "python LLM.stream", stream, key="stream")
    measure(run, args.repeats, "python LLM.generate", generate, key="generate")
    if llm.device.type == "cuda":
        run.meta["python_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9


def measure(
    run: Run,
    repeats: int,
    path: str,
    once: Callable[[], tuple[dict[str, Any], str | None]],
    *,
    key: str | None = None,
    vs: str | None = None,
) -> None:
    """Run `once` `repeats` times; one row of medians (all samples go to meta.samples). `key`: keep the row
    as a Python-API reference; `vs`: the reference this HTTP row's overheads are measured against."""
    log(f"{path}: {repeats} run(s)")
    samples, texts = [], []
    for i in range(repeats):
        sample, text = once()
        samples.append(sample)
        texts.append(text)
        timings = ", ".join(f"{k} {v:.3f}" for k, v in sample.items() if k.endswith("_s") and v is not None)
        log(f"  [{i + 1}/{repeats}] {timings}")
    row: dict[str, Any] = {"path": path, "runs": repeats, **medians(samples)}
    ref = run.reference.get(vs) if vs is not None else None
    if ref is not None:
        row["vs"] = ref["path"]
        for name in ("ttft", "total"):
            mine, theirs = row.get(f"{name}_s"), ref.get(f"{name}_s")
            if mine is not None and theirs is not None:
                row[f"{name}_overhead_ms"] = (mine - theirs) * 1e3
        row["same_out"] = all(t == ref["text"] for t in texts)
    run.rows.append(row)
    run.meta.setdefault("samples", {})[path] = samples
    if key is not None:
        run.reference[key] = {**row, "text": texts[0]}


def medians(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in samples[0]:
        values = [s[k] for s in samples if s.get(k) is not None]
        numeric = values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        out[k] = statistics.median(values) if numeric else (values[0] if values else None)
    return out


def free_gpu() -> None:
    """Return the Python-API model's GPU memory before the Serve replica loads its own copy."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def serve_config(args: argparse.Namespace, folder: Path, db: Path) -> Any:
    from entropyinfer.cluster.config import AuthConfig, JobsConfig, ReplicaConfig, ServeAppConfig
    from entropyinfer.shard.config import LLMConfig

    llm = {
        "model": str(folder),
        "policy": args.policy,
        "dtype": args.dtype or "auto",
        "device": "cpu" if args.smoke else None,  # None: the shard's GPU
        "load_format": "dummy",
    }
    return ServeAppConfig(
        engine=ReplicaConfig(
            llm=LLMConfig.from_keywords(llm),
            policies=tuple(dict.fromkeys((args.policy, "dense", "entropy", "fixed"))),
            accelerator="cpu" if args.smoke else "gpu",
            cpu_threads=1 if args.smoke else None,  # as the Python API's torch in --smoke
        ),
        jobs=JobsConfig(db_path=str(db), poll_s=0.1),
        auth=AuthConfig(api_key=None, api_key_env=None),
    )


def http(args: argparse.Namespace, folder: Path, document: str, warm: str, run: Run) -> None:
    from entropyinfer import Client
    from entropyinfer.cluster.launcher import EmbeddedServer

    config = serve_config(args, folder, folder.parent / "jobs.sqlite")
    server = EmbeddedServer(config, port=None, log_to_driver=args.ray_logs)
    log("HTTP: starting Ray, Serve and the app (one engine replica, one shard)")
    t0 = time.perf_counter()
    with server:
        run.meta["serve_start_s"] = time.perf_counter() - t0
        log(f"HTTP: serving on {server.url} after {run.meta['serve_start_s']:.1f}s")
        sampling = {"max_tokens": args.max_tokens, "temperature": 0.0, "policy": args.policy}
        with Client(server.url, timeout=args.request_timeout, api_key="") as client:
            t0 = time.perf_counter()
            warm_job = client.submit([warm], QUESTION, **sampling)
            client.wait(warm_job.id, poll_s=0.05, timeout=args.request_timeout, progress=False)
            client.results(warm_job.id)
            timed_stream(client.stream(job_messages(warm), **sampling))
            client.chat(job_messages(warm), **sampling)
            run.meta["http_warmup_s"] = time.perf_counter() - t0
            log(f"HTTP: warm-up job, stream and chat done in {run.meta['http_warmup_s']:.1f}s")
            measure_job(args, client, document, sampling, run)
            measure_stream(args, client, document, sampling, run)
            measure_chat(args, client, document, sampling, run)


def measure_job(
    args: argparse.Namespace, client: Any, document: str, sampling: dict[str, Any], run: Run
) -> None:
    def once() -> tuple[dict[str, Any], str | None]:
        t0 = time.perf_counter()
        job = client.submit([document], QUESTION, **sampling)
        submitted = time.perf_counter() - t0
        status = client.wait(job.id, poll_s=args.poll_s, timeout=args.request_timeout, progress=False)
        result = client.results(job.id)[0]
        total = time.perf_counter() - t0
        if status.state != "succeeded" or result.error:
            raise RuntimeError(f"job {job.id}: {status.state}, {status.error or result.error}")
        server = status.finished_at - status.created_at if status.finished_at and status.created_at else None
        sample = {"total_s": total, "submit_s": submitted, "server_job_s": server}
        return {**sample, **engine_stats(result.stats)}, result.text

    measure(run, args.repeats, "http job (submit -> results)", once, vs="generate")


def measure_stream(
    args: argparse.Namespace, client: Any, document: str, sampling: dict[str, Any], run: Run
) -> None:
    def once() -> tuple[dict[str, Any], str | None]:
        ttft, total, text = timed_stream(client.stream(job_messages(document), **sampling))
        return {"ttft_s": ttft, "total_s": total}, text

    measure(run, args.repeats, "http chat stream (SSE)", once, vs="stream")


def measure_chat(
    args: argparse.Namespace, client: Any, document: str, sampling: dict[str, Any], run: Run
) -> None:
    def once() -> tuple[dict[str, Any], str | None]:
        t0 = time.perf_counter()
        out = client.chat(job_messages(document), **sampling)
        sample: dict[str, Any] = {"total_s": time.perf_counter() - t0}
        sample["prompt_tokens"] = out.usage.get("prompt_tokens")
        sample["tokens_out"] = out.usage.get("completion_tokens")
        return {**sample, **engine_stats(out.stats)}, out.text

    measure(run, args.repeats, "http chat completion", once, vs="generate")


# ---- the run -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny Llama, ~600-token document, float32")
    ap.add_argument("--tokens", type=int, default=None, help="job prompt tokens (default 131072; smoke 600)")
    ap.add_argument(
        "--warmup-tokens", type=int, default=None, help="warm-up prompt (default 16384; smoke 200)"
    )
    ap.add_argument("--max-tokens", type=int, default=None, help="new tokens, greedy (default 32; smoke 8)")
    ap.add_argument("--policy", default="entropy", choices=("entropy", "dense", "fixed", "snapkv"))
    ap.add_argument("--repeats", type=int, default=1, help="measured runs per row (the row: medians)")
    ap.add_argument("--poll-s", type=float, default=0.02, help="job status polling interval")
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="stop (shut Serve down, write what was measured) after this long; 0: never (default 450)",
    )
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--skip-python", action="store_true", help="HTTP only (no overhead columns)")
    ap.add_argument("--skip-http", action="store_true", help="Python API only")
    ap.add_argument("--ray-logs", action="store_true", help="forward Ray worker logs (Serve access logs)")
    args = ap.parse_args(argv)
    smoke = args.smoke
    args.tokens = args.tokens or (600 if smoke else 131072)
    args.warmup_tokens = args.warmup_tokens or (200 if smoke else 16384)
    args.max_tokens = args.max_tokens or (8 if smoke else 32)
    args.deadline_s = 450.0 if args.deadline_s is None else args.deadline_s
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    args.device = "cpu" if smoke else "cuda"
    args.dtype = "float32" if smoke else "bfloat16"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        # One torch thread on both sides: a shared few-core machine makes several threads slow and erratic.
        torch.set_num_threads(1)
        if not os.environ.get("OUT"):
            os.environ["OUT"] = tempfile.mkdtemp(prefix="serve_latency_smoke_")
    run = Run()
    run.meta = {
        "env": _environment(),
        "model": ("tiny Llama (2 layers, hidden 64)" if args.smoke else "Llama-3-8B shape")
        + f", random weights (load_format=dummy), {args.dtype}, batch 1",
        "command": " ".join(
            ["python benchmarks/serve_latency.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "policy": args.policy,
        "tokens": args.tokens,
        "max_tokens": args.max_tokens,
        "warmup_tokens": args.warmup_tokens,
        "repeats": args.repeats,
        "sampling": "greedy",
    }
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="serve_latency_", ignore_cleanup_errors=True) as tmp:
        try:
            arm_deadline(args.deadline_s)
            serve_ok = args.skip_http or serve_imports(run)
            document, warm, folder = prepare(args, Path(tmp), run)
            run.phase = "python API"
            if not args.skip_python:
                try:
                    python_api(args, folder, document, warm, run)
                except Exception:
                    run.error("python API")
                free_gpu()  # again: a caught exception's traceback held the model until here
            run.phase = "HTTP"
            if serve_ok and not args.skip_http:
                try:
                    http(args, folder, document, warm, run)
                except Exception:
                    run.error("HTTP")
        except BaseException:
            run.error(run.phase)
        finally:
            signal.alarm(0)
            if any(e["phase"] == "HTTP" for e in run.meta.get("errors", [])):
                copy_ray_logs()
            run.meta["wall_s"] = time.perf_counter() - t_start
            summarize(run)
            write(args, run)
    return 1 if run.meta.get("errors") else 0


def serve_imports(run: Run) -> bool:
    """Import the Serve app's modules (Ray Serve, FastAPI, ...) first: a missing package shows in seconds,
    and the Python-API half still runs."""
    try:
        import entropyinfer.cluster.app  # noqa: F401

        return True
    except Exception:
        run.error("serve imports (the HTTP half is skipped)")
        return False


def copy_ray_logs(limit_bytes: int = 2 << 20) -> None:
    """After an HTTP failure: the Ray session's Serve logs and worker error files (each up to 2 MiB, the
    end of larger ones) into $OUT/serve_latency_ray_logs, for a run on a machine one cannot log in to."""
    logs = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs"
    dest = out_dir() / "serve_latency_ray_logs"
    try:
        files = [*logs.glob("serve/*.log"), *logs.glob("worker-*.err"), *logs.glob("raylet.err")]
        for f in files:
            if f.is_file() and f.stat().st_size:
                dest.mkdir(parents=True, exist_ok=True)
                with f.open("rb") as src:
                    src.seek(max(0, f.stat().st_size - limit_bytes))
                    (dest / f.name).write_bytes(src.read())
        print(f"Ray logs of the failed HTTP phase: {dest}", flush=True)
    except Exception:
        traceback.print_exc()


class DeadlineExceeded(BaseException):
    """--deadline-s passed. A BaseException, so that no phase's `except Exception` goes on to the next."""


def arm_deadline(seconds: float) -> None:
    """Raise DeadlineExceeded in the main thread after `seconds` (interrupts Ray and HTTP waits too): the
    Serve app is shut down on the way out and the results so far are written, inside the caller's limit."""
    if seconds <= 0:
        return

    def fire(signum: int, frame: Any) -> None:
        raise DeadlineExceeded(f"--deadline-s {seconds:g} passed")

    signal.signal(signal.SIGALRM, fire)
    signal.alarm(max(1, int(seconds)))


def prepare(args: argparse.Namespace, tmp: Path, run: Run) -> tuple[str, str, Path]:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    folder = write_dummy_checkpoint(tmp / "checkpoint", model_config(args))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    document = document_of(tokenizer, args.tokens)
    warm = make_document(max(1, args.warmup_tokens - count_tokens(tokenizer, job_messages(""))), seed=1)
    run.meta["checkpoint_s"] = time.perf_counter() - t0
    log(f"checkpoint folder {folder} (config.json + byte-level tokenizer); job prompt {args.tokens} tokens")
    return document, warm, folder


def summarize(run: Run) -> None:
    """The headline numbers: TTFT overhead (SSE vs LLM.stream), total overheads (job, chat vs generate)."""
    by_path = {r["path"]: r for r in run.rows}
    summary = {}
    for name, path, key in (
        ("ttft_overhead_ms", "http chat stream (SSE)", "ttft_overhead_ms"),
        ("stream_total_overhead_ms", "http chat stream (SSE)", "total_overhead_ms"),
        ("job_total_overhead_ms", "http job (submit -> results)", "total_overhead_ms"),
        ("chat_total_overhead_ms", "http chat completion", "total_overhead_ms"),
    ):
        value = by_path.get(path, {}).get(key)
        if value is not None:
            summary[name] = round(value, 1)
    run.meta["summary"] = summary


def write(args: argparse.Namespace, run: Run) -> None:
    name = "serve_latency_smoke" if args.smoke else "serve_latency"
    notes = (
        f"Command: `{run.meta['command'].strip()}`. {args.repeats} run(s) per row (medians; every sample in "
        f"the JSON) after a warm-up at {args.warmup_tokens} tokens in each process. ttft_s: time to the "
        "first generated text (Python: "
        "`LLM.stream`; HTTP: the first SSE content delta through `Client.stream`). total_s: call to last "
        "token (Python), submit to results fetched (job, polling every "
        f"{args.poll_s * 1e3:.0f} ms), request to [DONE] / response (chat). prefill_s and density: the "
        "engine's own stats for that run. Overheads: HTTP row minus the Python-API row named in `vs` "
        "(includes run-to-run variation of the engine itself: compare prefill_s). same_out: the HTTP "
        "run generated the same text as the Python API (same random weights, greedy)."
    )
    try:
        title = "Serving overhead: HTTP vs Python API"
        table = write_results(name, title, COLUMNS, run.rows, run.meta, notes)
    except Exception:
        run.error("write results")
        return
    print(f"\nresults: {out_dir() / name}.json, .md; summary: {run.meta.get('summary')}")
    if run.meta.get("errors"):
        print(f"ERRORS in: {', '.join(e['phase'] for e in run.meta['errors'])} (tracebacks above)")
    print("\n" + table, flush=True)


def _environment() -> dict[str, Any]:
    env = environment()
    for mod in ("ray", "tokenizers", "fastapi", "uvicorn", "httpx", "pydantic"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    return env


if __name__ == "__main__":
    sys.exit(main())
